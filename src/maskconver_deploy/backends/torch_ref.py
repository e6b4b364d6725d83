"""The PyTorch reference behind the common Runner interface: DeployModel in eager mode (the parity baseline).

Families: `torch` (CPU, fp32, eager), `torch-compile` (CPU, fp32, the same module under `torch.compile`: the
baseline a PyTorch user who wants speed would pick) and `torch-cuda` (fp32, or fp16 under autocast). The artifact
is a checkpoint (`reference.pt` in a model folder); there is nothing to compile ahead of time.

`torch-compile` compiles when the runner opens: `open()` runs the module once on a blank image, which is when
TorchDynamo traces and Inductor generates and builds the kernels, and keeps that time in `runner.compile_s`
(reported apart; it is never part of a timed call).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.backends import BackendName
from maskconver_deploy.backends.base import Availability, Runner
from maskconver_deploy.errors import BackendUnavailable, UserError
from maskconver_deploy.types import OUTPUT_NAMES, ModelMeta, Precision

FAMILIES = ("torch", "torch-compile", "torch-cuda")
PRECISIONS: dict[str, tuple[Precision, ...]] = {
    "torch": (Precision.FP32,),
    "torch-compile": (Precision.FP32,),
    "torch-cuda": (Precision.FP32, Precision.FP16),
}
ARTIFACT_NAME = "reference.pt"


def availability(family: str) -> Availability:
    """torch is always there on CPU; torch-cuda needs a CUDA build of torch and a visible GPU. Never raises."""
    if family not in FAMILIES:
        return Availability(False, f"unknown family '{family}' for the torch backend")
    try:
        import torch
    except Exception as exc:  # a broken install must not crash a listing
        return Availability(False, f"torch cannot be imported ({type(exc).__name__})", "pip install torch")
    if family == "torch":
        return Availability(True)
    if family == "torch-compile":
        import shutil

        if not hasattr(torch, "compile"):
            return Availability(False, "this torch has no torch.compile", "pip install torch==2.13.0")
        if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            return Availability(False, "torch.compile's CPU backend (Inductor) needs a C++ compiler",
                                "install g++ (apt-get install g++)")  # fmt: skip
        return Availability(True)
    try:
        has_cuda = bool(torch.cuda.is_available())
    except Exception:
        has_cuda = False
    if has_cuda:
        return Availability(True)
    if torch.version.cuda is None:
        return Availability(
            False, "this torch build has no CUDA support", "install a CUDA build of torch on a GPU machine"
        )
    return Availability(False, "no CUDA device is visible", "run on a machine with an NVIDIA GPU and driver")


def artifact_path(model_dir: Path, name: BackendName, graph: str = "panoptic") -> Path:
    """The reference checkpoint copied into a model folder by the export step (one for every graph)."""
    return Path(model_dir) / ARTIFACT_NAME


def compile_onnx(onnx_path: Path, out_path: Path, name: BackendName, calib: Any = None, force: bool = False) -> Path:
    """The reference runs the checkpoint itself; there is no ONNX to compile."""
    raise UserError(f"backend '{name}' runs the PyTorch checkpoint directly and compiles nothing from ONNX")


class TorchRunner(Runner):
    """Runs DeployModel eagerly under torch.inference_mode on CPU or CUDA (fp16 via autocast)."""

    def __init__(
        self,
        name: str,
        artifact: Path,
        meta: ModelMeta,
        threads: int | None = None,
        device: str = "cpu",
        half: bool = False,
        output: str = "panoptic",
        compiled: bool = False,
    ) -> None:
        super().__init__(name, artifact, meta, threads)
        if output not in OUTPUT_NAMES:
            raise UserError(f"unknown output '{output}'; use one of {', '.join(OUTPUT_NAMES)}")
        self.device = device
        self.half = half
        self.output = output
        self.compiled = compiled
        self.compile_s: float | None = None  # torch-compile: seconds of the compiling first call in open()
        self._deploy: Any = None

    def _open(self) -> None:
        import torch

        from maskconver_deploy.model.checkpoint import load_checkpoint
        from maskconver_deploy.model.postprocess import DeployModel

        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        model, _, _ = load_checkpoint(self.artifact, preset=self.meta.preset)
        if tuple(model.spec.input_size) != tuple(self.meta.input_size):
            raise UserError(
                f"checkpoint input size {tuple(model.spec.input_size)} differs from the model's "
                f"{tuple(self.meta.input_size)}",
                self.artifact,
            )
        try:
            deploy = DeployModel(model, output=self.output, num_proposals=self.meta.num_proposals,
                                 merge=self.meta.merge, mask_activation=self.meta.mask_activation)
        except ValueError as exc:
            raise UserError(str(exc), self.artifact) from None
        self._deploy = deploy.to(self.device)
        if self.compiled:
            self._deploy = torch.compile(self._deploy, dynamic=False)
            h, w = self.meta.input_size
            start = time.perf_counter()
            try:
                self._run({"image": np.zeros((1, h, w, 3), np.uint8)})  # traces and builds the kernels
            except Exception as exc:  # Dynamo/Inductor failures are long; one line names the cause
                first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                raise UserError(f"torch.compile failed ({type(exc).__name__}: {first[:300]})", self.artifact) from None
            self.compile_s = time.perf_counter() - start

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        (image,) = feeds.values()
        image = np.ascontiguousarray(image)
        if not image.flags.writeable:  # torch.from_numpy warns on read-only arrays (a cheap copy of a uint8 image)
            image = image.copy()
        with torch.inference_mode():
            tensor = torch.from_numpy(image).to(self.device)
            if self.half:
                with torch.autocast(device_type="cuda", dtype=torch.float16):
                    outputs = self._deploy(tensor)
            else:
                outputs = self._deploy(tensor)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            arrays = [(value.float() if value.is_floating_point() else value).cpu().numpy() for value in outputs]
        return dict(zip(OUTPUT_NAMES[self.output], arrays))

    def _close(self) -> None:
        self._deploy = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def open_runner(
    artifact: Path, meta: ModelMeta, name: BackendName, threads: int | None = None, output: str = "panoptic"
) -> TorchRunner:
    """A TorchRunner for `name` (torch, torch-compile, torch-cuda, torch-cuda-fp16); unavailable: BackendUnavailable."""
    if name.family not in FAMILIES:
        raise UserError(f"backend '{name}' is not served by the torch reference")
    if name.precision not in PRECISIONS[name.family]:
        allowed = ", ".join(p.value for p in PRECISIONS[name.family])
        raise UserError(f"backend '{name}': precision {name.precision.value} is not offered (use {allowed})")
    state = availability(name.family)
    if not state.ok:
        raise BackendUnavailable(str(name), state.reason, state.hint)
    device = "cuda" if name.family == "torch-cuda" else "cpu"
    return TorchRunner(
        str(name),
        Path(artifact),
        meta,
        threads=threads,
        device=device,
        half=name.precision is Precision.FP16,
        output=output,
        compiled=name.family == "torch-compile",
    )

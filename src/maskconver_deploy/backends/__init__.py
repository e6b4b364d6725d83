"""Backends: one module each, behind `Runner` (base.py). Names users type, and how they map to modules.

A backend name is a family plus an optional precision: `ort`, `ort-int8-static`, `ort-mobile`,
`tflite-fp16`, `tensorrt-int8`, `openvino-bf16`, `torch`, `torch-compile`, `torch-cuda`. Without a precision it means fp32.

Each backend module provides:
    FAMILIES: tuple[str, ...]                      families it serves
    PRECISIONS: dict[str, tuple[Precision, ...]]   precisions per family
    availability(family) -> Availability           never raises
    artifact_path(model_dir, name, graph) -> Path  where the artifact for `name` lives in a model folder
    compile_onnx(onnx_path, out_path, name, calib=None, force=False) -> Path   (not for torch)
    open_runner(artifact, meta, name, threads=None) -> Runner
Runtimes are imported inside functions only, so importing a backend module is cheap.

`open_runner(name, model_dir=..., checkpoint=..., threads=..., graph=...)` below is the one entry point every
command uses: it finds the artifact in a model folder and calls the backend module's `open_runner`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from maskconver_deploy.errors import UserError
from maskconver_deploy.types import Precision

if TYPE_CHECKING:
    from maskconver_deploy.backends.base import Runner

# family -> module (relative to this package)
FAMILY_MODULES: dict[str, str] = {
    "torch": "torch_ref",
    "torch-cuda": "torch_ref",
    "torch-compile": "torch_ref",
    "ort": "ort",
    "ort-mobile": "ort",
    "tflite": "tflite",
    "tensorrt": "trt",
    "openvino": "openvino",
}


@dataclass(frozen=True)
class BackendName:
    """A parsed backend name: family + precision."""

    family: str
    precision: Precision = Precision.FP32

    def __str__(self) -> str:
        if self.precision is Precision.FP32:
            return self.family
        return f"{self.family}-{self.precision.value}"


def parse_backend(name: str) -> BackendName:
    """'ort-int8-static' -> BackendName('ort', INT8_STATIC); unknown names are a UserError."""
    text = name.strip().lower()
    for family in sorted(FAMILY_MODULES, key=len, reverse=True):
        if text == family:
            return BackendName(family)
        if text.startswith(family + "-"):
            rest = text[len(family) + 1 :]
            try:
                return BackendName(family, Precision(rest))
            except ValueError:
                continue
    known = ", ".join(sorted(FAMILY_MODULES))
    precisions = ", ".join(p.value for p in Precision)
    raise UserError(f"unknown backend '{name}'; use a family ({known}) optionally followed by -PRECISION ({precisions})")


def backend_module(family: str) -> ModuleType:
    """Import the module that serves a backend family."""
    return importlib.import_module(f"maskconver_deploy.backends.{FAMILY_MODULES[family]}")


def require_backend(name: str | BackendName) -> tuple[BackendName, ModuleType]:
    """Parse `name`, check its module offers that precision and that it can run here.

    Unknown names and precisions the backend does not offer are a UserError; a backend that cannot run on this
    machine is BackendUnavailable (its reason and install hint). Both exit 2 on the command line.
    """
    from maskconver_deploy.errors import BackendUnavailable

    parsed = name if isinstance(name, BackendName) else parse_backend(str(name))
    module = backend_module(parsed.family)
    offered = module.PRECISIONS.get(parsed.family, ())
    if parsed.precision not in offered:
        names = ", ".join(str(BackendName(parsed.family, p)) for p in offered)
        raise UserError(f"backend '{parsed.family}' does not offer precision {parsed.precision.value} (use {names})")
    status = module.availability(parsed.family)
    if not status.ok:
        raise BackendUnavailable(str(parsed), status.reason, status.hint)
    return parsed, module


def open_runner(
    name: str,
    *,
    model_dir: Path | None = None,
    checkpoint: Path | None = None,
    threads: int | None = None,
    graph: str = "panoptic",
) -> Runner:
    """A runner (not yet opened) for backend `name` on a model folder, or for `torch` on a bare checkpoint.

    Every backend but torch needs `model_dir`. A missing artifact is a UserError naming the `maskconver compile`
    command that makes it (`ArtifactMissing`); an artifact built from another export of the folder (its build record
    names another ONNX sha256) is `ArtifactStale`. Both are UserErrors. `graph` picks the exported graph (panoptic,
    raw, semantic); raw runners return the raw outputs from `infer`.
    """
    from maskconver_deploy.errors import ArtifactMissing, ArtifactStale
    from maskconver_deploy.fileio import sha256_file
    from maskconver_deploy.modeldir import GRAPH_FILES, ModelDir, graph_suffix, record_path

    parsed, module = require_backend(name)
    graph_suffix(graph)
    if parsed.family.startswith("torch"):
        if model_dir is not None:
            folder = ModelDir(model_dir)
            artifact = Path(module.artifact_path(folder.path, parsed, graph))
            if not artifact.is_file():
                raise ArtifactMissing("no reference checkpoint in the model folder; export again with --force", artifact)
            meta = folder.graph_meta(graph)
        elif checkpoint is not None:
            from maskconver_deploy.model.checkpoint import load_checkpoint, model_meta

            artifact = Path(checkpoint)
            model, categories, _ = load_checkpoint(artifact)
            meta = model_meta(model, categories, output=graph, checkpoint_sha256=sha256_file(artifact))
        else:
            raise UserError(f"backend '{parsed}' needs --checkpoint or --model-dir")
        return module.open_runner(artifact, meta, parsed, threads=threads, output=graph)
    if model_dir is None:
        hint = " (a checkpoint runs only on torch)" if checkpoint is not None else ""
        raise UserError(f"backend '{parsed}' needs --model-dir (a folder written by `maskconver export`){hint}")
    folder = ModelDir(model_dir)
    if not folder.onnx_path(graph).is_file():
        raise ArtifactMissing(f"no {graph} graph ({GRAPH_FILES[graph]}) in the model folder; export it with "
                        f"`maskconver export --output {graph} ...`", folder.path)  # fmt: skip
    artifact = Path(module.artifact_path(folder.path, parsed, graph))
    graph_option = "" if graph == "panoptic" else f" --graph {graph}"
    command = f"maskconver compile --model-dir {folder.path} --backend {parsed}{graph_option}"
    if not artifact.exists():
        raise ArtifactMissing(f"no {parsed} artifact for the {graph} graph; build it with `{command}`", artifact)
    record = record_path(artifact)
    if artifact != folder.onnx_path(graph) and record.is_file():
        try:
            built_from = json.loads(record.read_text()).get("source_onnx_sha256")
        except (OSError, ValueError, AttributeError):
            built_from = None
        if built_from and built_from != sha256_file(folder.onnx_path(graph)):
            raise ArtifactStale(f"was built from another export of {GRAPH_FILES[graph]}; rebuild it with "
                            f"`{command} --force`", artifact)  # fmt: skip
    return module.open_runner(artifact, folder.graph_meta(graph), parsed, threads=threads)

"""Backends: one module each, behind `Runner` (base.py). Names users type, and how they map to modules.

A backend name is a family plus an optional precision: `ort`, `ort-int8-static`, `ort-mobile`,
`tflite-fp16`, `tensorrt-int8`, `torch`, `torch-cuda`. Without a precision it means fp32.

Each backend module provides:
    FAMILIES: tuple[str, ...]                      families it serves
    PRECISIONS: dict[str, tuple[Precision, ...]]   precisions per family
    availability(family) -> Availability           never raises
    artifact_path(model_dir, name, graph) -> Path  where the artifact for `name` lives in a model folder
    compile_onnx(onnx_path, out_path, name, calib=None, force=False) -> Path   (not for torch)
    open_runner(artifact, meta, name, threads=None) -> Runner
Runtimes are imported inside functions only, so importing a backend module is cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from maskconver_deploy.errors import UserError
from maskconver_deploy.types import Precision

# family -> module (relative to this package)
FAMILY_MODULES: dict[str, str] = {
    "torch": "torch_ref",
    "torch-cuda": "torch_ref",
    "ort": "ort",
    "ort-mobile": "ort",
    "tflite": "tflite",
    "tensorrt": "trt",
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

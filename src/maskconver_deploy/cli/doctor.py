"""`maskconver doctor`: what can run on this machine, and how to get what cannot."""

from __future__ import annotations

import platform
from importlib import metadata

from maskconver_deploy.cli.options import JsonOpt

RUNTIME_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "pycocotools", "ai-edge-litert", "tensorrt",
                    "openvino", "nncf", "numpy")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def doctor(json: JsonOpt = False) -> None:
    """List every backend family with whether it can run here (and why not), plus library versions."""
    from maskconver_deploy.backends import FAMILY_MODULES, backend_module
    from maskconver_deploy.cli import console

    rows = []
    for family in FAMILY_MODULES:
        module = backend_module(family)
        status = module.availability(family)
        precisions = ", ".join(p.value for p in module.PRECISIONS.get(family, ()))
        rows.append({"backend": family, "available": status.ok, "precisions": precisions,
                     "reason": status.reason, "hint": status.hint})
    versions = {name: _version(name) for name in RUNTIME_PACKAGES}
    machine = {"python": platform.python_version(), "machine": platform.machine(), "processor": _cpu_model()}
    if json:
        console.print_json({"backends": rows, "versions": versions, "machine": machine})
        return
    console.print_table(rows, ["backend", "available", "precisions", "reason", "hint"], title="Backends on this machine")
    console.print_table([{"package": k, "version": v or "not installed"} for k, v in versions.items()], title="Libraries")
    console.log(f"python {machine['python']} on {machine['machine']} ({machine['processor']})")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

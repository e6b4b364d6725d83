"""The import graph: the CLI loads no heavy library; data, metrics and reports never import models or backends."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "tensorflow", "tensorrt", "matplotlib", "ai_edge_litert", "onnx")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_cli_import_is_light() -> None:
    loaded = _loaded_after("import maskconver_deploy.cli")
    assert not loaded & set(HEAVY), f"`import maskconver_deploy.cli` loads {sorted(loaded & set(HEAVY))}"


def test_data_and_metrics_are_model_independent() -> None:
    loaded = _loaded_after(
        "import maskconver_deploy.data, maskconver_deploy.data.coco_panoptic, maskconver_deploy.data.synthetic, "
        "maskconver_deploy.data.preprocess, maskconver_deploy.metrics.pq, maskconver_deploy.metrics.miou, "
        "maskconver_deploy.metrics.coco_instances"
    )
    assert "torch" not in loaded
    assert not {m for m in loaded if m.startswith(("maskconver_deploy.model", "maskconver_deploy.backends"))}


def test_backend_modules_import_without_their_runtime() -> None:
    loaded = _loaded_after(
        "import maskconver_deploy.backends.ort, maskconver_deploy.backends.tflite, maskconver_deploy.backends.trt"
    )
    assert not loaded & {"onnxruntime", "tensorflow", "tensorrt", "ai_edge_litert", "torch"}


def test_package_import_is_light_and_the_api_is_lazy() -> None:
    loaded = _loaded_after("import maskconver_deploy; maskconver_deploy.load; maskconver_deploy.api.export")
    assert not loaded & set(HEAVY), f"the Python API loads {sorted(loaded & set(HEAVY))} before it is called"
    assert "maskconver_deploy.api" in loaded
    assert not {m for m in loaded if m.startswith(("maskconver_deploy.model", "maskconver_deploy.backends."))}

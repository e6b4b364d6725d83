"""`maskconver compile`: build one backend's artifacts in a model folder (modeldir.py and the backend do the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskconver_deploy.api import GRAPH_CHOICES, backend_name  # noqa: F401 - GRAPH_CHOICES re-exported
from maskconver_deploy.cli.options import ForceOpt, JsonOpt, ModelDirOpt
from maskconver_deploy.errors import UserError

BackendFamilyOpt = Annotated[
    Optional[str],
    typer.Option("--backend", "-b", help="ort, ort-mobile, tflite, openvino or tensorrt; a precision may follow: ort-int8-static, "
                 "openvino-bf16."),
]
PrecisionOpt = Annotated[
    Optional[str],
    typer.Option("--precision", "-p", help="fp32, fp16, bf16 (OpenVINO: the network in bf16, the post-processing in "
                 "float32), int8-dynamic (weight-only), int8-static (ONNX Runtime QDQ) or int8 (TFLite / TensorRT full "
                 "integer, OpenVINO NNCF)."),
]
CalibOpt = Annotated[
    Optional[Path], typer.Option("--calib", help="Calibration folder (maskconver calib make): int8-static and int8 need it.")
]
GraphOpt = Annotated[str, typer.Option("--graph", "-g", help="Graph to compile: panoptic, raw, semantic or all exported.")]
WorkspaceOpt = Annotated[
    Optional[float], typer.Option("--workspace-gb", help="TensorRT builder workspace limit in GiB (default: TensorRT's).")
]


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def compile_cmd(
    model_dir: ModelDirOpt = None,
    backend: BackendFamilyOpt = None,
    precision: PrecisionOpt = None,
    calib: CalibOpt = None,
    graph: GraphOpt = "all",
    workspace_gb: WorkspaceOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Compile a model folder's ONNX graphs for one backend and precision; artifacts land in the same folder,
    named by backend (e.g. ort-mobile.ort, ort-int8-static.onnx, tflite-fp16.tflite, openvino-int8.xml), each with a
    build record."""
    from maskconver_deploy import api
    from maskconver_deploy.backends import require_backend
    from maskconver_deploy.cli.console import ProgressBar, log, print_json, print_table
    from maskconver_deploy.modeldir import ModelDir

    if model_dir is None or backend is None:
        raise UserError("give --model-dir (a folder written by `maskconver export`) and --backend")
    name = backend_name(backend, precision)
    parsed, _ = require_backend(name)  # an unavailable backend is explained before anything else
    folder = ModelDir(model_dir)
    total = len(folder.graphs()) if graph == "all" else 1
    with ProgressBar(f"compile {name}", total=total) as bar:
        built = api.compile(model_dir, backend, precision=precision, calib=calib, graph=graph,
                            workspace_gb=workspace_gb, force=force,
                            on_step=lambda one: bar.update(1, status=f"{one} done"))  # fmt: skip
    rows = []
    for row in built:
        check = row["record"].get("check") or {}
        rows.append({"backend": row["backend"], "graph": row["graph"], "file": row["file"], "MB": row["bytes"] / 1e6,
                     "seconds": row["seconds"], "panoptic agreement %": _percent(check.get("panoptic_agreement")),
                     "category agreement %": _percent(check.get("category_agreement")), "record": row["record"]})  # fmt: skip
    if json_out:
        print_json({"model_dir": str(folder.path), "artifacts": rows})
        return
    columns = ["backend", "graph", "file", "MB", "seconds", "panoptic agreement %", "category agreement %"]
    print_table(rows, columns=columns,
                title=f"{folder.path}: {name}")  # fmt: skip
    if parsed.family == "ort" and parsed.precision.value == "fp32":
        log("ort fp32 runs the exported graphs as they are: nothing was written")

"""`maskconver compile`: build one backend's artifacts in a model folder (modeldir.py and the backend do the work)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from maskconver_deploy.cli.options import ForceOpt, JsonOpt, ModelDirOpt
from maskconver_deploy.errors import UserError

GRAPH_CHOICES = ("panoptic", "raw", "semantic", "all")
BackendFamilyOpt = Annotated[
    Optional[str],
    typer.Option("--backend", "-b", help="ort, ort-mobile, tflite or tensorrt, a precision may follow: ort-int8-static."),
]
PrecisionOpt = Annotated[
    Optional[str],
    typer.Option("--precision", "-p", help="fp32, fp16, int8-dynamic (weight-only), int8-static (ONNX Runtime QDQ) "
                 "or int8 (TFLite / TensorRT full integer)."),
]
CalibOpt = Annotated[
    Optional[Path], typer.Option("--calib", help="Calibration folder (maskconver calib make): int8-static and int8 need it.")
]
GraphOpt = Annotated[str, typer.Option("--graph", "-g", help="Graph to compile: panoptic, raw, semantic or all exported.")]
WorkspaceOpt = Annotated[
    Optional[float], typer.Option("--workspace-gb", help="TensorRT builder workspace limit in GiB (default: TensorRT's).")
]


def backend_name(backend: str, precision: str | None) -> str:
    """--backend ort --precision int8-static -> 'ort-int8-static'; a precision in both places must agree."""
    from maskconver_deploy.backends import BackendName, parse_backend
    from maskconver_deploy.types import Precision

    parsed = parse_backend(backend)
    if precision is None:
        return str(parsed)
    try:
        wanted = Precision(precision.strip().lower())
    except ValueError:
        choices = ", ".join(p.value for p in Precision)
        raise UserError(f"unknown --precision '{precision}'; use one of {choices}") from None
    if parsed.precision is not Precision.FP32 and parsed.precision is not wanted:
        raise UserError(f"--backend {backend} already says {parsed.precision.value}, "
                        f"but --precision says {wanted.value}")  # fmt: skip
    return str(BackendName(parsed.family, wanted))


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
    named by backend (e.g. ort-mobile.ort, ort-int8-static.onnx, tflite-fp16.tflite), each with a build record."""
    from maskconver_deploy.backends import require_backend
    from maskconver_deploy.cli.console import ProgressBar, log, print_json, print_table
    from maskconver_deploy.fileio import read_json
    from maskconver_deploy.modeldir import ModelDir, record_path

    if model_dir is None or backend is None:
        raise UserError("give --model-dir (a folder written by `maskconver export`) and --backend")
    if graph not in GRAPH_CHOICES:
        raise UserError(f"unknown --graph '{graph}'; use one of {', '.join(GRAPH_CHOICES)}")
    name = backend_name(backend, precision)
    parsed, _ = require_backend(name)  # an unavailable backend is explained before anything else
    if workspace_gb is not None and parsed.family != "tensorrt":
        raise UserError("--workspace-gb applies to --backend tensorrt only")
    if parsed.precision.value in ("int8-static", "int8") and calib is None:
        raise UserError(f"{name} needs a calibration set: pass --calib calibration/NAME (see `maskconver calib make`)")
    folder = ModelDir(model_dir)
    graphs = folder.graphs() if graph == "all" else [graph]
    if not graphs:
        raise UserError("the model folder has no exported graph; export again with --force", folder.path)
    rows = []
    with ProgressBar(f"compile {name}", total=len(graphs)) as bar:
        for one in graphs:
            started = time.perf_counter()
            path = folder.compile(name, graph=one, calib=calib, force=force, workspace_gb=workspace_gb)
            record = read_json(record_path(path)) if record_path(path).is_file() else {}
            check = record.get("check") or {}
            rows.append({"backend": name, "graph": one, "file": path.name, "MB": path.stat().st_size / 1e6,
                         "seconds": time.perf_counter() - started,
                         "panoptic agreement %": _percent(check.get("panoptic_agreement")),
                         "category agreement %": _percent(check.get("category_agreement")), "record": record})  # fmt: skip
            bar.update(1, status=f"{one} done")
    if json_out:
        print_json({"model_dir": str(folder.path), "artifacts": rows})
        return
    columns = ["backend", "graph", "file", "MB", "seconds", "panoptic agreement %", "category agreement %"]
    print_table(rows, columns=columns,
                title=f"{folder.path}: {name}")  # fmt: skip
    if parsed.family == "ort" and parsed.precision.value == "fp32":
        log("ort fp32 runs the exported graphs as they are: nothing was written")

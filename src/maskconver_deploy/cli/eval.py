"""`maskconver eval`: panoptic quality (PQ/SQ/RQ, things/stuff) and mIoU, by the reference evaluator's rules.

Two ways in:
* folder vs folder: `--gt-json J --gt-dir D --pred-json PJ --pred-dir PD`;
* a model on a data set, predicted and scored in one streaming pass: `--checkpoint C --data DIR` (the
  PyTorch reference) or `--model-dir M --backend B --data DIR` (an exported / compiled artifact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from maskconver_deploy.cli.options import (
    CheckpointOpt,
    DataOpt,
    ForceOpt,
    JsonOpt,
    JsonOutOpt,
    ModelDirOpt,
    SplitOpt,
    ThreadsOpt,
)
from maskconver_deploy.errors import UserError

PathOpt = Optional[Path]


def _folder_mode(gt_json: PathOpt, gt_dir: PathOpt, pred_json: PathOpt, pred_dir: PathOpt) -> bool:
    given = {"--gt-json": gt_json, "--gt-dir": gt_dir, "--pred-json": pred_json, "--pred-dir": pred_dir}
    if not any(v is not None for v in given.values()):
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise UserError(f"folder evaluation needs {', '.join(given)}; missing {', '.join(missing)}")
    return True


def _print(result: dict[str, Any], as_json: bool, per_class: bool) -> None:
    from maskconver_deploy.cli.console import fmt, log, print_json, print_table
    from maskconver_deploy.evaluate import summary_rows

    if as_json:
        print_json(result)
        return
    title = f"PQ on {result['n_images']} images"
    if result.get("backend"):
        title += f" ({result['backend']})"
    print_table(summary_rows(result), columns=["group", "PQ", "SQ", "RQ", "n"], title=title)
    if per_class:
        names = {c["id"]: c["name"] for c in result.get("categories", [])}
        rows = [
            {"category": names.get(cid, str(cid)), "id": cid, "PQ": v["pq"], "SQ": v["sq"], "RQ": v["rq"]}
            | {"TP": v["tp"], "FP": v["fp"], "FN": v["fn"]}
            for cid, v in result["pq"]["per_class"].items()
            if v["tp"] + v["fp"] + v["fn"] > 0
        ]
        print_table(rows, title="per category (those present)")
    miou = result["miou"]
    timing = result.get("timing", {})
    line = f"mIoU {fmt(miou['miou'])} over {miou['n']} classes, pixel accuracy {fmt(miou['pixel_accuracy'])}"
    line += f"; {fmt(timing.get('total_s'))} s"
    if "latency_ms" in timing:
        line += f", backend latency median {fmt(timing['latency_ms']['median'])} ms"
    log(line)


def eval_cmd(
    gt_json: Annotated[PathOpt, typer.Option("--gt-json", help="Ground-truth COCO-panoptic JSON (folder mode).")] = None,
    gt_dir: Annotated[PathOpt, typer.Option("--gt-dir", help="Ground-truth PNG folder (folder mode).")] = None,
    pred_json: Annotated[PathOpt, typer.Option("--pred-json", help="Prediction COCO-panoptic JSON (folder mode).")] = None,
    pred_dir: Annotated[PathOpt, typer.Option("--pred-dir", help="Prediction PNG folder (folder mode).")] = None,
    checkpoint: CheckpointOpt = None,
    model_dir: ModelDirOpt = None,
    backend: Annotated[
        Optional[str],
        typer.Option(
            "--backend",
            "-b",
            help="Backend to run --model-dir with (default ort; torch for --checkpoint), e.g. ort-int8-static, "
            "tflite-fp16, tensorrt.",
        ),
    ] = None,
    data: DataOpt = None,
    split: SplitOpt = "val",
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="Evaluate only the first N images.")] = None,
    threads: ThreadsOpt = None,
    save_predictions: Annotated[
        PathOpt,
        typer.Option(
            "--save-predictions",
            help="Also write the model's answers as a COCO-panoptic folder (panoptic.json + panoptic/).",
        ),
    ] = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="Also print the per-category table.")] = False,
    oracle_centers: Annotated[
        bool,
        typer.Option(
            "--oracle-centers",
            help="Diagnosis (--checkpoint only): also decode masks at the ground-truth centers and classes, and "
            "report PQ both ways plus center recall / precision (things and stuff).",
        ),
    ] = False,
    json_out: JsonOutOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Evaluate panoptic predictions (a folder, or a model run over a data set) against COCO-panoptic ground truth."""
    from maskconver_deploy.cli.console import progress
    from maskconver_deploy.fileio import refuse_overwrite, write_json

    if json_out is not None:
        refuse_overwrite(json_out, force)
    model_given = checkpoint is not None or model_dir is not None
    if _folder_mode(gt_json, gt_dir, pred_json, pred_dir):
        if model_given or data is not None:
            raise UserError(
                "use either the folder options (--gt-json ...) or a model (--checkpoint/--model-dir with --data), not both"
            )
        from maskconver_deploy.evaluate import evaluate_folders

        assert gt_json and gt_dir and pred_json and pred_dir  # checked by _folder_mode
        result = evaluate_folders(gt_json, gt_dir, pred_json, pred_dir, limit=n, progress=progress)
    else:
        if checkpoint is not None and model_dir is not None:
            raise UserError("give --checkpoint or --model-dir, not both")
        if not model_given:
            raise UserError(
                "nothing to evaluate: give --gt-json/--gt-dir/--pred-json/--pred-dir, "
                "or --checkpoint or --model-dir with --data"
            )
        if data is None:
            raise UserError("--data is required to evaluate a model")
        if oracle_centers and (checkpoint is None or (backend or "torch") != "torch" or save_predictions is not None):
            raise UserError("--oracle-centers needs --checkpoint (backend torch) and no --save-predictions")
        if checkpoint is not None and not checkpoint.is_file():
            raise UserError("no such checkpoint", checkpoint)
        if model_dir is not None and not model_dir.is_dir():
            raise UserError("no such model folder", model_dir)
        name = backend or ("torch" if checkpoint is not None else "ort")
        if checkpoint is not None and not name.startswith("torch"):
            raise UserError(
                f"--checkpoint runs the PyTorch reference (backend torch or torch-cuda), not '{name}'; "
                "use --model-dir for other backends"
            )
        if oracle_centers:
            from maskconver_deploy.training.diagnose import diagnose_checkpoint

            assert checkpoint is not None
            result = diagnose_checkpoint(checkpoint, data, split, limit=n, threads=threads, progress=progress)
        else:
            from maskconver_deploy.backends import open_runner
            from maskconver_deploy.data.coco_panoptic import load_split
            from maskconver_deploy.evaluate import evaluate_runner

            meta, records = load_split(data, split)
            runner = open_runner(name, model_dir=model_dir, checkpoint=checkpoint, threads=threads)
            with runner:
                result = evaluate_runner(
                    runner, records, meta, limit=n, pred_dir=save_predictions, force=force, progress=progress
                )
        result["data"] = {"dir": str(data), "split": split}
        if checkpoint is not None:
            result["checkpoint"] = str(checkpoint)
        if model_dir is not None:
            result["model_dir"] = str(model_dir)
    if json_out is not None:
        write_json(json_out, result, force=force)
    _print(result, as_json, per_class)
    if oracle_centers and not as_json:
        _print_oracle(result)


def _print_oracle(result: dict[str, Any]) -> None:
    """The oracle-center table: PQ with predicted vs ground-truth centers, center recall / precision."""
    from maskconver_deploy.cli.console import print_table
    from maskconver_deploy.training.diagnose import summary_rows, threshold_rows

    threshold = result["centers"]["score_threshold"]
    print_table(summary_rows(result), title=f"predicted vs ground-truth centers (peaks: score >= {threshold})")
    print_table(threshold_rows(result), title="center recall / precision by peak score")

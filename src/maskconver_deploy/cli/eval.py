"""`maskconver eval`: panoptic quality (PQ/SQ/RQ, things/stuff) and mIoU, by the reference evaluator's rules, and
(for a model run over a data set) COCO mask AP / AP50 / AP75 of the thing classes from the same pass.

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

PathOpt = Optional[Path]


def _print(result: dict[str, Any], as_json: bool, per_class: bool) -> None:
    from maskconver_deploy.cli.console import fmt, log, print_json, print_table
    from maskconver_deploy.evaluate import mask_ap_rows, summary_rows

    if as_json:
        print_json(result)
        return
    title = f"PQ on {result['n_images']} images"
    if result.get("backend"):
        title += f" ({result['backend']})"
    if result.get("merge"):
        title += f", merge path {result['merge']}/{result.get('mask_activation', '-')}"
    print_table(summary_rows(result), columns=["group", "PQ", "SQ", "RQ", "n"], title=title)
    ap_rows = mask_ap_rows(result)
    if ap_rows:
        print_table(ap_rows, columns=["group", "AP", "AP50", "AP75", "instances", "detections"],
                    title="COCO mask AP (thing classes, pycocotools COCOeval segm)")  # fmt: skip
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
            help="Also write the model's answers as a COCO-panoptic folder (panoptic.json + panoptic/), their thing "
            "segments as COCO instance results (instances.json) and the ground truth's (instances_gt.json).",
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
    from maskconver_deploy import api
    from maskconver_deploy.cli.console import progress

    result = api.evaluate(checkpoint=checkpoint, model_dir=model_dir, backend=backend, data=data, split=split, n=n,
                          threads=threads, save_predictions=save_predictions, gt_json=gt_json, gt_dir=gt_dir,
                          pred_json=pred_json, pred_dir=pred_dir, oracle_centers=oracle_centers, json_out=json_out,
                          force=force, progress=progress)  # fmt: skip
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

"""Evaluation: panoptic quality and semantic mIoU of predictions against COCO-panoptic ground truth.

Two entry points, both streaming (one image in memory at a time, counts only):
* `evaluate_folders`: a prediction folder (JSON + PNGs) against a ground-truth folder, like the reference
  evaluator;
* `evaluate_runner`: a runner (any backend) predicts each image of a data set and is scored on the fly.
The evaluator sees only outputs: it knows no model and no backend. A model's class index i is the data
set's category `meta.categories[i]` (things first, see `data.records`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from maskconver_deploy.data.coco_panoptic import (
    PredictionWriter,
    check_ids_match,
    load_example,
    load_panoptic_json,
    panoptic_to_coco,
    read_id_map,
)
from maskconver_deploy.data.records import DatasetMeta, PanopticRecord, SegmentInfo
from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import refuse_overwrite, write_json
from maskconver_deploy.metrics.miou import MIoUAccumulator
from maskconver_deploy.metrics.pq import PQAccumulator
from maskconver_deploy.types import VOID_ID, PanopticOutput

__all__ = ["evaluate_folders", "evaluate_runner", "category_map", "check_categories", "summary_rows", "mask_ap_rows"]

INSTANCES_JSON = "instances.json"  # --save-predictions: the thing segments as COCO instance results
INSTANCES_GT_JSON = "instances_gt.json"  # and the ground truth's thing segments as a COCO instances data set

T = TypeVar("T")
Progress = Callable[[Iterable[T], str, int], Iterator[T]]


class _Runner(Protocol):
    name: str
    last_latency_s: float

    def predict(self, image: np.ndarray) -> PanopticOutput: ...


def _plain(items: Iterable[T], description: str, total: int) -> Iterator[T]:
    return iter(items)


def category_map(ids: np.ndarray, segments: Iterable[SegmentInfo | dict[str, Any]], meta: DatasetMeta) -> np.ndarray:
    """int32 [H, W] class index per pixel (-1 for VOID) from a segment-id map and its segments."""
    lookup = {VOID_ID: -1}
    for seg in segments:
        if isinstance(seg, SegmentInfo):
            seg_id, category_id = seg.id, seg.category_id
        else:
            seg_id, category_id = seg["id"], seg["category_id"]
        lookup[int(seg_id)] = meta.class_index(int(category_id))
    values, inverse = np.unique(ids, return_inverse=True)
    try:
        classes = np.asarray([lookup[int(v)] for v in values.tolist()], dtype=np.int32)
    except KeyError as exc:
        raise UserError(f"segment id {exc.args[0]} of a map is not in its segments_info") from None
    return classes[inverse.reshape(np.shape(ids))]


def check_categories(model_categories: Sequence[Any], meta: DatasetMeta, what: str = "model") -> None:
    """UserError unless the model's classes are the data set's categories in the same order (id and isthing)."""
    mine = [(int(c.id), bool(c.isthing)) for c in model_categories]
    theirs = [(c.id, c.isthing) for c in meta.categories]
    if mine != theirs:
        raise UserError(
            f"the {what} has {len(mine)} classes (ids {[m[0] for m in mine][:10]}...) but the data set has "
            f"{len(theirs)} (ids {[t[0] for t in theirs][:10]}...), in model order; they must be the same"
        )


def evaluate_folders(
    gt_json: str | Path,
    gt_dir: str | Path,
    pred_json: str | Path,
    pred_dir: str | Path,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score a COCO-panoptic prediction folder against a ground-truth folder.

    The categories come from the ground-truth JSON. Every ground-truth image (the first `limit`) needs a
    prediction; extra predictions are ignored. Returns {"pq": ..., "miou": ..., "n_images", "timing"}.
    """
    start = time.perf_counter()
    meta, gt = load_panoptic_json(gt_json, gt_dir)
    if meta is None:
        raise UserError("ground-truth JSON has no 'categories' list", gt_json)
    _, pred = load_panoptic_json(pred_json, pred_dir, meta=meta)
    items = list(gt.items())[: limit if limit else None]
    missing = [image_id for image_id, _ in items if image_id not in pred]
    if missing:
        raise UserError(f"no prediction for {len(missing)} ground-truth images (first: {missing[0]!r})", pred_json)
    pq = PQAccumulator(meta.categories)
    miou = MIoUAccumulator(meta.num_classes)
    for image_id, (gt_png, gt_segments) in (progress or _plain)(items, "evaluate", len(items)):
        pred_png, pred_segments = pred[image_id]
        gt_ids = read_id_map(gt_png)
        check_ids_match(gt_ids, gt_segments, gt_png)
        pred_ids = read_id_map(pred_png)
        pq.add(gt_ids, gt_segments, pred_ids, pred_segments, image=str(pred_png))
        miou.add(category_map(gt_ids, gt_segments, meta), category_map(pred_ids, pred_segments, meta))
    seconds = time.perf_counter() - start
    return {
        "pq": pq.result(),
        "miou": miou.result(),
        "n_images": len(items),
        "categories": meta.to_dicts(),
        "timing": {"total_s": seconds},
    }


def evaluate_runner(
    runner: _Runner,
    records: Sequence[PanopticRecord],
    meta: DatasetMeta,
    limit: int | None = None,
    pred_dir: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Predict every record (the first `limit`) with `runner` and score it in one streaming pass.

    `pred_dir`, when given, receives the predictions as a COCO-panoptic folder (`PredictionWriter`), and their
    thing segments as COCO instance results (`instances.json`) beside the converted ground truth
    (`instances_gt.json`). Returns {"pq", "miou", "mask_ap", "n_images", "backend", "timing": {total_s,
    per_image_s, latency_ms: {mean, median, p90}}}; latencies are the backend calls only (`runner.last_latency_s`).
    `mask_ap` is COCO mask AP / AP50 / AP75 of the thing classes (metrics.coco_instances) from the same pass.
    """
    model_meta = getattr(runner, "meta", None)
    if model_meta is not None and getattr(model_meta, "categories", None) is not None:
        check_categories(model_meta.categories, meta)
    chosen = list(records[: limit if limit else None])
    if not chosen:
        raise UserError("no images to evaluate")
    from maskconver_deploy.metrics.coco_instances import InstanceEval

    if pred_dir is not None:
        for name in (INSTANCES_JSON, INSTANCES_GT_JSON):
            refuse_overwrite(Path(pred_dir) / name, force)
    writer = PredictionWriter(pred_dir, meta, force=force) if pred_dir is not None else None
    pq = PQAccumulator(meta.categories)
    miou = MIoUAccumulator(meta.num_classes)
    instances = InstanceEval(meta.categories, meta.label_divisor)
    latencies: list[float] = []
    start = time.perf_counter()
    for record in (progress or _plain)(chosen, "evaluate", len(chosen)):
        image, gt_ids = load_example(record)
        out = runner.predict(image)
        if out.panoptic.shape != gt_ids.shape:
            name = getattr(runner, "name", "runner")
            raise UserError(f"{name}: answer of shape {out.panoptic.shape} for an image of shape {gt_ids.shape}")
        latency = float(getattr(runner, "last_latency_s", float("nan")))
        if np.isfinite(latency):
            latencies.append(latency)
        if writer is not None:
            pred_ids, pred_segments = writer.add(record, out)
        else:
            pred_ids, pred_segments = panoptic_to_coco(out, meta)
        pq.add(gt_ids, record.segments, pred_ids, pred_segments, image=str(record.image_path))
        miou.add(category_map(gt_ids, record.segments, meta), out.category_map())
        instances.add_gt(record.image_id, gt_ids, record.segments)
        instances.add_pred(record.image_id, out.panoptic, out.scores)
    mask_ap = instances.result()
    seconds = time.perf_counter() - start
    if writer is not None:
        writer.close()
        write_json(writer.out_dir / INSTANCES_JSON, instances.results_json(), force=force)
        write_json(writer.out_dir / INSTANCES_GT_JSON, instances.gt_json(), force=force)
    lat = np.asarray(latencies, dtype=np.float64) * 1000.0
    timing: dict[str, Any] = {"total_s": seconds, "per_image_s": seconds / len(chosen)}
    if lat.size:
        timing["latency_ms"] = {
            "mean": float(lat.mean()),
            "median": float(np.median(lat)),
            "p90": float(np.percentile(lat, 90)),
        }
    result: dict[str, Any] = {
        "pq": pq.result(),
        "miou": miou.result(),
        "mask_ap": mask_ap,
        "n_images": len(chosen),
        "backend": str(getattr(runner, "name", "")),
        "categories": meta.to_dicts(),
        "timing": timing,
    }
    if writer is not None:
        result["predictions"] = {"json": str(writer.json_path), "png_dir": str(writer.png_dir),
                                 "instances_json": str(writer.out_dir / INSTANCES_JSON),
                                 "instances_gt_json": str(writer.out_dir / INSTANCES_GT_JSON)}
    return result


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (all / things / stuff) of an evaluation result."""
    rows = []
    for group in ("all", "things", "stuff"):
        g = result["pq"][group]
        rows.append({"group": group, "PQ": g["pq"], "SQ": g["sq"], "RQ": g["rq"], "n": g["n"]})
    return rows


def mask_ap_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table row of the thing classes' COCO mask AP of an evaluation result (empty when it has none)."""
    ap = result.get("mask_ap")
    if not ap:
        return []
    return [{"group": "things", "AP": ap["ap"], "AP50": ap["ap50"], "AP75": ap["ap75"], "instances": ap["n_gt"],
             "detections": ap["n_results"]}]  # fmt: skip

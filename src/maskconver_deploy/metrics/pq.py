"""Panoptic quality (Kirillov et al., 2019) with the rules of the COCO reference evaluator (panopticapi).

Per image, with ground truth (GT) and prediction segment-id maps and their segment lists:
* GT pixels with id 0 are VOID and ignored; a prediction's pixels on VOID do not count against it.
* GT areas are the areas listed in the GT segments (as the reference does; the PNG count when a listed
  area is 0); prediction areas are counted in the prediction map.
* A GT segment and a prediction segment match iff they have the same category, the GT segment is not a
  crowd region, and IoU > 0.5 (strictly), where
      IoU = |G ∩ P| / (|G| + |P| - |G ∩ P| - |P ∩ VOID|).
  Matches are unique because IoU > 0.5.
* Unmatched non-crowd GT segments are false negatives (FN).
* An unmatched prediction is a false positive (FP) unless more than half of its area lies on VOID or on the
  crowd region of its own category: (|P ∩ VOID| + |P ∩ crowd_c|) / |P| > 0.5 means it is ignored. As in
  the reference, when an image lists several crowd segments of one category, only the last one listed is
  used for this test.
* Per category c over all images: PQ_c = Σ IoU(TP) / (TP + FP/2 + FN/2), SQ_c = Σ IoU(TP) / TP (0 without
  TP), RQ_c = TP / (TP + FP/2 + FN/2). "all", "things" and "stuff" average PQ_c, SQ_c, RQ_c over the
  categories of the group that have TP + FP + FN > 0; `n` is how many such categories there are (an empty
  group reports 0 with n = 0).
Malformed predictions are a `UserError`: ids in the map that the segment list lacks, listed segments absent
from the map, unknown categories, duplicate or VOID (0) segment ids, maps of different shapes.
Results are in percent (0-100).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from maskconver_deploy.data.records import SegmentInfo
from maskconver_deploy.errors import UserError
from maskconver_deploy.types import VOID_ID, Category

__all__ = ["PQAccumulator", "PQStat", "OFFSET"]

OFFSET = 256**3  # larger than any segment id: gt * OFFSET + pred identifies a (gt, pred) pair


@dataclass
class PQStat:
    """Counts of one category."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0

    def merge(self, other: PQStat) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou


def _as_segment(seg: SegmentInfo | dict[str, Any]) -> SegmentInfo:
    if isinstance(seg, SegmentInfo):
        return seg
    try:
        return SegmentInfo(
            id=int(seg["id"]),
            category_id=int(seg["category_id"]),
            iscrowd=bool(seg.get("iscrowd", 0)),
            area=int(seg.get("area", 0)),
        )
    except (KeyError, TypeError, ValueError):
        raise UserError(f"malformed segment {seg!r}") from None


class PQAccumulator:
    """Streams images in, keeps per-category counts only (memory does not grow with the number of images)."""

    def __init__(self, categories: Sequence[Category]) -> None:
        self.categories = list(categories)
        ids = [c.id for c in self.categories]
        if len(set(ids)) != len(ids):
            raise UserError("duplicate category ids in the evaluation categories")
        self.stats: dict[int, PQStat] = {c.id: PQStat() for c in self.categories}
        self.n_images = 0

    def _segments(
        self, segments: Iterable[SegmentInfo | dict[str, Any]], what: str, where: str
    ) -> dict[int, SegmentInfo]:
        out: dict[int, SegmentInfo] = {}
        for raw in segments:
            seg = _as_segment(raw)
            if seg.id == VOID_ID:
                raise UserError(f"{where}: {what} segment id 0 is reserved for VOID")
            if seg.id in out:
                raise UserError(f"{where}: duplicate {what} segment id {seg.id}")
            if seg.category_id not in self.stats:
                raise UserError(f"{where}: {what} segment {seg.id} has unknown category id {seg.category_id}")
            out[seg.id] = seg
        return out

    def add(
        self,
        gt_ids: np.ndarray,
        gt_segments: Iterable[SegmentInfo | dict[str, Any]],
        pred_ids: np.ndarray,
        pred_segments: Iterable[SegmentInfo | dict[str, Any]],
        image: str = "image",
    ) -> dict[int, PQStat]:
        """Add one image; returns that image's per-category counts. `image` names it in error messages."""
        gt_ids = np.asarray(gt_ids)
        pred_ids = np.asarray(pred_ids)
        if gt_ids.shape != pred_ids.shape or gt_ids.ndim != 2:
            raise UserError(f"{image}: prediction map {pred_ids.shape} and ground truth {gt_ids.shape} differ in shape")
        gt_segs = self._segments(gt_segments, "ground-truth", image)
        pred_segs = self._segments(pred_segments, "predicted", image)

        pairs, pair_counts = np.unique(
            gt_ids.astype(np.int64).ravel() * OFFSET + pred_ids.astype(np.int64).ravel(), return_counts=True
        )
        gt_of, pred_of = np.divmod(pairs, OFFSET)
        gt_area_png: dict[int, int] = {}
        pred_area: dict[int, int] = {}
        for g, p, c in zip(gt_of.tolist(), pred_of.tolist(), pair_counts.tolist()):
            gt_area_png[g] = gt_area_png.get(g, 0) + c
            pred_area[p] = pred_area.get(p, 0) + c

        unknown_pred = sorted(set(pred_area) - set(pred_segs) - {VOID_ID})
        if unknown_pred:
            raise UserError(f"{image}: predicted map has segment ids {unknown_pred[:5]} that its segments_info lacks")
        absent_pred = sorted(set(pred_segs) - set(pred_area))
        if absent_pred:
            raise UserError(f"{image}: predicted segments {absent_pred[:5]} are listed but absent from the map")
        unknown_gt = sorted(set(gt_area_png) - set(gt_segs) - {VOID_ID})
        if unknown_gt:
            raise UserError(f"{image}: ground-truth map has segment ids {unknown_gt[:5]} that its segments_info lacks")

        gt_area = {g: (seg.area if seg.area > 0 else gt_area_png.get(g, 0)) for g, seg in gt_segs.items()}
        inter = {(g, p): c for g, p, c in zip(gt_of.tolist(), pred_of.tolist(), pair_counts.tolist())}

        image_stats: dict[int, PQStat] = {}

        def stat(category_id: int) -> PQStat:
            return image_stats.setdefault(category_id, PQStat())

        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for (g, p), intersection in inter.items():
            if g not in gt_segs or p not in pred_segs:
                continue
            gseg, pseg = gt_segs[g], pred_segs[p]
            if gseg.iscrowd or gseg.category_id != pseg.category_id:
                continue
            union = pred_area[p] + gt_area[g] - intersection - inter.get((VOID_ID, p), 0)
            iou = intersection / union if union > 0 else 0.0
            if iou > 0.5:
                s = stat(gseg.category_id)
                s.tp += 1
                s.iou += iou
                gt_matched.add(g)
                pred_matched.add(p)

        crowd_of_category: dict[int, int] = {}
        for g, gseg in gt_segs.items():
            if g in gt_matched:
                continue
            if gseg.iscrowd:
                crowd_of_category[gseg.category_id] = g  # the last listed crowd segment of a category
                continue
            stat(gseg.category_id).fn += 1

        for p, pseg in pred_segs.items():
            if p in pred_matched:
                continue
            ignored = inter.get((VOID_ID, p), 0)
            if pseg.category_id in crowd_of_category:
                ignored += inter.get((crowd_of_category[pseg.category_id], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            stat(pseg.category_id).fp += 1

        for category_id, s in image_stats.items():
            self.stats[category_id].merge(s)
        self.n_images += 1
        return image_stats

    def merge(self, other: PQAccumulator) -> None:
        """Add another accumulator's counts (same categories)."""
        if [c.id for c in other.categories] != [c.id for c in self.categories]:
            raise UserError("cannot merge PQ counts over different categories")
        for category_id, s in other.stats.items():
            self.stats[category_id].merge(s)
        self.n_images += other.n_images

    def _class_values(self, s: PQStat) -> tuple[float, float, float]:
        denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
        if denom == 0:
            return 0.0, 0.0, 0.0
        pq = s.iou / denom
        sq = s.iou / s.tp if s.tp else 0.0
        rq = s.tp / denom
        return pq, sq, rq

    def _average(self, isthing: bool | None) -> dict[str, float | int]:
        total_pq = total_sq = total_rq = 0.0
        n = 0
        for c in self.categories:
            if isthing is not None and c.isthing != isthing:
                continue
            s = self.stats[c.id]
            if s.tp + s.fp + s.fn == 0:
                continue
            pq, sq, rq = self._class_values(s)
            total_pq, total_sq, total_rq, n = total_pq + pq, total_sq + sq, total_rq + rq, n + 1
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
        return {"pq": 100.0 * total_pq / n, "sq": 100.0 * total_sq / n, "rq": 100.0 * total_rq / n, "n": n}

    def result(self) -> dict[str, Any]:
        """{"all"|"things"|"stuff": {"pq","sq","rq","n"}, "per_class": {category_id: {...}}}, percent."""
        per_class: dict[int, dict[str, float | int]] = {}
        for c in self.categories:
            s = self.stats[c.id]
            pq, sq, rq = self._class_values(s)
            per_class[c.id] = {"pq": 100.0 * pq, "sq": 100.0 * sq, "rq": 100.0 * rq, "tp": s.tp, "fp": s.fp, "fn": s.fn}
        return {
            "all": self._average(None),
            "things": self._average(True),
            "stuff": self._average(False),
            "per_class": per_class,
            "n_images": self.n_images,
        }

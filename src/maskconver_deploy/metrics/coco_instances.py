"""COCO instance segmentation from panoptic data: ground truth, results and mask AP with pycocotools.

numpy + pycocotools only: it knows no model and no backend.

* Ground truth: every *thing* segment of a COCO-panoptic annotation becomes one COCO instance annotation (RLE
  mask from the id map, `area` and `bbox` of the RLE, `iscrowd` from the segment: COCOeval ignores detections
  matched to a crowd region, as COCO does). Stuff segments are not instances.
* Results: every thing segment of a panoptic answer in the toolkit's encoding (id = (class index + 1) *
  label_divisor + instance, instance = proposal slot + 1) becomes one COCO result: RLE mask, the data set's
  category id of its class index, and the proposal's score.
* Mask AP: `pycocotools.cocoeval.COCOeval(iouType="segm")` over the thing categories and every image added
  (an image without thing instances still counts its false positives). AP, AP50, AP75 (and small / medium /
  large) in percent, like PQ; None where COCOeval has nothing to average (-1).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["encode_mask", "gt_instances", "result_instances", "InstanceEval", "coco_eval"]

LABEL_DIVISOR = 1000  # the toolkit's panoptic encoding (types.LABEL_DIVISOR), repeated to stay import-free
STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def _mask_utils() -> Any:
    from pycocotools import mask as mask_utils

    return mask_utils


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """bool/uint8 [H, W] -> COCO RLE {"size": [H, W], "counts": str} (JSON-ready)."""
    rle = _mask_utils().encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _rle_area_bbox(rle: dict[str, Any]) -> tuple[float, list[float]]:
    mask_utils = _mask_utils()
    coded = {"size": rle["size"], "counts": rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]}
    return float(mask_utils.area(coded)), [float(v) for v in mask_utils.toBbox(coded)]


def _segment_fields(segment: Any) -> tuple[int, int, bool]:
    if isinstance(segment, dict):
        return int(segment["id"]), int(segment["category_id"]), bool(segment.get("iscrowd", 0))
    return int(segment.id), int(segment.category_id), bool(getattr(segment, "iscrowd", False))


def gt_instances(ids: np.ndarray, segments: Iterable[Any], thing_ids: Iterable[int], image_id: Hashable,
                 first_id: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    """COCO instance annotations of the thing segments of one panoptic ground truth.

    `ids` is the segment-id map, `segments` its segments_info (dicts or SegmentInfo), `thing_ids` the data set's
    thing category ids. Annotation ids count from `first_id`. Segments with no pixel in the map are skipped.
    """
    things = {int(t) for t in thing_ids}
    ids = np.asarray(ids)
    out = []
    for segment in segments:
        seg_id, category_id, iscrowd = _segment_fields(segment)
        if category_id not in things:
            continue
        mask = ids == seg_id
        if not mask.any():
            continue
        rle = encode_mask(mask)
        area, bbox = _rle_area_bbox(rle)
        out.append({"id": first_id + len(out), "image_id": image_id, "category_id": category_id,
                    "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": int(iscrowd)})  # fmt: skip
    return out


def result_instances(panoptic: np.ndarray, scores: np.ndarray, category_ids: Sequence[int],
                     isthing: Sequence[bool], image_id: Hashable,
                     label_divisor: int = LABEL_DIVISOR) -> list[dict[str, Any]]:  # fmt: skip
    """COCO instance results of the thing segments of one panoptic answer in the toolkit's encoding.

    `category_ids[i]` / `isthing[i]` describe class index i; the score of segment (class, instance) is
    `scores[instance - 1]`, the score of the proposal that made it.
    """
    panoptic = np.asarray(panoptic)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    out = []
    for seg_id in np.unique(panoptic).tolist():
        class_index, instance = divmod(int(seg_id), int(label_divisor))
        class_index -= 1
        if seg_id <= 0 or instance == 0 or not 0 <= class_index < len(category_ids) or not isthing[class_index]:
            continue
        score = float(scores[instance - 1]) if instance - 1 < scores.size else 0.0
        out.append({"image_id": image_id, "category_id": int(category_ids[class_index]),
                    "segmentation": encode_mask(panoptic == seg_id), "score": round(score, 6)})  # fmt: skip
    return out


def _categories(categories: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for c in categories:
        cid, name, thing = (c["id"], c["name"], c["isthing"]) if isinstance(c, dict) else (c.id, c.name, c.isthing)
        if thing:
            out.append({"id": int(cid), "name": str(name)})
    return out


def coco_eval(images: Sequence[dict[str, Any]], categories: Sequence[dict[str, Any]], gt: Sequence[dict[str, Any]],
              results: Sequence[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """Mask AP of `results` against `gt` (COCO instance annotations) with COCOeval(iouType="segm").

    `images` are {"id", "height", "width"}, `categories` the thing categories {"id", "name"}. COCOeval's own
    printing is kept off stdout. Returns {"ap", "ap50", ..., "per_class": {id: ap}, "n_gt", "n_results"}.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    summary: dict[str, Any] = {"n_images": len(images), "n_gt": sum(1 for a in gt if not a["iscrowd"]),
                               "n_crowd": sum(1 for a in gt if a["iscrowd"]), "n_results": len(results)}  # fmt: skip
    if not categories or not summary["n_gt"]:
        return {**dict.fromkeys(STAT_NAMES), "per_class": {}, **summary,
                "note": "no thing instances in the ground truth: AP is undefined"}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": list(images), "categories": list(categories), "annotations": list(gt)}
        coco_gt.createIndex()
        coco_dt = COCO()
        dt = []
        for index, r in enumerate(results, start=1):
            area, bbox = _rle_area_bbox(r["segmentation"])
            dt.append({**r, "id": index, "area": area, "bbox": bbox, "iscrowd": 0})
        coco_dt.dataset = {"images": list(images), "categories": list(categories), "annotations": dt}
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.catIds = [c["id"] for c in categories]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats[: len(STAT_NAMES)]]
    out: dict[str, Any] = {name: (100.0 * v if v >= 0 else None) for name, v in zip(STAT_NAMES, stats, strict=True)}
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]: all areas (A=0), 100 detections (M=-1)
    per_class = {}
    for k, category in enumerate(categories):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[int(category["id"])] = 100.0 * float(values.mean()) if values.size else None
    return {**out, "per_class": per_class, **summary}


class InstanceEval:
    """Streaming collector: ground truth once per image, predictions under one or more keys (a reference and
    candidates share the converted ground truth), then `result(key)` runs COCOeval.

    `categories` are the data set's categories in the model's class-index order (objects with id / name /
    isthing, or dicts): class index i of a panoptic answer is categories[i].
    """

    def __init__(self, categories: Sequence[Any], label_divisor: int = LABEL_DIVISOR) -> None:
        self.categories = _categories(categories)
        self.category_ids = [int(c["id"] if isinstance(c, dict) else c.id) for c in categories]
        self.isthing = [bool(c["isthing"] if isinstance(c, dict) else c.isthing) for c in categories]
        self.label_divisor = int(label_divisor)
        self.images: list[dict[str, Any]] = []
        self.gt: list[dict[str, Any]] = []
        self.results: dict[str, list[dict[str, Any]]] = {}
        self._index: dict[Hashable, int] = {}

    def _image(self, image_id: Hashable, shape: tuple[int, ...]) -> int:
        if image_id not in self._index:
            self._index[image_id] = len(self.images) + 1  # COCOeval's image ids: 1..n, whatever the data set's
            self.images.append({"id": self._index[image_id], "height": int(shape[0]), "width": int(shape[1])})
        return self._index[image_id]

    def add_gt(self, image_id: Hashable, ids: np.ndarray, segments: Iterable[Any]) -> None:
        """The thing segments of one ground-truth id map."""
        index = self._image(image_id, np.shape(ids))
        thing_ids = [c["id"] for c in self.categories]
        self.gt.extend(gt_instances(ids, segments, thing_ids, index, first_id=len(self.gt) + 1))

    def add_pred(self, image_id: Hashable, panoptic: np.ndarray, scores: np.ndarray, key: str = "pred") -> None:
        """The thing segments of one panoptic answer (an image whose ground truth was added)."""
        index = self._image(image_id, np.shape(panoptic))
        found = result_instances(panoptic, scores, self.category_ids, self.isthing, index, self.label_divisor)
        self.results.setdefault(key, []).extend(found)

    def result(self, key: str = "pred") -> dict[str, Any]:
        """Mask AP of the predictions under `key` (coco_eval)."""
        return coco_eval(self.images, self.categories, self.gt, self.results.get(key, []))

    def _original(self) -> dict[int, Hashable]:
        return {index: image_id for image_id, index in self._index.items()}

    def results_json(self, key: str = "pred") -> list[dict[str, Any]]:
        """The predictions as a COCO results list with the data set's image ids (what loadRes reads)."""
        original = self._original()
        return [{**r, "image_id": original[r["image_id"]]} for r in self.results.get(key, [])]

    def gt_json(self) -> dict[str, Any]:
        """The converted ground truth as a COCO instances data set with the data set's image ids."""
        original = self._original()
        images = [{**image, "id": original[image["id"]]} for image in self.images]
        annotations = [{**a, "image_id": original[a["image_id"]]} for a in self.gt]
        return {"images": images, "categories": list(self.categories), "annotations": annotations}


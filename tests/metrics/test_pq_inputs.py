"""PQ on the real COCO sample, and the errors a malformed prediction raises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from maskconver_deploy.data.coco_panoptic import read_id_map, write_id_map
from maskconver_deploy.data.records import SegmentInfo
from maskconver_deploy.errors import UserError
from maskconver_deploy.evaluate import evaluate_folders
from maskconver_deploy.metrics.pq import PQAccumulator
from maskconver_deploy.types import Category

CATS = [Category(1, "thing", True), Category(5, "stuff", False)]


def test_real_coco_sample_against_itself(shared_data: Path) -> None:
    d = shared_data / "coco_panoptic_sample"
    result = evaluate_folders(d / "panoptic_examples.json", d / "panoptic_examples", d / "panoptic_examples.json", d / "panoptic_examples")
    pq = result["pq"]
    assert pq["all"] == {"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": 8}
    assert pq["things"]["n"] == 4 and pq["stuff"]["n"] == 4
    assert result["n_images"] == 2
    assert result["miou"]["miou"] == 100.0


def test_real_coco_sample_with_one_segment_removed(shared_data: Path, tmp_path: Path) -> None:
    """Drop one person from a prediction copy: its pixels become VOID in the prediction -> one FN."""
    d = shared_data / "coco_panoptic_sample"
    gt = json.loads((d / "panoptic_examples.json").read_text())
    pred_dir = tmp_path / "pred"
    shutil.copytree(d / "panoptic_examples", pred_dir)
    ann = gt["annotations"][0]
    victim = next(s for s in ann["segments_info"] if s["category_id"] == 1 and not s["iscrowd"])
    ann["segments_info"] = [s for s in ann["segments_info"] if s["id"] != victim["id"]]
    ids = read_id_map(pred_dir / ann["file_name"])
    ids[ids == victim["id"]] = 0
    write_id_map(pred_dir / ann["file_name"], ids, force=True)
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": gt["annotations"]}))
    result = evaluate_folders(d / "panoptic_examples.json", d / "panoptic_examples", tmp_path / "pred.json", pred_dir)
    person = result["pq"]["per_class"][1]
    assert person["fn"] == 1 and person["fp"] == 0
    assert result["pq"]["all"]["pq"] < 100.0


def _gt() -> tuple[np.ndarray, list[SegmentInfo]]:
    ids = np.full((8, 8), 50, np.int32)
    ids[2:5, 2:5] = 10
    return ids, [SegmentInfo(10, 1, False, 9), SegmentInfo(50, 5, False, 55)]


@pytest.mark.parametrize(
    ("pred_segments", "message"),
    [
        ([SegmentInfo(10, 1)], "lacks"),  # id 50 in the map, not listed
        ([SegmentInfo(10, 1), SegmentInfo(50, 5), SegmentInfo(77, 5)], "absent"),
        ([SegmentInfo(10, 3), SegmentInfo(50, 5)], "unknown category"),
        ([SegmentInfo(10, 1), SegmentInfo(10, 1), SegmentInfo(50, 5)], "duplicate"),
        ([SegmentInfo(0, 1), SegmentInfo(10, 1), SegmentInfo(50, 5)], "VOID"),
    ],
)
def test_malformed_predictions_are_user_errors(pred_segments: list[SegmentInfo], message: str) -> None:
    gt_ids, gt_segments = _gt()
    with pytest.raises(UserError, match=message):
        PQAccumulator(CATS).add(gt_ids, gt_segments, gt_ids, pred_segments)


def test_shape_mismatch_and_unlisted_ground_truth() -> None:
    gt_ids, gt_segments = _gt()
    acc = PQAccumulator(CATS)
    with pytest.raises(UserError, match="shape"):
        acc.add(gt_ids, gt_segments, gt_ids[:4], gt_segments)
    with pytest.raises(UserError, match="ground-truth map"):
        acc.add(gt_ids, gt_segments[:1], gt_ids, gt_segments)


def test_dict_segments_and_merge() -> None:
    gt_ids, gt_segments = _gt()
    a, b = PQAccumulator(CATS), PQAccumulator(CATS)
    a.add(gt_ids, gt_segments, gt_ids, [{"id": 10, "category_id": 1}, {"id": 50, "category_id": 5}])
    b.add(gt_ids, gt_segments, np.zeros_like(gt_ids), [])
    a.merge(b)
    r = a.result()
    assert r["n_images"] == 2
    assert r["per_class"][1] == {"pq": pytest.approx(200 / 3), "sq": 100.0, "rq": pytest.approx(200 / 3), "tp": 1, "fp": 0, "fn": 1}

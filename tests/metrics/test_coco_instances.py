"""COCO instances from panoptic data (metrics/coco_instances.py): the ground-truth conversion equals panopticapi's
own converter on the real COCO samples, and mask AP (pycocotools COCOeval, segm) matches hand-worked cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maskconver_deploy.data.coco_panoptic import load_panoptic_json, read_id_map
from maskconver_deploy.metrics.coco_instances import InstanceEval, gt_instances, result_instances
from maskconver_deploy.types import Category

THINGS = [Category(1, "a", True), Category(2, "b", True), Category(3, "sky", False)]  # model order: things first


def _coco_sample(shared_data: Path):
    root = shared_data / "coco_panoptic_sample"
    meta, gt = load_panoptic_json(root / "panoptic_examples.json", root / "panoptic_examples")
    assert meta is not None
    return root, meta, gt


def test_ground_truth_equals_panopticapis_detection_format(shared_data: Path) -> None:
    """Every thing segment of the 2 real images: same RLE counts, area, bbox, category and iscrowd as
    panopticapi's panoptic2detection converter wrote them (panoptic_coco_detection_format.json)."""
    root, meta, gt = _coco_sample(shared_data)
    theirs_all = json.loads((root / "panoptic_coco_detection_format.json").read_text())["annotations"]
    things = [c.id for c in meta.categories if c.isthing]
    total = crowd = 0
    for image_id, (png, segments) in gt.items():
        mine = gt_instances(read_id_map(png), segments, things, image_id)
        theirs = [a for a in theirs_all if a["image_id"] == image_id and a["category_id"] in things]
        assert len(mine) == len(theirs) > 0
        key = lambda a: (a["bbox"], a["category_id"])  # noqa: E731
        for ours, ref in zip(sorted(mine, key=key), sorted(theirs, key=key), strict=True):
            assert ours["segmentation"]["counts"] == ref["segmentation"]["counts"]
            assert ours["segmentation"]["size"] == ref["segmentation"]["size"]
            assert (ours["area"], ours["bbox"], ours["category_id"], ours["iscrowd"]) == (
                ref["area"], ref["bbox"], ref["category_id"], ref["iscrowd"])  # fmt: skip
        total += len(mine)
        crowd += sum(a["iscrowd"] for a in mine)
    assert (total, crowd) == (43, 3)  # 15 + 28 thing segments; crowd: 1 person, 1 person + 1 car (SOURCE.md)


def _as_answer(ids: np.ndarray, segments, meta, drop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth's non-crowd thing segments as a panoptic answer in the toolkit's encoding, score 0.9."""
    panoptic = np.zeros(ids.shape, np.int32)
    slot = 0
    for seg in segments:
        if not meta.category(seg.category_id).isthing or seg.iscrowd:
            continue
        if slot != drop:
            panoptic[ids == seg.id] = (meta.class_index(seg.category_id) + 1) * 1000 + slot + 1
        slot += 1
    return panoptic, np.full(max(slot, 1), 0.9, np.float32)


def test_the_ground_truth_as_prediction_scores_ap_100_on_the_real_samples(shared_data: Path) -> None:
    _, meta, gt = _coco_sample(shared_data)
    ev = InstanceEval(meta.categories)
    for image_id, (png, segments) in gt.items():
        ids = read_id_map(png)
        ev.add_gt(image_id, ids, segments)
        ev.add_pred(image_id, *_as_answer(ids, segments, meta))
        ev.add_pred(image_id, *_as_answer(ids, segments, meta, drop=0), key="one missed")
    perfect = ev.result()
    assert perfect["ap"] == pytest.approx(100.0) and perfect["ap50"] == pytest.approx(100.0)
    assert perfect["ap75"] == pytest.approx(100.0)
    assert perfect["n_gt"] == 40 and perfect["n_crowd"] == 3 and perfect["n_results"] == 40
    assert ev.result("one missed")["ap"] < 100.0


def _square(shape, top, left, side) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_ap_of_hand_worked_cases() -> None:
    """One image, two instances of class a (ids 1, 2) and a crowd region of class b (id 3).

    COCO AP interpolates precision at the 101 recall points 0, 0.01, ..., 1:
    * both found exactly: AP 100;
    * one missed: recall reaches 0.5 at precision 1, so 51 of the 101 points have precision 1: AP = 51/101;
    * one missed and a false positive of class a scored above the hit: precision 0.5 up to recall 0.5: 25.5/101;
    * a detection of class b inside the crowd region is ignored, not a false positive.
    """
    shape = (40, 40)
    ids = np.zeros(shape, np.int32)
    ids[_square(shape, 0, 0, 10)] = 1
    ids[_square(shape, 20, 20, 10)] = 2
    ids[_square(shape, 0, 25, 12)] = 3
    segments = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0},
                {"id": 3, "category_id": 2, "iscrowd": 1}]  # fmt: skip
    both = np.where(ids == 1, 1001, 0) + np.where(ids == 2, 1002, 0)
    one = np.where(ids == 1, 1001, 0)
    false_positive = one + np.where(_square(shape, 12, 0, 6), 1002, 0)  # slot 2 is a blob where nothing is
    in_crowd = both + np.where(_square(shape, 0, 25, 12), 2003, 0)
    ev = InstanceEval(THINGS)
    ev.add_gt("scene", ids, segments)
    ev.add_pred("scene", both, np.array([0.9, 0.8]), key="both")
    ev.add_pred("scene", one, np.array([0.9]), key="one")
    ev.add_pred("scene", false_positive, np.array([0.7, 0.9]), key="fp")
    ev.add_pred("scene", in_crowd, np.array([0.9, 0.8, 0.95]), key="crowd")
    assert ev.result("both")["ap"] == pytest.approx(100.0)
    assert ev.result("one")["ap"] == pytest.approx(100.0 * 51 / 101)
    assert ev.result("one")["ap50"] == pytest.approx(100.0 * 51 / 101)
    assert ev.result("fp")["ap"] == pytest.approx(100.0 * 25.5 / 101)
    assert ev.result("crowd")["ap"] == pytest.approx(100.0)
    assert ev.result("both")["per_class"] == {1: pytest.approx(100.0), 2: None}
    assert ev.result("nothing")["ap"] == pytest.approx(0.0)  # no detections at all


def test_results_take_the_proposals_score_and_skip_stuff() -> None:
    panoptic = np.array([[0, 1003, 3000], [2001, 1003, 3000]], np.int32)  # a slot 3, b slot 1, sky (stuff)
    found = result_instances(panoptic, np.array([0.5, 0.2, 0.7]), [1, 2, 3], [True, True, False], 7)
    assert sorted((r["category_id"], r["score"]) for r in found) == [(1, 0.7), (2, 0.5)]
    assert all(r["image_id"] == 7 and r["segmentation"]["size"] == [2, 3] for r in found)


def test_no_thing_instances_is_undefined_not_zero() -> None:
    ev = InstanceEval(THINGS)
    ids = np.full((8, 8), 5, np.int32)
    ev.add_gt(1, ids, [{"id": 5, "category_id": 3, "iscrowd": 0}])
    ev.add_pred(1, np.full((8, 8), 3000, np.int32), np.array([0.9]))
    result = ev.result()
    assert result["ap"] is None and result["n_gt"] == 0 and "undefined" in result["note"]

"""PQ against an independent evaluator: cityscapesscripts' COCO-panoptic evaluation (a separate implementation
of the reference rules), on generated cases written to disk in the COCO-panoptic format it reads."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from maskconver_deploy.evaluate import evaluate_folders
from maskconver_deploy.metrics.pq import PQAccumulator
from maskconver_deploy.types import Category

from tests.conftest import require_runtime

require_runtime("cityscapesscripts", "cityscapesscripts (the independent PQ evaluator)", 'pip install -e ".[dev]"',
                module_level=True)
oracle = importlib.import_module("cityscapesscripts.evaluation.evalPanopticSemanticLabeling")

CATEGORIES = [
    Category(1, "a", True),
    Category(2, "b", True),
    Category(3, "c", True),
    Category(7, "s1", False),
    Category(8, "s2", False),
    Category(0, "s0", False),  # category id 0 is legal (Cityscapes trainId road)
]
THINGS = [c.id for c in CATEGORIES if c.isthing]
STUFF = [c.id for c in CATEGORIES if not c.isthing]

Case = tuple[np.ndarray, list[dict[str, Any]], np.ndarray, list[dict[str, Any]]]


# ----------------------------------------------------------------------------------------------- helpers


def _png(path: Path, ids: np.ndarray) -> None:
    ids = ids.astype(np.int64)
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _segments(ids: np.ndarray, category_of: dict[int, int], crowd: set[int] = frozenset()) -> list[dict[str, Any]]:
    values, counts = np.unique(ids, return_counts=True)
    return [
        {"id": int(v), "category_id": category_of[int(v)], "iscrowd": int(int(v) in crowd), "area": int(c)}
        for v, c in zip(values.tolist(), counts.tolist())
        if v != 0
    ]


def _write(tmp: Path, cases: list[Case]) -> tuple[Path, Path, Path, Path]:
    gt_dir, pred_dir = tmp / "gt", tmp / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt_anns, pred_anns, images = [], [], []
    for i, (gt_ids, gt_segs, pred_ids, pred_segs) in enumerate(cases):
        name = f"{i:04d}.png"
        _png(gt_dir / name, gt_ids)
        _png(pred_dir / name, pred_ids)
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "height": gt_ids.shape[0], "width": gt_ids.shape[1]})
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gt_segs})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": [{"id": s["id"], "category_id": s["category_id"]} for s in pred_segs]})
    cats = [c.to_dict() for c in CATEGORIES]
    gt_json, pred_json = tmp / "gt.json", tmp / "pred.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": cats}))
    pred_json.write_text(json.dumps({"annotations": pred_anns}))
    return gt_json, gt_dir, pred_json, pred_dir


def _oracle(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict[str, Any]:
    """The independent evaluator, single process (its multi-process wrapper only splits the image list)."""
    gt = json.loads(gt_json.read_text())
    pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    categories = {c["id"]: c for c in gt["categories"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stat = oracle.pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), categories)
    out: dict[str, Any] = {}
    for name, isthing in (("all", None), ("things", True), ("stuff", False)):
        try:
            out[name], _ = stat.pq_average(categories, isthing=isthing)
        except ZeroDivisionError:  # the reference divides by n; an empty group is n = 0
            out[name] = {"n": 0}
    out["per_class"] = {cid: stat.pq_per_cat[cid] for cid in categories}
    return out


def _compare(mine: dict[str, Any], ref: dict[str, Any]) -> None:
    for group in ("all", "things", "stuff"):
        assert mine[group]["n"] == ref[group]["n"], group
        if ref[group]["n"]:
            for key in ("pq", "sq", "rq"):
                assert mine[group][key] == pytest.approx(100.0 * ref[group][key], abs=1e-9), (group, key)
    for cid, stat in ref["per_class"].items():
        got = mine["per_class"][cid]
        assert (got["tp"], got["fp"], got["fn"]) == (stat.tp, stat.fp, stat.fn), cid


def _both(tmp_path: Path, cases: list[Case]) -> tuple[dict[str, Any], dict[str, Any]]:
    paths = _write(tmp_path, cases)
    acc = PQAccumulator(CATEGORIES)
    for gt_ids, gt_segs, pred_ids, pred_segs in cases:
        acc.add(gt_ids, gt_segs, pred_ids, pred_segs)
    mine = acc.result()
    ref = _oracle(*paths)
    _compare(mine, ref)
    folders = evaluate_folders(*paths)["pq"]  # the file path through our own readers agrees too
    _compare(folders, ref)
    return mine, ref


# ----------------------------------------------------------------------------------------------- random scenes


def _random_case(rng: np.random.Generator, h: int = 40, w: int = 56) -> Case:
    gt = np.zeros((h, w), np.int64)
    category_of: dict[int, int] = {}
    crowd: set[int] = set()
    # stuff bands (a repeated class stays one segment)
    cuts = np.sort(rng.choice(np.arange(6, w - 6), size=int(rng.integers(1, 3)), replace=False))
    bounds = [0, *cuts.tolist(), w]
    for k in range(len(bounds) - 1):
        cat = int(rng.choice(STUFF))
        seg = 100 + cat
        category_of[seg] = cat
        gt[:, bounds[k] : bounds[k + 1]] = seg
    # things, later ones occlude earlier ones; some crowd
    next_id = 1000
    for _ in range(int(rng.integers(0, 7))):
        cat = int(rng.choice(THINGS))
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        hh, ww = int(rng.integers(3, 16)), int(rng.integers(3, 16))
        next_id += int(rng.integers(1, 50))
        gt[y : y + hh, x : x + ww] = next_id
        category_of[next_id] = cat
        if rng.random() < 0.2:
            crowd.add(next_id)
    if rng.random() < 0.5:  # VOID
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        gt[y : y + int(rng.integers(2, 12)), x : x + int(rng.integers(2, 12))] = 0

    # prediction: a perturbed copy with fresh ids
    pred = np.zeros_like(gt)
    pred_cat: dict[int, int] = {}
    for seg in np.unique(gt).tolist():
        if seg == 0 and rng.random() < 0.5:
            continue
        mask = gt == seg
        if rng.random() < 0.15:
            continue  # missed (pixels stay VOID)
        dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
        mask = np.roll(np.roll(mask, dy, 0), dx, 1)
        cat = category_of.get(seg, int(rng.choice(STUFF)))
        if rng.random() < 0.1:
            cat = int(rng.choice([c.id for c in CATEGORIES]))
        new = int(rng.integers(1, 256**3 - 2))
        pred[mask] = new
        pred_cat[new] = cat
        if rng.random() < 0.15:  # split off a part as a second segment of the same class
            part = mask & (np.arange(w)[None, :] < int(rng.integers(0, w)))
            other = new + 1
            pred[part] = other
            pred_cat[other] = cat
    for _ in range(int(rng.integers(0, 3))):  # extra false detections
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        new = int(rng.integers(1, 256**3 - 2))
        pred[y : y + int(rng.integers(2, 10)), x : x + int(rng.integers(2, 10))] = new
        pred_cat[new] = int(rng.choice([c.id for c in CATEGORIES]))
    gt_segs = _segments(gt, category_of, crowd)
    pred_segs = _segments(pred, pred_cat)
    return gt.astype(np.int32), gt_segs, pred.astype(np.int32), pred_segs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_scenes_many_images(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cases = [_random_case(rng) for _ in range(25)]
    mine, _ = _both(tmp_path, cases)
    counts = [mine["per_class"][c.id] for c in CATEGORIES]
    assert sum(c["tp"] for c in counts) > 0 and sum(c["fp"] for c in counts) > 0 and sum(c["fn"] for c in counts) > 0


# ----------------------------------------------------------------------------------------------- rule cases


def _block(h: int, w: int, value: int, y0: int, y1: int, x0: int, x1: int, base: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros((h, w), np.int32) if base is None else base.copy()
    out[y0:y1, x0:x1] = value
    return out


def test_iou_exactly_half_is_not_a_match_and_just_above_is(tmp_path: Path) -> None:
    gt = _block(20, 20, 5, 0, 10, 0, 10)  # thing of 100 px on VOID
    gt_segs = [{"id": 5, "category_id": 1, "iscrowd": 0, "area": 100}]
    half = _block(20, 20, 9, 0, 10, 0, 5)  # 50 px inside: IoU = 50 / 100 = 0.5
    above = half.copy()
    above[0, 5] = 9  # 51 px inside: IoU 0.51
    # VOID enters the union: 50 px inside + 10 px on VOID -> IoU = 50 / (100 + 60 - 50 - 10) = 0.5
    void_half = _block(20, 20, 9, 10, 11, 0, 10, base=half)
    cases = [
        (gt, gt_segs, half, [{"id": 9, "category_id": 1}]),
        (gt, gt_segs, above, [{"id": 9, "category_id": 1}]),
        (gt, gt_segs, void_half, [{"id": 9, "category_id": 1}]),
    ]
    mine, _ = _both(tmp_path, cases)
    assert (mine["per_class"][1]["tp"], mine["per_class"][1]["fn"]) == (1, 2)
    assert mine["per_class"][1]["sq"] == pytest.approx(51.0)


def test_void_and_crowd_rules(tmp_path: Path) -> None:
    h, w = 30, 30
    gt = np.full((h, w), 700, np.int32)  # stuff 7
    gt[0:10, 0:10] = 11  # crowd of class 1
    gt[20:30, 20:30] = 0  # VOID
    gt[12:18, 12:18] = 12  # a thing of class 2
    gt_segs = _segments(gt, {700: 7, 11: 1, 12: 2}, crowd={11})
    pred = np.full((h, w), 1, np.int32)  # stuff 7 prediction
    pred[0:10, 0:6] = 2  # class 1, all on the same-class crowd: ignored
    pred[0:10, 6:10] = 3  # class 2 on the class-1 crowd: an FP
    pred[20:30, 20:26] = 4  # class 3 mostly on VOID: ignored
    pred[16:24, 16:24] = 5  # class 3, 16 of its 64 px on VOID: an FP
    pred[12:16, 12:16] = 6  # class 2: IoU 16/36 < 0.5 -> FP and the thing is an FN
    pred_segs = [{"id": 1, "category_id": 7}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 2},
                 {"id": 4, "category_id": 3}, {"id": 5, "category_id": 3}, {"id": 6, "category_id": 2}]
    mine, _ = _both(tmp_path, [(gt, gt_segs, pred, pred_segs)])
    assert (mine["per_class"][1]["fp"], mine["per_class"][1]["fn"]) == (0, 0)
    assert mine["per_class"][2]["fp"] == 2 and mine["per_class"][2]["fn"] == 1
    assert mine["per_class"][3]["fp"] == 1


def test_two_crowd_regions_of_one_class_use_the_last_listed(tmp_path: Path) -> None:
    gt = np.full((20, 20), 700, np.int32)
    gt[0:8, 0:8] = 21
    gt[12:20, 12:20] = 22
    segs = _segments(gt, {700: 7, 21: 1, 22: 1}, crowd={21, 22})
    pred = np.full((20, 20), 1, np.int32)
    pred[0:8, 0:8] = 2  # on the first crowd region (not the one the rule uses) -> FP
    pred[12:20, 12:20] = 3  # on the last one -> ignored
    pred_segs = [{"id": 1, "category_id": 7}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 1}]
    mine, _ = _both(tmp_path, [(gt, segs, pred, pred_segs)])
    assert mine["per_class"][1]["fp"] == 1


def test_empty_predictions_and_empty_groups(tmp_path: Path) -> None:
    gt = np.full((16, 16), 700, np.int32)
    gt[2:8, 2:8] = 31
    gt_segs = _segments(gt, {700: 7, 31: 3})
    empty = np.zeros_like(gt)
    only_stuff = np.full((16, 16), 800, np.int32)  # stuff only: the thing group has n = 1 from the FN
    cases = [(gt, gt_segs, empty, []), (np.full((16, 16), 800, np.int32), _segments(only_stuff, {800: 8}), only_stuff, [{"id": 800, "category_id": 8}])]
    mine, _ = _both(tmp_path, cases)
    assert mine["per_class"][7]["fn"] == 1 and mine["per_class"][3]["fn"] == 1
    assert mine["per_class"][8]["pq"] == pytest.approx(100.0)
    assert mine["all"]["n"] == 3


def test_stuff_only_data_has_no_thing_group(tmp_path: Path) -> None:
    gt = np.full((8, 8), 800, np.int32)
    segs = _segments(gt, {800: 8})
    mine, ref = _both(tmp_path, [(gt, segs, gt, [{"id": 800, "category_id": 8}])])
    assert mine["things"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0} and ref["things"]["n"] == 0


def test_real_cityscapes_style_sample_matches_the_reference(shared_data: Path) -> None:
    d = shared_data / "deeplab2_testdata"
    paths = (
        d / "derived" / "cityscapes_panoptic_dummy_trainId_coco.json",
        d / "gtFine" / "cityscapes_panoptic_dummy_trainId",
        d / "derived" / "pred_from_original_ids.json",
        d / "derived" / "pred_from_original_ids",
    )
    ref = _oracle(*paths)
    mine = evaluate_folders(*paths)["pq"]
    _compare(mine, ref)
    assert mine["all"]["n"] == 5
    assert round(mine["all"]["pq"], 2) == 93.29

"""Target generation: thing/stuff centers, islands vs global, crowd, heatmap peaks, padding."""

from __future__ import annotations

import numpy as np
import pytest

from maskconver_deploy.model.specs import get_preset
from maskconver_deploy.training.targets import (
    TargetSegment,
    build_targets,
    gaussian_radius,
    gaussian_sigma,
    stuff_rule,
)

SPEC = get_preset("shapes-256")  # 9 classes, 5 things, 256x256, max_instances 50, k = 3
H = W = 256


def _peak_yx(position: int, width: int = W // 8) -> tuple[int, int]:
    return divmod(int(position), width)


def test_stuff_rule_scales_with_input_size():
    assert stuff_rule((640, 640)) == (21, 1024)
    kernel, area = stuff_rule((256, 256))
    assert kernel == 9 and kernel % 2 == 1
    assert area == round(1024 * 256 * 256 / 640**2)


# CenterNet's three roots for min IoU 0.7, worked by hand on stride-8 boxes (h, w), each root divided by 2:
#   r1 = (b1 + sqrt(b1^2 - 4 c1)) / 2,        b1 = h + w,             c1 = w h 0.3 / 1.7
#   r2 = (b2 + sqrt(b2^2 - 16 c2)) / 2,       b2 = 2 (h + w),         c2 = 0.3 w h
#   r3 = (b3 + sqrt(b3^2 - 4 a3 c3)) / 2,     b3 = -2 0.7 (h + w),    a3 = 2.8, c3 = -0.3 w h
# 10 x 10: r1 = (20 + sqrt(400 - 70.588)) / 2 = 19.0749; r2 = (40 + sqrt(1600 - 480)) / 2 = 36.7332;
#          r3 = (-28 + sqrt(784 + 336)) / 2 = (-28 + 33.4664) / 2 = 2.7332 -> floor 2, sigma 5/6
# 4 x 2:   r1 = (6 + sqrt(36 - 5.6471)) / 2 = 5.7547; r2 = (12 + sqrt(144 - 38.4)) / 2 = 11.1381;
#          r3 = (-8.4 + sqrt(70.56 + 26.88)) / 2 = (-8.4 + 9.8712) / 2 = 0.7356 -> floor 0, sigma 1/6
# 3.5 x 5.25: r3 = (-12.25 + sqrt(150.0625 + 61.74)) / 2 = (-12.25 + 14.5534) / 2 = 1.1517 -> floor 1, sigma 1/2
# (r1 = 8.3622, r2 = 16.1333 there). The smallest root is r3 in every case.
@pytest.mark.parametrize(
    "h, w, radius, sigma",
    [(10.0, 10.0, 2.7332, 5 / 6), (4.0, 2.0, 0.7356, 1 / 6), (3.5, 5.25, 1.1517, 0.5)],
)
def test_gaussian_radius_matches_centernet_roots(h, w, radius, sigma):
    assert gaussian_radius(h, w) == pytest.approx(radius, abs=1e-4)
    assert gaussian_radius(w, h) == pytest.approx(radius, abs=1e-4)  # symmetric in h and w
    assert gaussian_sigma(h, w) == pytest.approx(sigma)


def test_touching_same_class_neighbours_keep_separate_peaks():
    """Two 32x32 things of one class side by side (centers 4 cells apart): the target between them stays low."""
    ids = np.zeros((H, W), np.int32)
    ids[64:96, 64:96] = 1
    ids[64:96, 96:128] = 2
    t = build_targets(ids, [TargetSegment(1, 0, True), TargetSegment(2, 0, True)], SPEC)
    (y1, x1), (y2, x2) = (_peak_yx(p) for p in t["positions"][:2])
    assert y1 == y2 and x2 - x1 == 4
    assert t["heatmap"][0, y1, (x1 + x2) // 2] < 0.5


def test_thing_center_is_box_center_of_mask():
    ids = np.zeros((H, W), np.int32)
    # an L-shaped instance: its box is rows 40..103, cols 20..139, whatever its centroid
    ids[40:104, 20:36] = 7
    ids[88:104, 20:140] = 7
    t = build_targets(ids, [TargetSegment(7, 2, True)], SPEC)
    assert int(t["num_instances"]) == 1
    assert t["classes"][0] == 2
    yc, xc = (40 + 103) / 2, (20 + 139) / 2
    assert _peak_yx(t["positions"][0]) == (int(yc // 8), int(xc // 8))
    assert np.array_equal(t["masks"][0].astype(bool), ids == 7)
    # heatmap: exactly 1 at the center pixel of the right class, below 1 elsewhere
    hm = t["heatmap"]
    py, px = _peak_yx(t["positions"][0])
    assert hm[2, py, px] == 1.0
    assert (hm[2] == 1.0).sum() == 1
    assert hm.shape == (SPEC.num_classes, H // 8, W // 8)
    assert np.all(np.delete(hm, 2, axis=0) == 0)


def test_heatmap_is_per_class_max_of_gaussians():
    ids = np.zeros((H, W), np.int32)
    ids[0:32, 0:32] = 1
    ids[0:32, 64:96] = 2
    t = build_targets(ids, [TargetSegment(1, 0, True), TargetSegment(2, 0, True)], SPEC)
    hm = t["heatmap"][0]
    peaks = [_peak_yx(p) for p in t["positions"][:2]]
    for py, px in peaks:
        assert hm[py, px] == 1.0
    assert 0.0 < hm[2, 5] < 1.0  # between the two peaks, a value from the Gaussians
    assert hm.max() == 1.0 and hm.min() >= 0.0


def _two_blob_stuff() -> np.ndarray:
    ids = np.zeros((H, W), np.int32)
    ids[0:100, 0:100] = 50  # island A: 10000 px
    ids[200:256, 200:256] = 50  # island B: 3136 px, far from A (not merged by the dilation)
    ids[200:210, 0:10] = 50  # island C: 100 px, below the minimum area (164 px at 256)
    ids[100:102, 100:102] = 50  # 4 px, touching A after dilation: merged into A's component
    return ids


def test_stuff_islands_k_largest_with_min_area_and_whole_class_mask():
    ids = _two_blob_stuff()
    seg = [TargetSegment(50, 6, False)]
    t = build_targets(ids, seg, SPEC, stuff_mode="islands")
    assert int(t["num_instances"]) == 2  # C dropped by area
    assert list(t["classes"][:3]) == [6, 6, -1]
    # first island: A plus the merged speck -> box rows 0..101, cols 0..101
    assert _peak_yx(t["positions"][0]) == (int(50.5 // 8), int(50.5 // 8))
    assert _peak_yx(t["positions"][1]) == (int(227.5 // 8), int(227.5 // 8))
    for i in range(2):  # the GT mask of every stuff center is the whole class mask
        assert np.array_equal(t["masks"][i].astype(bool), ids == 50)


def test_stuff_islands_keep_only_k():
    spec = SPEC.with_changes(max_stuff_islands=1)
    t = build_targets(_two_blob_stuff(), [TargetSegment(50, 6, False)], spec, stuff_mode="islands")
    assert int(t["num_instances"]) == 1
    assert _peak_yx(t["positions"][0]) == (int(50.5 // 8), int(50.5 // 8))


def test_stuff_global_one_center_from_class_box():
    ids = _two_blob_stuff()
    t = build_targets(ids, [TargetSegment(50, 6, False)], SPEC, stuff_mode="global")
    assert int(t["num_instances"]) == 1
    assert _peak_yx(t["positions"][0]) == (int(127.5 // 8), int(127.5 // 8))
    assert np.array_equal(t["masks"][0].astype(bool), ids == 50)


def test_crowd_segments_are_skipped():
    ids = np.zeros((H, W), np.int32)
    ids[10:60, 10:60] = 3
    ids[100:150, 100:150] = 4
    ids[150:250, 0:100] = 9
    segs = [TargetSegment(3, 1, True), TargetSegment(4, 1, True, iscrowd=True), TargetSegment(9, 7, False, iscrowd=True)]
    t = build_targets(ids, segs, SPEC)
    assert int(t["num_instances"]) == 1
    assert t["classes"][0] == 1
    assert t["heatmap"][7].max() == 0.0
    assert t["heatmap"][1].max() == 1.0 and (t["heatmap"][1] == 1.0).sum() == 1


def test_padding_and_slot_clip():
    spec = SPEC.with_changes(max_instances=4)
    ids = np.zeros((64, 64), np.int32)
    segs = []
    for i in range(6):  # six things in a row, plus one stuff region
        ids[2:10, 2 + 10 * i : 10 + 10 * i] = i + 1
        segs.append(TargetSegment(i + 1, i % 5, True))
    ids[30:64, :] = 99
    segs.append(TargetSegment(99, 5, False))
    padding = np.zeros((64, 64), bool)
    padding[:, 56:] = True
    t = build_targets(ids, segs, spec, padding=padding, reference_size=(64, 64))
    assert t["classes"].shape == (4,) and t["masks"].shape == (4, 64, 64)
    assert int(t["num_instances"]) == 4
    assert list(t["classes"]) == [0, 1, 2, 3]  # things first; stuff clipped from the end
    assert t["heatmap"][5].max() == 1.0  # the heatmap still holds every center
    assert t["pixel_valid"][:, 56:].sum() == 0 and t["pixel_valid"][:, :56].all()
    empty = build_targets(np.zeros((64, 64), np.int32), [], spec)
    assert int(empty["num_instances"]) == 0
    assert np.all(empty["classes"] == -1) and np.all(empty["valid"] == 0) and np.all(empty["positions"] == 0)
    assert empty["heatmap"].max() == 0


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        build_targets(np.zeros((60, 64), np.int32), [], SPEC)
    with pytest.raises(ValueError):
        build_targets(np.zeros((64, 64), np.int32), [], SPEC, stuff_mode="center")

"""metrics/agreement.py on hand-made outputs: tensor errors, the elementwise rule, segment matching, top-N sets."""

from __future__ import annotations

import numpy as np
import pytest

from maskconver_deploy.metrics.agreement import (
    DecisionStats,
    TensorStats,
    align_proposals,
    compare_tensors,
    elementwise_failures,
    image_agreement,
    match_segments,
)
from maskconver_deploy.types import LABEL_DIVISOR, PanopticOutput


def _answer(panoptic: np.ndarray, keys: list[tuple[int, int, int]], scores: list[float]) -> PanopticOutput:
    return PanopticOutput(
        panoptic=np.asarray(panoptic, dtype=np.int32),
        scores=np.asarray(scores, dtype=np.float32),
        classes=np.asarray([k[2] for k in keys], dtype=np.int32),
        centers=np.asarray([[k[0], k[1]] for k in keys], dtype=np.int32).reshape(-1, 2),
    )


def thing(cls: int, slot: int) -> int:
    return (cls + 1) * LABEL_DIVISOR + slot + 1


def stuff(cls: int) -> int:
    return (cls + 1) * LABEL_DIVISOR


def test_elementwise_rule_needs_both_tolerances_exceeded_and_nan_fails() -> None:
    ref = np.array([100.0, 1e-6, 1.0, 1.0, np.inf, 2.0])
    cand = np.array([100.005, 5e-5, 1.1, np.nan, np.inf, -np.inf])
    failed = elementwise_failures(cand, ref, atol=1e-4, rtol=1e-4)
    # 100.005: abs 5e-3 > atol but rel 5e-5 < rtol -> passes; 5e-5 vs 1e-6: abs 4.9e-5 < atol -> passes
    assert failed.tolist() == [False, False, True, True, False, True]


def test_tensor_stats_numbers() -> None:
    ref = np.array([[1.0, -2.0], [0.0, 4.0]], dtype=np.float32)
    cand = np.array([[1.5, -2.0], [0.25, 4.0]], dtype=np.float32)
    result = compare_tensors(cand, ref, atol=0.1, rtol=0.1)
    assert result["max_abs_err"] == pytest.approx(0.5)
    assert result["max_rel_err"] == pytest.approx(0.5)  # 0.5 / 1.0; the element with ref 0 is left out
    expected_cos = float(np.dot(cand.ravel(), ref.ravel()) / (np.linalg.norm(cand) * np.linalg.norm(ref)))
    assert result["cosine"] == pytest.approx(expected_cos)
    assert result["failed_elements"] == 2 and not result["within_tolerance"]
    assert compare_tensors(ref, ref)["cosine"] == pytest.approx(1.0)
    assert compare_tensors(ref, ref)["within_tolerance"]


def test_tensor_stats_accumulate_over_images() -> None:
    stats = TensorStats(atol=1e-3, rtol=1e-3)
    a = np.ones((3, 3))
    stats.add(a, a)
    stats.add(-a, a)  # opposite direction: this image's cosine is -1
    out = stats.result()
    assert out["min_image_cosine"] == pytest.approx(-1.0)
    assert out["cosine"] == pytest.approx(0.0)
    assert out["elements"] == 18 and out["failed_elements"] == 9
    assert out["max_abs_err"] == pytest.approx(2.0)


def test_segments_match_across_slot_renumbering_but_not_across_classes() -> None:
    ref = np.zeros((10, 10), dtype=np.int32)
    ref[:5] = thing(0, 0)
    ref[5:, :5] = stuff(3)
    cand = np.zeros_like(ref)
    cand[:5] = thing(0, 4)  # the same object in another proposal slot
    cand[5:, :5] = stuff(2)  # the same pixels, another class
    matches = match_segments(ref, cand)
    assert matches == [(thing(0, 0), thing(0, 4), 1.0)]


def test_iou_of_exactly_half_is_not_a_match() -> None:
    ref = np.zeros((4, 4), dtype=np.int32)
    ref[:, :2] = thing(1, 0)  # 8 pixels
    cand = np.zeros_like(ref)
    cand[:, :3] = thing(1, 0)  # 12 pixels; IoU 8 / 12 = 0.67: a match
    assert len(match_segments(ref, cand)) == 1
    cand = np.zeros_like(ref)
    cand[:2, :] = thing(1, 0)  # IoU 4 / 12 = 0.33
    assert match_segments(ref, cand) == []
    cand = np.zeros_like(ref)
    cand[:, 1:4] = thing(1, 0)  # inter 4, union 8 + 12 - 4 = 16: IoU 0.25
    assert match_segments(ref, cand) == []
    ref = np.zeros((2, 4), dtype=np.int32)
    ref[:, :2] = thing(1, 0)  # 4 pixels
    cand = np.full_like(ref, thing(1, 0))  # 8 pixels: IoU exactly 0.5
    assert match_segments(ref, cand) == []


def test_image_agreement_counts_pixels_segments_and_proposals() -> None:
    ref = np.zeros((10, 10), dtype=np.int32)
    ref[:5] = thing(0, 0)
    ref[5:] = stuff(3)
    cand = ref.copy()
    cand[ref == thing(0, 0)] = thing(0, 1)  # slots swapped: proposals 0 and 1 tie and reorder
    cand[9, :] = 0  # ten pixels become VOID
    keys = [(1, 1, 0), (2, 2, 3), (3, 3, 1)]
    reference = _answer(ref, keys, [0.9, 0.9, 0.005])
    candidate = _answer(cand, [keys[1], keys[0], keys[2]], [0.9, 0.9, 0.2])
    one = image_agreement(candidate, reference, threshold=0.01)
    assert one.pixel_agreement == pytest.approx(90.0)
    assert one.category_agreement == pytest.approx(90.0)
    assert len(one.matches) == 2
    assert (one.proposals_reference, one.proposals_candidate, one.proposals_matched) == (2, 3, 2)
    assert one.proposals_same_rank == 0  # a set match, not an order match

    stats = DecisionStats(threshold=0.01)
    stats.add(reference, reference, image="a")
    stats.add(candidate, reference, image="b")
    out = stats.result()
    assert out["pixel_agreement"] == pytest.approx(95.0)
    assert out["worst_image"] == "b" and out["min_image_pixel_agreement"] == pytest.approx(90.0)
    assert out["topn_matched"] == 4 and out["topn_match"] == pytest.approx(100.0 * 4 / 5)
    assert out["segments_matched"] == 4 and out["matched_segment_iou"] == pytest.approx((1 + 1 + 1 + 40 / 50) / 4)


def test_category_agreement_differs_from_segment_agreement() -> None:
    ref = np.zeros((4, 4), dtype=np.int32)
    ref[:, :2] = thing(0, 0)
    ref[:, 2:] = thing(0, 1)
    cand = np.full_like(ref, thing(0, 0))  # the two objects merged into one: same class everywhere
    answer = _answer(ref, [(0, 0, 0)], [0.5])
    one = image_agreement(_answer(cand, [(0, 0, 0)], [0.5]), answer)
    assert one.category_agreement == pytest.approx(100.0)
    assert one.pixel_agreement == pytest.approx(0.0)  # IoU of each with the merged one is 0.5: no match


def test_align_proposals_pairs_equal_keys() -> None:
    ref = [(0, 0, 1), (1, 1, 2), (5, 5, 0)]
    cand = [(1, 1, 2), (9, 9, 9), (0, 0, 1)]
    assert align_proposals(ref, cand) == ([0, 1], [2, 0])

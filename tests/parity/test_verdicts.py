"""The verdict rule of each precision: every floor can fail on its own, and unlabelled data is judged against the
reference's answers (never "PQ 0 = PQ 0")."""

from __future__ import annotations

import pytest

from maskconver_deploy.parity import TOLERANCES, judge


def _numbers(precision: str) -> tuple[dict, dict]:
    """Decision and metric numbers exactly at the floors of `precision` (they pass)."""
    tol = TOLERANCES[precision]
    decision = {"pixel_agreement": tol["min_pixel_agreement"], "topn_match": tol["min_topn_match"]}
    delta = 0.0 if tol["strict"] else tol["max_abs_delta_pq"]
    return decision, {"labelled": True, "delta_pq": -delta, "pq_vs_reference": 100.0}


@pytest.mark.parametrize("precision", sorted(TOLERANCES))
def test_at_the_floors_passes_and_each_floor_fails_alone(precision: str) -> None:
    decision, metric = _numbers(precision)
    assert judge(precision, decision, metric)[0] == "pass"
    for key in ("pixel_agreement", "topn_match"):
        worse = {**decision, key: decision[key] - 0.01}
        verdict, reason = judge(precision, worse, metric)
        assert verdict == "fail" and ("pixel" in reason if key == "pixel_agreement" else "top-N" in reason), reason
    limit = TOLERANCES[precision]["max_abs_delta_pq"]
    verdict, reason = judge(precision, decision, {**metric, "delta_pq": -(limit + 0.01)})
    assert verdict == "fail" and "|ΔPQ|" in reason


@pytest.mark.parametrize("precision", sorted(TOLERANCES))
def test_unlabelled_data_is_judged_against_the_reference(precision: str) -> None:
    decision, _ = _numbers(precision)
    gap = TOLERANCES[precision]["max_pq_gap_unlabelled"]
    unlabelled = {"labelled": False, "delta_pq": 0.0, "pq": 0.0, "pq_reference": 0.0}
    verdict, reason = judge(precision, decision, {**unlabelled, "pq_vs_reference": 100.0})
    assert verdict == "pass" and "reference's answers" in reason
    verdict, reason = judge(precision, decision, {**unlabelled, "pq_vs_reference": 100.0 - gap - 0.01})
    assert verdict == "fail" and "reference's answers" in reason  # ΔPQ 0 (PQ 0 = PQ 0) does not pass it


def test_reduced_precisions_are_looser_than_fp32_but_have_agreement_floors() -> None:
    fp32 = TOLERANCES["fp32"]
    for precision in ("fp16", "bf16", "int8", "int8-static", "int8-dynamic"):
        tol = TOLERANCES[precision]
        assert 50.0 < tol["min_pixel_agreement"] < fp32["min_pixel_agreement"]
        assert 0.0 < tol["min_topn_match"] < fp32["min_topn_match"]
    assert TOLERANCES["fp16"]["max_abs_delta_pq"] == 0.5 and TOLERANCES["int8"]["max_abs_delta_pq"] == 1.0


def test_fp32_needs_an_exact_merge_check_when_one_ran() -> None:
    decision, metric = _numbers("fp32")
    check = {"available": True, "pixels": 65536, "pixels_differ": 0}
    verdict, reason = judge("fp32", {**decision, "merge_check": check}, metric)
    assert verdict == "pass" and "merge check: 0 of 65,536" in reason
    verdict, reason = judge("fp32", {**decision, "merge_check": {**check, "pixels_differ": 1}}, metric)
    assert verdict == "fail" and "merge check: 1 of 65,536 pixels differ" in reason
    unavailable = {"available": False, "reason": "no raw graph"}  # nothing to judge: the other floors decide
    assert judge("fp32", {**decision, "merge_check": unavailable}, metric)[0] == "pass"
    fp16_decision, fp16_metric = _numbers("fp16")  # reduced precisions report the check, it is not a floor
    assert judge("fp16", {**fp16_decision, "merge_check": {**check, "pixels_differ": 5}}, fp16_metric)[0] == "pass"

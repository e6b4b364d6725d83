"""Semantic mIoU from the confusion matrix, checked against a direct per-class count."""

from __future__ import annotations

import numpy as np
import pytest

from maskconver_deploy.errors import UserError
from maskconver_deploy.metrics.miou import MIoUAccumulator


def _direct(gts: list[np.ndarray], preds: list[np.ndarray], c: int) -> list[float | None]:
    out: list[float | None] = []
    for k in range(c):
        inter = union = 0
        for g, p in zip(gts, preds):
            labelled = g >= 0
            inter += int(((g == k) & (p == k)).sum())
            union += int((((g == k) | (p == k)) & labelled).sum())
        out.append(100.0 * inter / union if union else None)
    return out


def test_matches_direct_count_with_void() -> None:
    rng = np.random.default_rng(0)
    c = 4
    gts = [rng.integers(-1, c, (12, 9)) for _ in range(5)]
    preds = [rng.integers(-1, c, (12, 9)) for _ in range(5)]
    acc = MIoUAccumulator(c)
    for g, p in zip(gts, preds):
        acc.add(g, p)
    result = acc.result()
    expected = _direct(gts, preds, c)
    assert result["per_class"] == pytest.approx(expected)
    assert result["miou"] == pytest.approx(float(np.mean([e for e in expected if e is not None])))


def test_absent_class_is_excluded_and_void_prediction_hurts() -> None:
    gt = np.array([[0, 0, 1, -1]])
    pred = np.array([[0, -1, 1, 2]])  # class 2 only on GT VOID: not counted anywhere
    acc = MIoUAccumulator(3)
    acc.add(gt, pred)
    r = acc.result()
    assert r["per_class"] == [50.0, 100.0, None]
    assert r["n"] == 2 and r["miou"] == 75.0
    assert r["pixel_accuracy"] == pytest.approx(200 / 3)


def test_bad_inputs() -> None:
    acc = MIoUAccumulator(2)
    with pytest.raises(UserError, match="shape"):
        acc.add(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(UserError, match="class 5"):
        acc.add(np.zeros((2, 2), int), np.full((2, 2), 5))
    with pytest.raises(UserError, match="integer"):
        acc.add(np.zeros((2, 2)), np.zeros((2, 2), int))

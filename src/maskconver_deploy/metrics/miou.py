"""Semantic mIoU from a confusion matrix over category maps (class index per pixel, negative = VOID).

Ground-truth VOID pixels are ignored. A prediction's VOID on a labelled pixel counts against that pixel's
class (a false negative; it is never a true positive). IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU averages
the classes with TP + FP + FN > 0 (`n`). Results are in percent (0-100).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maskconver_deploy.errors import UserError

__all__ = ["MIoUAccumulator"]


class MIoUAccumulator:
    """Streams (gt, pred) category maps into a (C + 1) x (C + 1) confusion matrix (the last row/column is VOID)."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise UserError(f"mIoU needs at least one class, got {num_classes}")
        self.num_classes = int(num_classes)
        self.confusion = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def _index(self, labels: np.ndarray, what: str) -> np.ndarray:
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{what} category map must be integer, got {labels.dtype}")
        if labels.size and int(labels.max()) >= self.num_classes:
            raise UserError(f"{what} category map has class {int(labels.max())} >= {self.num_classes} classes")
        return np.where(labels < 0, self.num_classes, labels).astype(np.int64)

    def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: int maps [H, W] of class indices, negative = VOID."""
        if np.shape(gt) != np.shape(pred):
            raise UserError(f"category maps differ in shape: ground truth {np.shape(gt)}, prediction {np.shape(pred)}")
        k = self.num_classes + 1
        g = self._index(gt, "ground-truth").ravel()
        p = self._index(pred, "predicted").ravel()
        self.confusion += np.bincount(g * k + p, minlength=k * k).reshape(k, k)

    def result(self) -> dict[str, Any]:
        """{"miou", "n", "pixel_accuracy", "per_class": [IoU or None per class]} in percent."""
        c = self.num_classes
        conf = self.confusion[:c]  # GT VOID rows dropped
        tp = np.diag(conf[:, :c]).astype(np.float64)
        gt_total = conf.sum(axis=1).astype(np.float64)  # includes pixels predicted VOID
        pred_total = conf[:, :c].sum(axis=0).astype(np.float64)
        union = gt_total + pred_total - tp
        valid = union > 0
        iou = np.where(valid, tp / np.maximum(union, 1), np.nan)
        labelled = gt_total.sum()
        return {
            "miou": float(100.0 * np.nanmean(iou)) if valid.any() else 0.0,
            "n": int(valid.sum()),
            "pixel_accuracy": float(100.0 * tp.sum() / labelled) if labelled else 0.0,
            "per_class": [float(100.0 * v) if ok else None for v, ok in zip(iou.tolist(), valid.tolist())],
        }

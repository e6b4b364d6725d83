"""Where is PQ lost? Masks decoded at the ground-truth centers ("oracle centers") against the predicted peaks.

For each image the network runs once; its outputs are decoded twice with the same post-processing as
`DeployModel` (mask embeddings at (position, class) pairs, bilinear upsampling, the panoptic merge):

* predicted: the top-N peaks of the center heatmap (the deployed path; its PQ equals `maskconver eval`'s);
* oracle: the training-time pooling (`targets.build_targets` on the ground truth at the network input size:
  thing box centers, stuff islands, class = GT class), every center with score 1.0, so the merge is decided by
  the mask probabilities alone.

PQ(oracle) - PQ(predicted) is what finding the centers costs; 100 - PQ(oracle) is what the masks cost.

Center recall / precision, per class and for things and stuff apart: a predicted peak (one of the top-N
proposals with score >= `score_threshold`, 0.3 by default; 0.1 and 0.5 are reported too) finds a GT center of its class when it lies within the center's
Gaussian radius on the stride grid: Chebyshev distance <= max(floor(r), 1) cells, r = CenterNet's radius of the
stride-level box (so at least the 3x3 peak-NMS neighbourhood). Matching is one-to-one, highest score first, each
peak taking the nearest free GT center. recall = matched GT / GT centers, precision = matched peaks / peaks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from maskconver_deploy.model.blocks import upsample_bilinear
from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.postprocess import mask_probabilities, panoptic_merge, peak_nms, top_proposals
from maskconver_deploy.training.targets import (
    build_targets,
    gaussian_radius,
    stuff_centers,
    stuff_class_masks,
    stuff_rule,
    thing_centers,
)
from maskconver_deploy.types import PanopticOutput

DEFAULT_SCORE_THRESHOLD = 0.3  # CenterNet's usual detection threshold for "a peak was found"
THRESHOLDS = (0.1, 0.3, 0.5)  # also reported, beside the chosen one


@dataclass
class _Counts:
    gt: int = 0
    pred: int = 0
    matched: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "gt": self.gt,
            "pred": self.pred,
            "matched": self.matched,
            "recall": self.matched / self.gt if self.gt else None,
            "precision": self.matched / self.pred if self.pred else None,
        }


def decode(model: MaskConver, outputs: dict[str, torch.Tensor], scores: torch.Tensor, classes: torch.Tensor,
           positions: torch.Tensor) -> np.ndarray:
    """Panoptic id map [H, W] (network input size) of one image for K (score, class, position) proposals [1, K]."""
    spec = model.spec
    embeddings = model.mask_embeddings(outputs["center_embedding"], positions, classes)
    logits = model.mask_logits(embeddings, outputs["mask_features"]).float()
    probabilities = mask_probabilities(upsample_bilinear(logits, spec.feature_stride).squeeze(0), spec.mask_activation)
    panoptic, _ = panoptic_merge(
        probabilities, scores.squeeze(0), classes.squeeze(0), spec.num_things, spec.object_mask_threshold,
        spec.overlap_threshold, float(spec.scaled_small_area()),
    )
    return panoptic.cpu().numpy().astype(np.int32)


def letterbox_ids(ids: np.ndarray, box: Any) -> np.ndarray:
    """The GT id map fitted into the network input like its image (nearest resize, VOID padding bottom/right)."""
    if box.is_identity:
        return ids
    rh, rw = box.resized
    resized = np.asarray(Image.fromarray(ids.astype(np.int32)).resize((rw, rh), Image.NEAREST), dtype=np.int32)
    canvas = np.zeros(tuple(box.size), dtype=np.int32)
    canvas[:rh, :rw] = resized
    return canvas


def oracle_proposals(
    ids: np.ndarray, segments: Sequence[Any], spec: Any, rule: str = "scaled"
) -> tuple[torch.Tensor, ...] | None:
    """(scores 1.0, classes, flat positions), each [1, K], of the training-time GT slots of an id map at the
    network input size; None when the image has no center."""
    targets = build_targets(ids, segments, spec, rule=rule)
    keep = targets["classes"] >= 0
    if not keep.any():
        return None
    classes = torch.from_numpy(targets["classes"][keep])[None]
    positions = torch.from_numpy(targets["positions"][keep])[None]
    return torch.ones(classes.shape, dtype=torch.float32), classes, positions


def gt_centers(
    ids: np.ndarray, segments: Sequence[Any], model: MaskConver, rule: str = "scaled"
) -> list[tuple[int, int, int, float]]:
    """(class, peak y, peak x, radius in cells) of every GT center by the training rule (before the slot clip)."""
    spec = model.spec
    stride = spec.feature_stride
    kernel, min_area = stuff_rule(spec.input_size, rule)
    centers = thing_centers(ids, segments)
    for class_index, mask in sorted(stuff_class_masks(ids, segments).items()):
        centers.extend(stuff_centers(mask, class_index, spec.stuff_centers, spec.max_stuff_islands, kernel, min_area))
    h, w = ids.shape[0] // stride, ids.shape[1] // stride
    out = []
    for c in centers:
        py, px = min(int(c.yc // stride), h - 1), min(int(c.xc // stride), w - 1)
        out.append((c.class_index, py, px, gaussian_radius(c.box_h / stride, c.box_w / stride)))
    return out


def match_centers(
    peaks: Sequence[tuple[int, int, int, float]], gts: Sequence[tuple[int, int, int, float]]
) -> list[bool]:
    """For GT centers (class, y, x, radius), which are found by peaks (class, y, x, score); one-to-one, best score first."""
    found = [False] * len(gts)
    for cls, y, x, _ in sorted(peaks, key=lambda p: -p[3]):
        best, best_d = None, math.inf
        for i, (gcls, gy, gx, radius) in enumerate(gts):
            if found[i] or gcls != cls:
                continue
            d = max(abs(gy - y), abs(gx - x))
            if d <= max(math.floor(radius), 1) and d < best_d:
                best, best_d = i, d
        if best is not None:
            found[best] = True
    return found


def diagnose(
    model: MaskConver,
    records: Sequence[Any],
    meta: Any,
    limit: int | None = None,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    progress: Any = None,
    rule: str = "scaled",
) -> dict[str, Any]:
    """PQ with predicted and with oracle centers, and center recall / precision, over the first `limit` records.

    rule: the stuff-island rule the model was trained with (`targets.stuff_rule`)."""
    from maskconver_deploy.data.coco_panoptic import load_example, panoptic_to_coco
    from maskconver_deploy.data.preprocess import letterbox, unletterbox
    from maskconver_deploy.errors import UserError
    from maskconver_deploy.evaluate import category_map
    from maskconver_deploy.metrics.miou import MIoUAccumulator
    from maskconver_deploy.metrics.pq import PQAccumulator
    from maskconver_deploy.training.train import segments_of

    spec = model.spec
    chosen = list(records[: limit if limit else None])
    if not chosen:
        raise UserError("no images to evaluate")
    isthing = [c.isthing for c in meta.categories]
    pq = {"predicted": PQAccumulator(meta.categories), "oracle": PQAccumulator(meta.categories)}
    miou = {"predicted": MIoUAccumulator(meta.num_classes), "oracle": MIoUAccumulator(meta.num_classes)}
    thresholds = sorted({*THRESHOLDS, float(score_threshold)})
    per_class = {t: [_Counts() for _ in meta.categories] for t in thresholds}
    width = spec.feature_size[1]
    start = time.perf_counter()
    model.eval()
    for record in (progress or (lambda items, *_: iter(items)))(chosen, "diagnose", len(chosen)):
        image, gt_ids = load_example(record)
        boxed, box = letterbox(image, spec.input_size)
        segments = segments_of(record, meta)
        ids_in = letterbox_ids(gt_ids, box)
        oracle = oracle_proposals(ids_in, segments, spec, rule)
        with torch.inference_mode():
            outputs = model(model.normalize(torch.from_numpy(np.ascontiguousarray(boxed))[None]))
            heat = torch.sigmoid(outputs["heatmap"].float())
            scores, classes, positions = top_proposals(peak_nms(heat), spec.num_proposals)
            answers = {"predicted": (scores, classes, positions)}
            if oracle is not None:
                answers["oracle"] = oracle
            for name in ("predicted", "oracle"):
                if name in answers:
                    s, c, p = answers[name]
                    panoptic = unletterbox(decode(model, outputs, s, c, p), box)
                    rows, cols = (p[0] // width).numpy(), (p[0] % width).numpy()
                    centers = np.stack([rows, cols], axis=-1).astype(np.int32)
                    out = PanopticOutput(panoptic, s[0].numpy().astype(np.float32), c[0].numpy().astype(np.int32), centers)
                else:  # no GT center at all: the oracle answers nothing (all VOID)
                    out = PanopticOutput(np.zeros_like(gt_ids, dtype=np.int32), np.zeros(0, np.float32),
                                         np.zeros(0, np.int32), np.zeros((0, 2), np.int32))
                pred_ids, pred_segments = panoptic_to_coco(out, meta)
                pq[name].add(gt_ids, record.segments, pred_ids, pred_segments, image=str(record.image_path))
                miou[name].add(category_map(gt_ids, record.segments, meta), out.category_map())
        gts = gt_centers(ids_in, segments, model, rule)
        proposals = list(zip(scores[0].tolist(), classes[0].tolist(), positions[0].tolist()))
        for t in thresholds:
            peaks = [(int(c), int(p) // width, int(p) % width, float(s)) for s, c, p in proposals if s >= t]
            for (cls, *_), ok in zip(gts, match_centers(peaks, gts)):
                per_class[t][cls].gt += 1
                per_class[t][cls].matched += int(ok)
            for cls, *_ in peaks:
                per_class[t][cls].pred += 1
    by_threshold = {}
    for t in thresholds:
        groups = {"all": _Counts(), "things": _Counts(), "stuff": _Counts()}
        for cls, counts in enumerate(per_class[t]):
            for group in (groups["all"], groups["things" if isthing[cls] else "stuff"]):
                group.gt += counts.gt
                group.pred += counts.pred
                group.matched += counts.matched
        by_threshold[t] = {name: counts.as_dict() for name, counts in groups.items()}
    return {
        "n_images": len(chosen),
        "pq": pq["predicted"].result(),
        "miou": miou["predicted"].result(),
        "oracle": {"pq": pq["oracle"].result(), "miou": miou["oracle"].result()},
        "centers": {
            "score_threshold": score_threshold,
            "rule": "peak of the GT class within max(floor(r), 1) cells (Chebyshev) of the GT center, one-to-one",
            **by_threshold[float(score_threshold)],
            "per_class": {str(meta.categories[i].id): c.as_dict() for i, c in enumerate(per_class[float(score_threshold)])},
            "by_threshold": {f"{t:g}": v for t, v in by_threshold.items()},
        },
        "categories": meta.to_dicts(),
        "timing": {"total_s": time.perf_counter() - start},
    }


def diagnose_checkpoint(checkpoint: Path, data: Path, split: str = "val", limit: int | None = None,
                        threads: int | None = None, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                        progress: Any = None) -> dict[str, Any]:
    """`diagnose` of a checkpoint file on one split of a data folder (CPU)."""
    from maskconver_deploy.data.coco_panoptic import load_split
    from maskconver_deploy.evaluate import check_categories
    from maskconver_deploy.model.checkpoint import load_checkpoint

    if threads is not None:
        torch.set_num_threads(int(threads))
    model, categories, provenance = load_checkpoint(checkpoint)
    meta, records = load_split(data, split)
    check_categories(categories, meta)
    rule = str(provenance.get("stuff_rule", "scaled"))  # the rule the checkpoint was trained with
    result = diagnose(model, records, meta, limit=limit, score_threshold=score_threshold, progress=progress, rule=rule)
    result["stuff_rule"] = rule
    result["backend"] = "torch (oracle centers)"
    return result


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: PQ with predicted vs oracle centers, and center recall / precision, for all / things / stuff."""
    rows = []
    for group in ("all", "things", "stuff"):
        row = {"group": group, "PQ predicted": result["pq"][group]["pq"], "PQ oracle": result["oracle"]["pq"][group]["pq"]}
        counts = result["centers"].get(group)
        if counts is not None:
            row |= {"center recall": counts["recall"], "center precision": counts["precision"],
                    "GT centers": counts["gt"], "peaks": counts["pred"]}
        rows.append(row)
    return rows


def threshold_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: center recall / precision of things and stuff at each reported peak-score threshold."""
    rows = []
    for t, groups in result["centers"]["by_threshold"].items():
        rows.append({"peak score >=": t} | {f"{g} {k}": groups[g][k] for g in ("things", "stuff") for k in ("recall", "precision")})
    return rows

"""Export-safe inference post-processing and `DeployModel`, the graph that export.py traces.

Everything has static shapes: 3x3 max-pool peak NMS, TopK with a constant K, index arithmetic without NonZero,
and a panoptic merge built from ArgMax + Gather (official facts 4.1-4.3). Integer outputs are int32.

Merge, per image, for N proposals (sorted by score) with mask probabilities P[N, H, W]:
    valid(q)         = score(q) > object_mask_threshold
    weighted         = P * score * valid
    owner(pixel)     = argmax_q weighted; VOID where the best weighted value is 0 (our one deviation from the
                       official code: with hard-sigmoid many probabilities are exactly 0, and such a pixel has
                       no real owner)
    original_area(q) = #(P[q] > 0.5);  mask_area(q) = #pixels owned by q
    keep(q)          = valid and mask_area > small_area and original_area > 0
                       and mask_area > overlap_threshold * original_area
    id(q)            = (class + 1) * LABEL_DIVISOR + (q + 1 if thing else 0) if keep(q) else 0
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskconver_deploy.model.blocks import upsample_bilinear
from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.types import LABEL_DIVISOR, OUTPUT_NAMES

MAX_TOPK = 3840  # TensorRT's TopK limit
PEAK_KERNEL = 3


def peak_nms(probabilities: Tensor, kernel: int = PEAK_KERNEL) -> Tensor:
    """Keep a heatmap value where it equals the max of its kxk neighbourhood, else 0. [B, C, h, w] -> same."""
    pooled = nn.functional.max_pool2d(probabilities, kernel, stride=1, padding=kernel // 2)
    return torch.where(probabilities == pooled, probabilities, torch.zeros_like(probabilities))


def top_proposals(peaks: Tensor, num_proposals: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-N jointly over classes x positions of [B, C, h, w].

    Returns scores float [B, N] (high to low, ties lowest flat index first), classes int64 [B, N] and flat
    positions int64 [B, N] (y * w + x).
    """
    _, _, height, width = peaks.shape
    flat = peaks.flatten(1)
    if _capturing_graph():
        scores, flat_index = torch.topk(flat, num_proposals, dim=1, largest=True, sorted=True)
    else:
        # Equal scores (a saturated sigmoid gives many exact 1.0) come lowest index first in ONNX's, TFLite's and
        # TensorRT's TopK; torch.topk promises no order for ties. A stable descending sort gives the same order.
        ordered, order = torch.sort(flat, dim=1, descending=True, stable=True)
        scores, flat_index = ordered[:, :num_proposals], order[:, :num_proposals]
    area = height * width
    classes = torch.div(flat_index, area, rounding_mode="trunc")
    positions = flat_index - classes * area
    return scores, classes, positions


def centers_from_positions(positions: Tensor, width: int) -> Tensor:
    """Flat positions [B, N] -> int32 (y, x) [B, N, 2]."""
    rows = torch.div(positions, width, rounding_mode="trunc")
    cols = positions - rows * width
    return torch.stack([rows, cols], dim=-1).to(torch.int32)


def mask_probabilities(logits: Tensor, activation: str = "hard_sigmoid") -> Tensor:
    """Mask logits -> probabilities: hard-sigmoid relu6(x + 3) / 6 (deployed path) or sigmoid."""
    if activation == "hard_sigmoid":
        return nn.functional.hardsigmoid(logits)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown mask activation '{activation}'")


def _capturing_graph() -> bool:
    """True while the module is being traced or exported (ONNX, TorchScript, torch.export / dynamo)."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def max_along_first_dim(values: Tensor) -> tuple[Tensor, Tensor]:
    """(max, index of the first max) over dim 0, both with dim 0 kept as size 1.

    In a captured graph: ArgMax + a gather of the winning value, one pass over the data (ReduceMax + ArgMax
    costs two). Eager: torch.max, which torch runs as one vectorised kernel (argmax alone is slower there).
    Both pick the first index on ties, so the two paths give identical results.
    """
    if _capturing_graph():
        index = torch.argmax(values, dim=0, keepdim=True)
        return torch.gather(values, 0, index), index
    best, index = torch.max(values, dim=0, keepdim=True)
    return best, index


def proposal_owners(probabilities: Tensor, weights: Tensor) -> Tensor:
    """Owner slot of each pixel, -1 for VOID. probabilities [N, H, W], weights [N] (score * valid) -> int64 [H, W]."""
    weighted = probabilities * weights.reshape(-1, 1, 1)
    best, owner = max_along_first_dim(weighted)  # [1, H, W]
    return torch.where(best > 0, owner, torch.full_like(owner, -1))[0]


def segment_ids(
    probabilities: Tensor,
    owner: Tensor,
    scores: Tensor,
    classes: Tensor,
    num_things: int,
    object_mask_threshold: float,
    overlap_threshold: float,
    small_area: float,
) -> tuple[Tensor, Tensor]:
    """Keep decision per slot -> (panoptic id int32 [N], class index + 1 int32 [N]); 0 where a slot is dropped."""
    num = probabilities.shape[0]
    valid = scores > object_mask_threshold
    original_area = (probabilities > 0.5).to(torch.float32).sum(dim=(1, 2))
    slots = torch.arange(num, dtype=owner.dtype, device=owner.device)
    mask_area = (owner.unsqueeze(0) == slots.reshape(-1, 1, 1)).to(torch.float32).sum(dim=(1, 2))
    keep = valid & (mask_area > small_area) & (original_area > 0) & (mask_area > overlap_threshold * original_area)
    classes32 = classes.to(torch.int32)
    instance = torch.where(classes32 < num_things, slots.to(torch.int32) + 1, torch.zeros_like(classes32))
    label = classes32 + 1
    zero = torch.zeros_like(classes32)
    return torch.where(keep, label * LABEL_DIVISOR + instance, zero), torch.where(keep, label, zero)


def paint(table: Tensor, owner: Tensor) -> Tensor:
    """Per-slot values [N] painted by owner [H, W] (-1 = VOID -> 0). Returns the same dtype as `table`, [H, W]."""
    padded = torch.cat([torch.zeros_like(table[:1]), table])
    return padded.index_select(0, (owner + 1).reshape(-1)).reshape(owner.shape)


def panoptic_merge(
    probabilities: Tensor,
    scores: Tensor,
    classes: Tensor,
    num_things: int,
    object_mask_threshold: float = 0.01,
    overlap_threshold: float = 0.7,
    small_area: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One image: probabilities [N, H, W], scores [N], classes [N] -> (panoptic int32 [H, W], semantic int32 [H, W]).

    semantic = class index + 1 of the owning kept segment, 0 = VOID.
    """
    valid = (scores > object_mask_threshold).to(probabilities.dtype)
    owner = proposal_owners(probabilities, scores * valid)
    ids, labels = segment_ids(
        probabilities, owner, scores, classes, num_things, object_mask_threshold, overlap_threshold, small_area
    )
    return paint(ids, owner), paint(labels, owner)


class DeployModel(nn.Module):
    """uint8 image [1, H, W, 3] -> fixed-shape outputs named by `types.OUTPUT_NAMES[output]`.

    Puts itself (and the wrapped model) in eval mode. `num_proposals` defaults to the spec's.
    """

    def __init__(self, model: MaskConver, output: str = "panoptic", num_proposals: int | None = None) -> None:
        super().__init__()
        if output not in OUTPUT_NAMES:
            raise ValueError(f"output must be one of {', '.join(OUTPUT_NAMES)}, got '{output}'")
        spec = model.spec
        height, width = spec.feature_size
        limit = min(MAX_TOPK, spec.num_classes * height * width)
        num = spec.num_proposals if num_proposals is None else int(num_proposals)
        if not 1 <= num <= limit:
            raise ValueError(f"num_proposals must be in 1..{limit}, got {num}")
        self.model = model
        self.output = output
        self.num_proposals = num
        self.feature_width = width
        self.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        spec = self.model.spec
        outputs = self.model(self.model.normalize(image))
        heatmap = outputs["heatmap"].float()
        peaks = peak_nms(torch.sigmoid(heatmap))
        scores, classes, positions = top_proposals(peaks, self.num_proposals)
        embeddings = self.model.mask_embeddings(outputs["center_embedding"], positions, classes)
        logits = self.model.mask_logits(embeddings, outputs["mask_features"]).float()
        centers = centers_from_positions(positions, self.feature_width)
        classes32 = classes.to(torch.int32)
        if self.output == "raw":
            return heatmap, logits, scores, classes32, centers
        full = upsample_bilinear(logits, spec.feature_stride).squeeze(0)  # Squeeze, not a copying Gather
        probabilities = mask_probabilities(full, spec.mask_activation)
        panoptic, semantic = panoptic_merge(
            probabilities,
            scores.squeeze(0),
            classes.squeeze(0),
            spec.num_things,
            spec.object_mask_threshold,
            spec.overlap_threshold,
            float(spec.scaled_small_area()),
        )
        if self.output == "semantic":
            return (semantic.unsqueeze(0),)
        return panoptic.unsqueeze(0), scores, classes32, centers

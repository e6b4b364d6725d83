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

Merge paths (`MERGES`, recorded as `ModelMeta.merge`; the mask activation is a separate option):
    input         the toolkit's path: logits bilinearly resized to the network input, activation, merge there with
                  the VOID rule above. Formulated with few passes over N x H x W: a constant sentinel slot 0
                  (activation exactly 0) in front of the logits, so ArgMax itself returns 0 for VOID and the slot
                  index + 1 otherwise (no Gather of the best value, no Where, no +1); original areas as the sum
                  of Round(P) in graphs (round half to even: P > 0.5 bit for bit, one op) and from the logits in
                  eager PyTorch (`x > half_threshold`, the same test); owned areas as a histogram
                  of the owner map (ScatterElements add over H x W) instead of an N x H x W comparison.
    input-legacy  the same answer in the earlier formulation (kept for comparison and benchmarks).
    official      the official evaluation path (facts 4.2-4.3): logits resized to the output size first, then
                  the activation (sigmoid by default: the paper's numbers), merge there, every pixel owned by the
                  argmax (no VOID rule).
    feature       the official hardware path (facts 4.6, `use_hardware_optimization`; hard-sigmoid by default):
                  no resize, the merge runs on the feature grid (h x w) with every pixel owned and the small-area
                  threshold scaled to that grid; only the final id map is brought to the input size by nearest
                  neighbour (each feature cell becomes a stride x stride block). The official code stops at the
                  feature grid (its output size must equal it); the block copy is this toolkit's step to the
                  input size.
"""

from __future__ import annotations

import functools

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


MERGES = ("input", "feature", "official", "input-legacy")
ACTIVATIONS = ("hard-sigmoid", "sigmoid")
DEFAULT_MERGE = "input"
SENTINEL_LOGIT = -1.0e4  # the VOID slot of the `input` path: exactly 0 after either activation


def normalize_activation(name: str) -> str:
    """'hard_sigmoid' (the spec's spelling) or 'hard-sigmoid' -> 'hard-sigmoid'; 'sigmoid' as is; else ValueError."""
    value = str(name).strip().lower().replace("_", "-")
    if value not in ACTIVATIONS:
        raise ValueError(f"mask activation must be one of {', '.join(ACTIVATIONS)}, got '{name}'")
    return value


def normalize_merge(name: str) -> str:
    """A merge path name (MERGES) or ValueError."""
    value = str(name).strip().lower().replace("_", "-")
    if value not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}, got '{name}'")
    return value


def default_activation(merge: str) -> str:
    """The activation a merge path uses unless told otherwise: sigmoid for the official evaluation path."""
    return "sigmoid" if normalize_merge(merge) == "official" else "hard-sigmoid"


def mask_probabilities(logits: Tensor, activation: str = "hard-sigmoid") -> Tensor:
    """Mask logits -> probabilities: hard-sigmoid relu6(x + 3) / 6 (deployed path) or sigmoid."""
    if normalize_activation(activation) == "hard-sigmoid":
        return nn.functional.hardsigmoid(logits)
    return torch.sigmoid(logits)


@torch.compiler.disable  # a constant: torch.compile calls it eagerly instead of tracing the bisection
@functools.cache
def half_threshold(activation: str) -> float:
    """The largest float32 c with activation(c) <= 0.5 in PyTorch: activation(x) > 0.5 exactly when x > c.

    Found by bisection over the bit patterns of positive float32 (both activations are monotone and give
    exactly 0.5 at 0), on a vector long enough for PyTorch's vectorised kernels.
    """
    import numpy as np

    def above(bits: int) -> bool:
        value = np.array([bits], dtype=np.int32).view(np.float32)[0]
        x = torch.full((256,), float(value), dtype=torch.float32)
        return bool((mask_probabilities(x, activation) > 0.5).all())

    low, high = 0, int(np.array([1.0], dtype=np.float32).view(np.int32)[0])  # above(low) False, above(high) True
    while high - low > 1:
        middle = (low + high) // 2
        if above(middle):
            high = middle
        else:
            low = middle
    return float(np.array([low], dtype=np.int32).view(np.float32)[0])


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


class _ResizeChannelsLast(torch.autograd.Function):
    """Bilinear upsampling of [1, h, w, C] by an integer factor, exported as one ONNX Resize on that layout
    (scales [1, s, s, 1]). Measured in ONNX Runtime 1.23: the same values as the NCHW Resize bit for bit, in about
    half the time, and it lets the ArgMax over proposals run on the last, contiguous axis (TFLite's
    RESIZE_BILINEAR and ARG_MAX take this layout natively, without transposes)."""

    @staticmethod
    def forward(ctx: object, x: Tensor, factor: int) -> Tensor:  # noqa: ARG004 - torch.autograd.Function API
        channels_first = x.permute(0, 3, 1, 2).contiguous()
        return upsample_bilinear(channels_first, factor).permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def symbolic(g: object, x: object, factor: int) -> object:
        scales = g.op("Constant", value_t=torch.tensor([1.0, float(factor), float(factor), 1.0]))  # type: ignore[attr-defined]
        empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))  # type: ignore[attr-defined]
        return g.op("Resize", x, empty, scales, mode_s="linear", coordinate_transformation_mode_s="half_pixel",  # type: ignore[attr-defined]
                    cubic_coeff_a_f=-0.75, nearest_mode_s="floor")  # fmt: skip


class _Layout:
    """Where the proposal axis sits in the merge's [*, *, *] tensors: first (eager PyTorch: its fast kernels) or
    last (captured graphs: ONNX Runtime's and TFLite's ArgMax over a contiguous axis, NHWC Resize)."""

    def __init__(self, last: bool) -> None:
        self.last = last
        self.axis = -1 if last else 0
        self.spatial = (0, 1) if last else (1, 2)

    def from_first(self, values: Tensor) -> Tensor:
        """[M, h, w] -> this layout."""
        return values.permute(1, 2, 0) if self.last else values

    def resize(self, values: Tensor, stride: int) -> Tensor:
        """Bilinear upsampling of this layout's [*, *, *] by `stride`."""
        if stride == 1:
            return values
        if self.last:
            return _ResizeChannelsLast.apply(values.unsqueeze(0), stride).squeeze(0)
        return upsample_bilinear(values.unsqueeze(0), stride).squeeze(0)

    def per_slot(self, weights: Tensor) -> Tensor:
        """[M] -> broadcastable against this layout."""
        return weights if self.last else weights.reshape(-1, 1, 1)

    def argmax(self, values: Tensor) -> Tensor:
        """First index of the max over the proposal axis -> int64 [H, W]."""
        if _capturing_graph():
            return torch.argmax(values, dim=self.axis)
        return torch.max(values, dim=self.axis).indices

    def area_above(self, values: Tensor, threshold: float) -> Tensor:
        """Pixels per slot with value > threshold -> float32 [M]. Channel-last: a ones-vector MatMul over the
        pixels (exact for 0/1 counts below 2^24; ONNX Runtime's ReduceSum over the outer axes was 4x slower)."""
        return self.count_ones((values > threshold).to(torch.float32))

    def area_above_half(self, logits: Tensor, probabilities: Tensor, activation: str) -> Tensor:
        """Pixels per slot with probability > 0.5 -> float32 [M], given both the logits and their activation.

        Eager: the logits against `half_threshold` (no pass over the probabilities). Captured graph: Round of
        the probabilities the merge already holds: round half to even (ONNX, TFLite/XNNPACK) maps [0, 0.5] to 0
        and (0.5, 1] to 1, so it is the runtime's own P > 0.5 bit for bit, in one elementwise op (the compare and
        cast to float it replaces are three ops in TFLite)."""
        if not _capturing_graph():
            return self.area_above(logits, half_threshold(activation))
        return self.count_ones(torch.round(probabilities))

    def count_ones(self, above: Tensor) -> Tensor:
        """Sum over the pixels of a 0/1 float tensor in this layout -> float32 [M]."""
        if not self.last:
            return above.sum(dim=self.spatial)
        height, width, slots = above.shape
        rows = torch.ones((1, height), dtype=torch.float32, device=above.device)
        cols = torch.ones((1, width), dtype=torch.float32, device=above.device)
        per_column = torch.matmul(rows, above.reshape(height, width * slots)).reshape(width, slots)
        return torch.matmul(cols, per_column).reshape(-1)  # two small GEMMs: faster than one [1, H*W] GEMV


def _layout() -> _Layout:
    return _Layout(last=_capturing_graph())


def owned_areas(owner: Tensor, slots: int) -> Tensor:
    """Pixels per slot of an owner map [H, W] with values in 0..slots-1 -> float32 [slots] (a histogram: one
    ScatterElements add over H x W in the graph, instead of comparing every slot with every pixel)."""
    flat = owner.reshape(-1)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=owner.device)
    return torch.zeros(slots, dtype=torch.float32, device=owner.device).scatter_add(0, flat, ones)


def keep_and_tables(
    original_area: Tensor,
    mask_area: Tensor,
    scores: Tensor,
    classes: Tensor,
    num_things: int,
    object_mask_threshold: float,
    overlap_threshold: float,
    small_area: float,
) -> tuple[Tensor, Tensor]:
    """Keep rules (module docstring) on per-slot areas [N] -> (panoptic id int32 [N], class index + 1 int32 [N])."""
    num = scores.shape[0]
    valid = scores > object_mask_threshold
    keep = valid & (mask_area > small_area) & (original_area > 0) & (mask_area > overlap_threshold * original_area)
    classes32 = classes.to(torch.int32)
    slots = torch.arange(num, device=scores.device).to(torch.int32) + 1  # (an int32 arange exports as int64)
    instance = torch.where(classes32 < num_things, slots, torch.zeros_like(classes32))
    label = classes32 + 1
    zero = torch.zeros_like(classes32)
    return torch.where(keep, label * LABEL_DIVISOR + instance, zero), torch.where(keep, label, zero)


def _paint(ids: Tensor, labels: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
    flat = owner.reshape(-1)
    return ids.index_select(0, flat).reshape(owner.shape), labels.index_select(0, flat).reshape(owner.shape)


def _owned_merge(
    logits: Tensor,
    scores: Tensor,
    classes: Tensor,
    num_things: int,
    stride: int,
    activation: str,
    object_mask_threshold: float,
    overlap_threshold: float,
    small_area: float,
) -> tuple[Tensor, Tensor]:
    """Official merge, every pixel owned, on feature-grid logits [N, h, w] resized by `stride` (1: the feature grid
    itself) -> (panoptic, semantic) int32 [h * stride, w * stride]."""
    layout = _layout()
    num = logits.shape[0]
    full = layout.resize(layout.from_first(logits), stride)
    valid = (scores > object_mask_threshold).to(torch.float32)
    probabilities = mask_probabilities(full, activation)
    owner = layout.argmax(probabilities * layout.per_slot(scores * valid))
    original = layout.area_above_half(full, probabilities, activation)
    ids, labels = keep_and_tables(original, owned_areas(owner, num), scores, classes, num_things,
                                  object_mask_threshold, overlap_threshold, small_area)  # fmt: skip
    return _paint(ids, labels, owner)


def _input_merge(
    logits: Tensor,
    scores: Tensor,
    classes: Tensor,
    num_things: int,
    stride: int,
    activation: str,
    object_mask_threshold: float,
    overlap_threshold: float,
    small_area: float,
) -> tuple[Tensor, Tensor]:
    """The `input` path: feature-grid logits [N, h, w] -> (panoptic, semantic) int32 [H, W], equal bit for bit to
    resizing, activating and `panoptic_merge` (input-legacy); see the module docstring for the formulation."""
    layout = _layout()
    num, height, width = logits.shape
    sentinel = torch.full((1, height, width), SENTINEL_LOGIT, dtype=logits.dtype, device=logits.device)
    full = layout.resize(layout.from_first(torch.cat([sentinel, logits])), stride)  # N + 1 slots, 0 = VOID
    valid = (scores > object_mask_threshold).to(torch.float32)
    weights = torch.cat([torch.ones_like(scores[:1]), scores * valid])  # slot 0: probability 0 times anything
    probabilities = mask_probabilities(full, activation)
    index = layout.argmax(probabilities * layout.per_slot(weights))  # 0 = VOID
    original = layout.area_above_half(full, probabilities, activation)
    mask_area = owned_areas(index, num + 1)
    ids, labels = keep_and_tables(original[1:], mask_area[1:], scores, classes, num_things, object_mask_threshold,
                                  overlap_threshold, small_area)  # fmt: skip
    zero = torch.zeros_like(ids[:1])
    return _paint(torch.cat([zero, ids]), torch.cat([zero, labels]), index)


def block_upsample(values: Tensor, stride: int) -> Tensor:
    """Nearest-neighbour upsampling of an integer map [h, w] by an integer stride (each value a stride x stride
    block; Unsqueeze + Expand + Reshape in the graph, no Resize of integers)."""
    if stride == 1:
        return values
    height, width = values.shape
    blocks = values.reshape(height, 1, width, 1).expand(height, stride, width, stride)
    return blocks.reshape(height * stride, width * stride)


def feature_small_area(small_area_threshold: float, feature_size: tuple[int, int]) -> float:
    """The official small-area threshold (pixels at 640 x 640) scaled to the feature grid (not rounded)."""
    return float(small_area_threshold) * feature_size[0] * feature_size[1] / (640.0 * 640.0)


def merge_logits(
    logits: Tensor,
    scores: Tensor,
    classes: Tensor,
    *,
    merge: str,
    activation: str,
    stride: int,
    num_things: int,
    object_mask_threshold: float,
    overlap_threshold: float,
    small_area: float,
    feature_small_area_px: float,
) -> tuple[Tensor, Tensor]:
    """One image, any merge path: mask logits [N, h, w] on the feature grid, scores [N], classes [N] ->
    (panoptic int32 [H, W], semantic int32 [H, W]) at the input size (h * stride, w * stride).

    `small_area` is the threshold at the input size (input, input-legacy, official), `feature_small_area_px` the
    one on the feature grid (feature)."""
    merge = normalize_merge(merge)
    thresholds = (object_mask_threshold, overlap_threshold)
    if merge == "input":
        return _input_merge(logits, scores, classes, num_things, stride, activation, *thresholds, small_area)
    if merge == "feature":
        panoptic, semantic = _owned_merge(logits, scores, classes, num_things, 1, activation, *thresholds,
                                          feature_small_area_px)  # fmt: skip
        return block_upsample(panoptic, stride), block_upsample(semantic, stride)
    if merge == "official":
        return _owned_merge(logits, scores, classes, num_things, stride, activation, *thresholds, small_area)
    probabilities = mask_probabilities(upsample_bilinear(logits[None], stride).squeeze(0), activation)
    return panoptic_merge(probabilities, scores, classes, num_things, *thresholds, small_area)


class DeployModel(nn.Module):
    """uint8 image [1, H, W, 3] -> fixed-shape outputs named by `types.OUTPUT_NAMES[output]`.

    Puts itself (and the wrapped model) in eval mode. `num_proposals`, `merge` and `mask_activation` default to
    the spec's (an unknown value is a ValueError).
    """

    def __init__(
        self,
        model: MaskConver,
        output: str = "panoptic",
        num_proposals: int | None = None,
        merge: str | None = None,
        mask_activation: str | None = None,
    ) -> None:
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
        self.merge = normalize_merge(spec.merge if merge is None else merge)
        self.mask_activation = normalize_activation(spec.mask_activation if mask_activation is None else mask_activation)
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
        panoptic, semantic = merge_logits(
            logits.squeeze(0),  # Squeeze, not a copying Gather
            scores.squeeze(0),
            classes.squeeze(0),
            merge=self.merge,
            activation=self.mask_activation,
            stride=spec.feature_stride,
            num_things=spec.num_things,
            object_mask_threshold=spec.object_mask_threshold,
            overlap_threshold=spec.overlap_threshold,
            small_area=float(spec.scaled_small_area()),
            feature_small_area_px=feature_small_area(spec.small_area_threshold, spec.feature_size),
        )
        if self.output == "semantic":
            return (semantic.unsqueeze(0),)
        return panoptic.unsqueeze(0), scores, classes32, centers

"""Training targets of MaskConver: centers, Gaussian center heatmap and per-center binary masks.

Rules follow the official implementation (facts section 2):

* things: one center per (non-crowd) instance, at the center of the tight box around its mask
  ((ymin + ymax) / 2, (xmin + xmax) / 2 with inclusive pixel indices); class = the segment's category;
  GT mask = the instance mask.
* stuff ("islands", the paper's method): per stuff class, the class mask is dilated by a max-pool
  (21x21 at 640x640 input, stride 1, applied 3 times), split into connected components, the k largest
  components (k = ``spec.max_stuff_islands``, ranked by dilated size) are kept; each island
  (component AND class mask) with at least 1024 pixels (at 640x640) gives one center at its box
  center. The GT mask of every stuff center is the WHOLE class mask (official behaviour).
* stuff ("global", Table 6 ablation): one center per stuff class, at the center of the class mask's box;
  the same minimum area applies, so the two variants differ only in where the centers are.
* crowd segments are skipped (no center, no mask); their pixels are plain background for the heatmap.

Scaling to smaller inputs: the kernel and the minimum island area are given at 640x640 in the official
code. ``reference_size`` (the preset's input size, 256x256 for ``shapes-256``) sets the scene scale the
rules are applied at: kernel = the nearest odd integer to 21 * side / 640 (9 at 256) and minimum area =
1024 * area / 640^2 (164 px at 256x256). They are fixed per preset, not per training crop, so a crop
sees the same rule as the full image at the same content scale. ``stuff_rule="official"`` uses the official
constants unscaled (21x21 applied 3 times, 1024 px) at every input size, as the official parser does.

The heatmap is CenterNet's: stride-8 peak at (floor(yc / 8), floor(xc / 8)), radius = the smallest of
the three ``gaussian_radius`` roots for IoU 0.7 on the stride-8 box (with the original /2 quirk),
sigma = (2 * floor(r) + 1) / 6, evaluated over the whole map, per-class maximum, exactly 1 at peaks.
It is built from every center (before the slot clip). Slots: things first, then stuff, clipped/padded
to ``spec.max_instances`` with class -1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from maskconver_deploy.model.specs import MaskConverSpec

OFFICIAL_SIZE = 640  # the input side the official kernel / area constants are given at
OFFICIAL_POOL = 21
OFFICIAL_POOL_REPEATS = 3
OFFICIAL_MIN_ISLAND_AREA = 1024
MIN_IOU = 0.7
STUFF_MODES = ("islands", "global")
STUFF_RULES = ("scaled", "official")


@dataclass(frozen=True)
class TargetSegment:
    """What target generation needs to know about one annotated segment."""

    id: int  # value of the segment in the id map
    class_index: int  # contiguous model class index (things first)
    isthing: bool
    iscrowd: bool = False


@dataclass(frozen=True)
class Center:
    """One GT center: pixel-space box center, stride-level box size, class, and its GT mask."""

    class_index: int
    yc: float
    xc: float
    box_h: float  # ymax - ymin, input pixels (official: no +1)
    box_w: float
    mask: np.ndarray  # bool [H, W]


def stuff_rule(reference_size: tuple[int, int], rule: str = "scaled") -> tuple[int, int]:
    """(max-pool kernel, minimum island area in pixels) for a scene of `reference_size` ("scaled"), or the
    official constants whatever the size ("official")."""
    if rule == "official":
        return OFFICIAL_POOL, OFFICIAL_MIN_ISLAND_AREA
    if rule != "scaled":
        raise ValueError(f"stuff rule must be one of {STUFF_RULES}, not {rule!r}")
    h, w = reference_size
    side = math.sqrt(h * w)
    kernel = int(round(OFFICIAL_POOL * side / OFFICIAL_SIZE))
    if kernel % 2 == 0:  # odd kernel: a symmetric SAME max-pool
        kernel += 1 if OFFICIAL_POOL * side / OFFICIAL_SIZE >= kernel else -1
    kernel = max(kernel, 1)
    min_area = int(round(OFFICIAL_MIN_ISLAND_AREA * (h * w) / (OFFICIAL_SIZE * OFFICIAL_SIZE)))
    return kernel, min_area


def gaussian_radius(height: float, width: float, min_iou: float = MIN_IOU) -> float:
    """CenterNet's radius: the smallest of the three roots, each divided by 2 (the original quirk).

    Each root is (b + sqrt(b^2 - 4 a c)) / 2 of CenterNet's quadratics a r^2 + b r + c = 0 as written there:
    (a, b, c) = (1, -(h+w), ...) with the sign folded in, i.e. r1 = (b1 + sq1) / 2, r2 = (b2 + sq2) / 2 with
    b1 = h + w, b2 = 2 (h + w), and r3 = (b3 + sq3) / 2 with b3 = -2 iou (h + w): the third root's linear
    term is negative, which makes it the small one (about a cell for a few-cell box).
    """
    b1 = height + width
    c1 = width * height * (1 - min_iou) / (1 + min_iou)
    r1 = (b1 + math.sqrt(max(b1 * b1 - 4 * c1, 0.0))) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_iou) * width * height
    r2 = (b2 + math.sqrt(max(b2 * b2 - 16 * c2, 0.0))) / 2
    a3 = 4 * min_iou
    b3 = -2 * min_iou * (height + width)
    c3 = (min_iou - 1) * width * height
    r3 = (b3 + math.sqrt(max(b3 * b3 - 4 * a3 * c3, 0.0))) / 2
    return min(r1, r2, r3)


def gaussian_sigma(height: float, width: float) -> float:
    """sigma = diameter / 6 with diameter = 2 * max(floor(r), 0) + 1."""
    radius = max(math.floor(gaussian_radius(height, width)), 0)
    return (2 * radius + 1) / 6.0


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight inclusive box (ymin, xmin, ymax, xmax) of a boolean mask, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def _center_of(mask: np.ndarray, class_index: int, gt_mask: np.ndarray) -> Center | None:
    box = _box(mask)
    if box is None:
        return None
    ymin, xmin, ymax, xmax = box
    return Center(class_index, (ymin + ymax) / 2.0, (xmin + xmax) / 2.0, float(ymax - ymin), float(xmax - xmin), gt_mask)


def thing_centers(ids: np.ndarray, segments: Sequence[TargetSegment]) -> list[Center]:
    """One center per non-crowd thing segment present in `ids`."""
    out = []
    for seg in segments:
        if not seg.isthing or seg.iscrowd:
            continue
        mask = ids == seg.id
        center = _center_of(mask, seg.class_index, mask)
        if center is not None:
            out.append(center)
    return out


def stuff_class_masks(ids: np.ndarray, segments: Sequence[TargetSegment]) -> dict[int, np.ndarray]:
    """Union mask of the non-crowd stuff segments of each stuff class present, by class index."""
    masks: dict[int, np.ndarray] = {}
    for seg in segments:
        if seg.isthing or seg.iscrowd:
            continue
        mask = ids == seg.id
        if not mask.any():
            continue
        if seg.class_index in masks:
            masks[seg.class_index] |= mask
        else:
            masks[seg.class_index] = mask
    return masks


def stuff_centers(
    class_mask: np.ndarray,
    class_index: int,
    mode: str,
    max_islands: int,
    kernel: int,
    min_area: int,
) -> list[Center]:
    """Centers of one stuff class: the k largest dilated islands ("islands") or the global box ("global")."""
    if mode == "global":
        if int(class_mask.sum()) < min_area:
            return []
        center = _center_of(class_mask, class_index, class_mask)
        return [center] if center is not None else []
    if mode != "islands":
        raise ValueError(f"stuff_centers must be one of {STUFF_MODES}, not {mode!r}")
    # max-pool k x k, stride 1, SAME, three times == one (3k - 2) square dilation
    size = OFFICIAL_POOL_REPEATS * (kernel - 1) + 1
    dilated = ndimage.maximum_filter(class_mask.astype(np.uint8), size=size, mode="constant", cval=0) > 0
    labels, count = ndimage.label(dilated)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")[:max_islands]
    out = []
    for comp in order:
        island = (labels == comp + 1) & class_mask
        if int(island.sum()) < min_area:
            continue
        center = _center_of(island, class_index, class_mask)
        if center is not None:
            out.append(center)
    return out


def draw_heatmap(centers: Sequence[Center], num_classes: int, feature_size: tuple[int, int], stride: int) -> np.ndarray:
    """float32 [C, h, w]: per-class maximum of each center's Gaussian (whole map, no window)."""
    h, w = feature_size
    heatmap = np.zeros((num_classes, h, w), dtype=np.float32)
    ys = np.arange(h, dtype=np.float64)[:, None]
    xs = np.arange(w, dtype=np.float64)[None, :]
    for c in centers:
        py, px = _peak(c, feature_size, stride)
        sigma = gaussian_sigma(c.box_h / stride, c.box_w / stride)
        g = np.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * sigma * sigma)).astype(np.float32)
        np.maximum(heatmap[c.class_index], g, out=heatmap[c.class_index])
    return heatmap


def _peak(c: Center, feature_size: tuple[int, int], stride: int) -> tuple[int, int]:
    h, w = feature_size
    return min(int(math.floor(c.yc / stride)), h - 1), min(int(math.floor(c.xc / stride)), w - 1)


def build_targets(
    ids: np.ndarray,
    segments: Sequence[TargetSegment],
    spec: MaskConverSpec,
    stuff_mode: str | None = None,
    padding: np.ndarray | None = None,
    reference_size: tuple[int, int] | None = None,
    rule: str = "scaled",
) -> dict[str, np.ndarray]:
    """All targets of one (augmented) example.

    ids: int [H, W] segment id map (H, W divisible by the feature stride); segments: its annotation;
    padding: bool [H, W], True where the pixel is padding added by augmentation (excluded from losses);
    stuff_mode: "islands" | "global" (default ``spec.stuff_centers``); reference_size: the scene size the
    official 640 constants are scaled to (default ``spec.input_size``); rule: "scaled" or "official" (`stuff_rule`).

    Returns numpy arrays: heatmap float32 [C, h, w]; classes int64 [K] (-1 = padding slot); positions
    int64 [K] (flat y * w + x on the stride grid, 0 for padding); masks uint8 [K, H, W]; valid float32 [K];
    pixel_valid uint8 [H, W]; num_instances int64 scalar (valid slots).
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [H, W], got shape {ids.shape}")
    stride = spec.feature_stride
    height, width = ids.shape
    if height % stride or width % stride:
        raise ValueError(f"input size {height}x{width} is not divisible by the feature stride {stride}")
    mode = stuff_mode or spec.stuff_centers
    if mode not in STUFF_MODES:
        raise ValueError(f"stuff_centers must be one of {STUFF_MODES}, not {mode!r}")
    kernel, min_area = stuff_rule(reference_size or spec.input_size, rule)
    feature_size = (height // stride, width // stride)

    centers = thing_centers(ids, segments)
    for class_index, mask in sorted(stuff_class_masks(ids, segments).items()):
        centers.extend(stuff_centers(mask, class_index, mode, spec.max_stuff_islands, kernel, min_area))

    heatmap = draw_heatmap(centers, spec.num_classes, feature_size, stride)
    slots = spec.max_instances
    classes = np.full((slots,), -1, dtype=np.int64)
    positions = np.zeros((slots,), dtype=np.int64)
    masks = np.zeros((slots, height, width), dtype=np.uint8)
    kept = centers[:slots]
    for i, c in enumerate(kept):
        py, px = _peak(c, feature_size, stride)
        classes[i] = c.class_index
        positions[i] = py * feature_size[1] + px
        masks[i] = c.mask
    pixel_valid = np.ones((height, width), dtype=np.uint8) if padding is None else (~np.asarray(padding, bool)).astype(np.uint8)
    return {
        "heatmap": heatmap,
        "classes": classes,
        "positions": positions,
        "masks": masks,
        "valid": (classes >= 0).astype(np.float32),
        "pixel_valid": pixel_valid,
        "num_instances": np.asarray(len(kept), dtype=np.int64),
    }

"""Deterministic synthetic panoptic scenes ("shapes"), written as a COCO-panoptic data folder.

Nine categories (the `shapes-256` preset): things 1 circle, 2 rectangle, 3 triangle, 4 cross, 5 ring;
stuff 6 sky, 7 grass, 8 water, 9 sand. A scene is built in layers:

1. stuff: 3-7 cells with wavy borders (a warped Voronoi partition), each given one of 1-4 stuff classes;
   a class used by several cells forms 2-3 separate islands (still one segment per class, as in COCO);
   every class has its own texture (sky gradient and clouds, grass blades, water waves, sand speckle);
2. VOID: sometimes an unlabelled clutter blob or a black band (id 0);
3. crowd: sometimes a tight group of 5-9 touching small shapes of one class, one segment with iscrowd=1;
4. things: 2-12 shapes of random class, rotation, size (one in five small, 12-19 px across; the others
   19 px to about 45% of the image side), colour and texture (flat, stripes, gradient; about one in eight
   low-contrast: within 20-45 levels per channel of what lies underneath), painted in order so later
   shapes occlude earlier ones; a ring shows the background through its hole;
5. clean-up: visible remnants smaller than `MIN_AREA` pixels (slivers left by occlusion) become VOID;
6. photometric: sometimes blur and low contrast, always sensor noise; photos are saved as JPEG (quality 90).

Segment ids follow `types.py`: (class_index + 1) * 1000 + instance (instance 0 for stuff).
Every image has its own seed, derived from (seed, index), so a larger `n` only adds images; image i is
in val when floor((i + 1) * f) > floor(i * f) for the val fraction f (an exact, prefix-stable share).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from maskconver_deploy.data.coco_panoptic import id2rgb, segment_stats, split_paths, write_panoptic_json
from maskconver_deploy.data.records import SegmentInfo
from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import atomic_path
from maskconver_deploy.types import LABEL_DIVISOR, Category

__all__ = [
    "SHAPES_CATEGORIES",
    "GENERATOR_VERSION",
    "MIN_AREA",
    "Scene",
    "SynthSummary",
    "generate_scene",
    "image_seed",
    "split_of",
    "write_dataset",
]

# Version 2: small things 12-19 px (were 8-15 px, a third of all things: at the model's stride 8 that is one
# feature cell, so they were mostly unlearnable), low-contrast colours at least 20 levels per channel away
# from the background (were 0-28, some invisible), remnants under 64 px become VOID (were 24 px).
GENERATOR_VERSION = 2
MIN_AREA = 64  # visible pixels a segment needs; smaller remnants become VOID
SMALL_SHARE = 0.2  # share of small things
SMALL_RADIUS = (6.0, 9.5)  # radius range of a small thing at 256 px (12-19 px across)
LOW_CONTRAST_SHARE = 0.12
LOW_CONTRAST_OFFSET = (20.0, 45.0)  # per-channel distance of a low-contrast colour from its background

SHAPES_CATEGORIES: list[Category] = [
    Category(1, "circle", True, (220, 20, 60)),
    Category(2, "rectangle", True, (0, 0, 142)),
    Category(3, "triangle", True, (250, 170, 30)),
    Category(4, "cross", True, (119, 11, 32)),
    Category(5, "ring", True, (255, 0, 255)),
    Category(6, "sky", False, (70, 130, 180)),
    Category(7, "grass", False, (107, 142, 35)),
    Category(8, "water", False, (0, 80, 200)),
    Category(9, "sand", False, (210, 180, 120)),
]
_THINGS = [c for c in SHAPES_CATEGORIES if c.isthing]
_STUFF = [c for c in SHAPES_CATEGORIES if not c.isthing]
_INDEX = {c.id: i for i, c in enumerate(SHAPES_CATEGORIES)}  # already in model order (things first)


@dataclass
class Scene:
    """One generated image with its panoptic ground truth."""

    image: np.ndarray  # uint8 [S, S, 3]
    ids: np.ndarray  # int32 [S, S], 0 = VOID
    segments: list[SegmentInfo]


@dataclass
class SynthSummary:
    """What `write_dataset` wrote."""

    out: Path
    n_train: int
    n_val: int
    size: int
    seed: int
    seconds: float
    segments: int
    crowd: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "train": self.n_train,
            "val": self.n_val,
            "size": self.size,
            "seed": self.seed,
            "seconds": round(self.seconds, 2),
            "segments": self.segments,
            "crowd_segments": self.crowd,
            "generator_version": GENERATOR_VERSION,
        }


def image_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The seed of image `index` of a data set generated with `seed`."""
    return np.random.SeedSequence([int(seed), int(index), GENERATOR_VERSION, 0x5EED])


def split_of(index: int, val_fraction: float) -> str:
    """'val' for an exact, prefix-stable share `val_fraction` of indices, 'train' otherwise."""
    return "val" if int(np.floor((index + 1) * val_fraction)) > int(np.floor(index * val_fraction)) else "train"


# ------------------------------------------------------------------------------------------- fields


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """float32 [size, size] smooth noise with unit-ish amplitude (a cells x cells grid, bicubic upsampled)."""
    low = rng.standard_normal((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _jitter(rng: np.random.Generator, base: tuple[float, float, float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.normal(0, amount, 3).astype(np.float32), 0, 255)


def _tex_sky(rng: np.random.Generator, s: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    top, bottom = _jitter(rng, (90, 150, 225), 18), _jitter(rng, (175, 210, 240), 15)
    t = (yy / s)[..., None]
    img = top * (1 - t) + bottom * t
    clouds = np.clip(_smooth(rng, s, 6) * 0.8 - 0.2, 0, 1)[..., None] * rng.uniform(30, 90)
    return img + clouds


def _tex_grass(rng: np.random.Generator, s: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    base = _jitter(rng, (70, 135, 50), 18)
    angle = rng.uniform(-0.4, 0.4)
    freq = rng.uniform(0.5, 1.2)
    blades = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + 3 * _smooth(rng, s, 12))
    fine = rng.standard_normal((s, s), dtype=np.float32)
    shade = blades * 14 + fine * 12 + _smooth(rng, s, 5) * 12
    return base + shade[..., None] * np.asarray([0.6, 1.0, 0.4], np.float32)


def _tex_water(rng: np.random.Generator, s: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    base = _jitter(rng, (40, 95, 165), 18)
    f1, f2 = rng.uniform(0.15, 0.4), rng.uniform(0.03, 0.08)
    waves = np.sin(yy * f1 + 4 * np.sin(xx * f2 + rng.uniform(0, 6.3)))
    shade = waves * rng.uniform(8, 22) + _smooth(rng, s, 4) * 10
    return base + shade[..., None] * np.asarray([0.7, 0.9, 1.0], np.float32)


def _tex_sand(rng: np.random.Generator, s: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    base = _jitter(rng, (205, 180, 130), 15)
    speckle = rng.standard_normal((s, s), dtype=np.float32) * 16
    dots = (rng.random((s, s), dtype=np.float32) < 0.02) * -45.0
    dunes = _smooth(rng, s, 5) * 14
    return base + (speckle + dots + dunes)[..., None]


_TEXTURES: dict[int, Callable[..., np.ndarray]] = {6: _tex_sky, 7: _tex_grass, 8: _tex_water, 9: _tex_sand}


# ------------------------------------------------------------------------------------------- shapes


def _shape_mask(kind: int, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius ~r in rotated local coordinates (u, v)."""
    if kind == 1:  # circle / ellipse
        b = r * rng.uniform(0.7, 1.0)
        return (u / r) ** 2 + (v / b) ** 2 <= 1.0
    if kind == 2:  # rectangle
        b = r * rng.uniform(0.4, 1.0)
        return (np.abs(u) <= r * 0.9) & (np.abs(v) <= b * 0.9)
    if kind == 3:  # triangle
        angles = np.asarray([0.0, 2.094, 4.189]) + rng.uniform(-0.35, 0.35, 3)
        px, py = r * np.cos(angles), r * np.sin(angles)
        inside = np.ones(u.shape, bool)
        for i in range(3):
            j = (i + 1) % 3
            inside &= (px[j] - px[i]) * (v - py[i]) - (py[j] - py[i]) * (u - px[i]) >= 0
        return inside
    if kind == 4:  # cross
        w = r * rng.uniform(0.22, 0.38)
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(u) <= w) & (np.abs(v) <= r))
    # ring
    b = r * rng.uniform(0.8, 1.0)
    d = (u / r) ** 2 + (v / b) ** 2
    inner = rng.uniform(0.4, 0.65) ** 2
    return (d <= 1.0) & (d >= inner)


def _fill(
    rng: np.random.Generator, shape: tuple[int, int], u: np.ndarray, v: np.ndarray, colour: np.ndarray
) -> np.ndarray:
    """float32 [h, w, 3] texture of a thing: flat + noise, stripes or a gradient."""
    style = rng.integers(0, 3)
    if style == 0:
        pattern = np.zeros(shape, np.float32)
    elif style == 1:
        pattern = (np.sin(u * rng.uniform(0.5, 1.5)) > 0).astype(np.float32) * rng.uniform(20, 60) - 20
    else:
        span = max(float(np.abs(v).max()), 1.0)
        pattern = (v / span).astype(np.float32) * rng.uniform(15, 45)
    noise = rng.standard_normal(shape, dtype=np.float32) * rng.uniform(2, 10)
    return colour + (pattern + noise)[..., None]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _paint_shape(
    canvas: np.ndarray,
    ids: np.ndarray,
    seg_id: int,
    kind: int,
    rng: np.random.Generator,
    cy: float,
    cx: float,
    r: float,
    colour: np.ndarray | None,
) -> None:
    """Paint one shape (class `kind`) centred at (cy, cx) onto canvas/ids, clipped to the image."""
    s = canvas.shape[0]
    half = int(np.ceil(r * 1.5)) + 1
    y0, y1 = max(0, int(cy) - half), min(s, int(cy) + half + 1)
    x0, x1 = max(0, int(cx) - half), min(s, int(cx) + half + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    mask = _shape_mask(kind, rng, u, v, r)
    if not mask.any():
        return
    window = canvas[y0:y1, x0:x1]
    if colour is None:  # low contrast: close to what lies underneath, but not invisible
        offset = rng.uniform(*LOW_CONTRAST_OFFSET, 3) * rng.choice([-1.0, 1.0], 3)
        base = window[mask].mean(axis=0)
        colour = np.where((base + offset < 0) | (base + offset > 255), base - offset, base + offset).astype(np.float32)
    tex = _fill(rng, mask.shape, u, v, colour)
    window[mask] = tex[mask]
    ids[y0:y1, x0:x1][mask] = seg_id


# ------------------------------------------------------------------------------------------- scenes


def _stuff_layer(rng: np.random.Generator, s: int, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [s, s, 3] image, int32 [s, s] stuff category id per pixel)."""
    n_cells = int(rng.integers(3, 8))
    n_classes = int(rng.integers(1, 5))
    chosen = rng.choice([c.id for c in _STUFF], size=n_classes, replace=False)
    cell_class = np.concatenate([chosen, rng.choice(chosen, size=max(0, n_cells - n_classes))])[:n_cells]
    rng.shuffle(cell_class)
    amp = s * rng.uniform(0.05, 0.15)
    wy = yy + _smooth(rng, s, 4) * amp
    wx = xx + _smooth(rng, s, 4) * amp
    points = rng.uniform(0, s, (n_cells, 2)).astype(np.float32)
    best = np.full((s, s), np.inf, np.float32)
    cells = np.zeros((s, s), np.int32)
    d = np.empty((s, s), np.float32)
    t = np.empty((s, s), np.float32)
    for k, (py, px) in enumerate(points):
        np.subtract(wy, py, out=d)
        np.square(d, out=d)
        np.subtract(wx, px, out=t)
        np.square(t, out=t)
        d += t
        closer = d < best
        np.copyto(best, d, where=closer)
        cells[closer] = k
    class_map = cell_class[cells].astype(np.int32)
    image = np.zeros((s, s, 3), np.float32)
    for cid in sorted(set(cell_class.tolist())):
        where = class_map == cid
        if where.any():
            np.copyto(image, _TEXTURES[cid](rng, s, yy, xx), where=where[..., None])
    return image, class_map


def generate_scene(seed: int, index: int, size: int = 256) -> Scene:
    """The scene of image `index` for data set seed `seed` (deterministic)."""
    rng = np.random.default_rng(image_seed(seed, index))
    s = int(size)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    canvas, stuff = _stuff_layer(rng, s, yy, xx)
    stuff_segment = np.zeros(max(_INDEX) + 1, np.int32)  # category id -> stuff segment id
    for category in _STUFF:
        stuff_segment[category.id] = (_INDEX[category.id] + 1) * LABEL_DIVISOR
    ids = stuff_segment[stuff]
    crowd_ids: set[int] = set()
    counters = dict.fromkeys((c.id for c in _THINGS), 0)

    def next_id(category_id: int) -> int:
        counters[category_id] += 1
        return (_INDEX[category_id] + 1) * LABEL_DIVISOR + counters[category_id]

    # VOID: clutter blobs and black bands
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 3))):
            cy, cx, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(s * 0.04, s * 0.12)
            blob = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * rng.uniform(0.5, 1.5))) ** 2 + _smooth(rng, s, 8) * 0.4 <= 1
            clutter = rng.uniform(0, 255, (int(blob.sum()), 3)).astype(np.float32)
            canvas[blob] = clutter * 0.6 + _random_colour(rng) * 0.4
            ids[blob] = 0
    if rng.random() < 0.08:
        band = int(rng.integers(3, max(4, s // 16)))
        if rng.random() < 0.5:
            canvas[:band], ids[:band] = 0, 0
        else:
            canvas[-band:], ids[-band:] = 0, 0

    # crowd: a tight group of touching small shapes of one class
    if rng.random() < 0.2:
        kind = int(rng.integers(1, 6))
        crowd_id = next_id(kind)
        crowd_ids.add(crowd_id)
        cy, cx = rng.uniform(s * 0.15, s * 0.85, 2)
        step = rng.uniform(s * 0.035, s * 0.05)
        colour = _random_colour(rng)
        for _ in range(int(rng.integers(5, 10))):
            gy, gx = rng.integers(-1, 2, 2)
            _paint_shape(
                canvas, ids, crowd_id, kind, rng, cy + gy * step + rng.normal(0, step * 0.15),
                cx + gx * step + rng.normal(0, step * 0.15), step * rng.uniform(0.6, 0.8),
                np.clip(colour + rng.normal(0, 20, 3), 0, 255).astype(np.float32),
            )

    # things, painted in order (later ones occlude earlier ones)
    for _ in range(int(rng.integers(2, 13))):
        kind = int(rng.integers(1, 6))
        if rng.random() < SMALL_SHARE:
            r = rng.uniform(*SMALL_RADIUS) * s / 256
        else:
            r = float(np.exp(rng.uniform(np.log(SMALL_RADIUS[1] * s / 256), np.log(s * 0.22))))
        cy, cx = rng.uniform(-r * 0.3, s + r * 0.3, 2)
        colour = None if rng.random() < LOW_CONTRAST_SHARE else _random_colour(rng)
        _paint_shape(canvas, ids, next_id(kind), kind, rng, float(cy), float(cx), float(r), colour)

    # photometric: blur, contrast, sensor noise
    if rng.random() < 0.3:
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        canvas = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.3))), np.float32).copy()
    if rng.random() < 0.15:
        mean = canvas.mean(axis=(0, 1), keepdims=True)
        canvas = mean + (canvas - mean) * rng.uniform(0.3, 0.6) + rng.uniform(-30, 30)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2, 10)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    # ground truth: drop remnants too small to annotate, then list the segments
    stats = segment_stats(ids)
    tiny = [seg_id for seg_id, (area, _) in stats.items() if area < MIN_AREA]
    if tiny:
        ids[np.isin(ids, tiny)] = 0
    segments = []
    for seg_id, (area, bbox) in stats.items():
        if area < MIN_AREA:
            continue
        category = SHAPES_CATEGORIES[seg_id // LABEL_DIVISOR - 1]
        segments.append(SegmentInfo(seg_id, category.id, seg_id in crowd_ids, area, bbox))
    return Scene(image, ids, segments)


# ------------------------------------------------------------------------------------------- data set


def write_dataset(
    out: str | Path,
    n: int,
    size: int = 256,
    seed: int = 0,
    val_fraction: float = 0.1,
    force: bool = False,
    on_image: Callable[[int], None] | None = None,
    splits: tuple[str, ...] = ("train", "val"),
) -> SynthSummary:
    """Write `n` scenes as a COCO-panoptic data folder with train and val splits (atomically: the folder
    appears complete or not at all; an existing folder is replaced only with `force`).

    `splits` limits the folder to some splits: ``("val",)`` writes exactly the val images of the full set
    (the same indices, pixels and annotations) without generating the train images."""
    out = Path(out)
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if size < 32:
        raise UserError(f"--size must be at least 32, got {size}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    if not splits or any(split not in ("train", "val") for split in splits):
        raise UserError(f"splits must be 'train' and/or 'val', got {list(splits)}")
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", out)
    start = time.perf_counter()
    content_of: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"images": [], "annotations": []} for s in splits}
    n_segments = n_crowd = 0
    with atomic_path(out, force=force, suffix="") as tmp:
        for split in content_of:
            _, png_dir, image_dir = split_paths(tmp, split)
            png_dir.mkdir(parents=True)
            image_dir.mkdir(parents=True)
        for index in range(n):
            split = split_of(index, val_fraction)
            if split not in content_of:
                continue
            scene = generate_scene(seed, index, size)
            _, png_dir, image_dir = split_paths(tmp, split)
            stem = f"{index:06d}"
            Image.fromarray(scene.image).save(image_dir / f"{stem}.jpg", format="JPEG", quality=90)
            Image.fromarray(id2rgb(scene.ids)).save(png_dir / f"{stem}.png", format="PNG", compress_level=1)
            content_of[split]["images"].append({"id": index, "file_name": f"{stem}.jpg", "height": size, "width": size})
            segments_info = [seg.to_dict() for seg in scene.segments]
            content_of[split]["annotations"].append({"image_id": index, "file_name": f"{stem}.png", "segments_info": segments_info})
            n_segments += len(scene.segments)
            n_crowd += sum(1 for seg in scene.segments if seg.iscrowd)
            if on_image is not None:
                on_image(index)
        info = {
            "description": "maskconver synthetic shapes",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "size": size,
            "n": n,
            "val_fraction": val_fraction,
        }
        for split, content in content_of.items():
            json_path, _, _ = split_paths(tmp, split)
            write_panoptic_json(
                json_path, content["annotations"], SHAPES_CATEGORIES, images=content["images"], info=info
            )
    return SynthSummary(
        out, len(content_of.get("train", {}).get("images", [])), len(content_of.get("val", {}).get("images", [])), size, seed,
        time.perf_counter() - start, n_segments, n_crowd,
    )

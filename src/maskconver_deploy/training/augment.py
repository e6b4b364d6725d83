"""Training augmentation: horizontal flip, random scale, random crop / pad to the training size.

The image and its id map get the same geometry (bilinear for the image, nearest for the ids).

Scale convention: the scale factor is relative to the preset's input size (the evaluation size), so
scale 1.0 shows objects at the size the model sees at evaluation even when the training crop is smaller.
The image is resized to fit inside round(s * input_size) with its aspect kept (the official
``resize_and_crop_image`` rule, with the eval size as the box), then cropped at a random offset where it
is larger than the crop, and padded bottom/right with zeros (ids: VOID) where it is smaller. The padded
pixels are reported in a boolean mask so the losses can ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Official 0.1-1.9 (COCO). The shapes scenes are evaluated at one scale and vary object size themselves, and
# below 1.0 a crop is partly padding (wasted compute), so the default is narrow.
DEFAULT_SCALE_RANGE = (0.75, 1.25)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the training augmentation."""

    crop_size: tuple[int, int]  # (H, W) of the training input
    reference_size: tuple[int, int]  # (H, W) that scale 1.0 maps the image to (the eval size)
    scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got {self.scale_range}")
        if min(self.crop_size) < 1 or min(self.reference_size) < 1:
            raise ValueError("crop and reference sizes must be positive")


def resize_pair(image: np.ndarray, ids: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize an RGB uint8 image (bilinear) and an int id map (nearest) to size (H, W)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, ids
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    out_ids = np.asarray(Image.fromarray(ids.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(ids.dtype)
    return img, out_ids


def augment(
    image: np.ndarray, ids: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flip + random scale + crop/pad. Returns (image uint8 [h, w, 3], ids [h, w], padding bool [h, w])."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != ids.shape:
        raise ValueError(f"image {image.shape} and ids {ids.shape} do not match")
    if rng.random() < config.flip_prob:  # flip first (official order), so padding stays bottom/right
        image = image[:, ::-1]
        ids = ids[:, ::-1]
    image, ids = np.ascontiguousarray(image), np.ascontiguousarray(ids)
    src_h, src_w = ids.shape
    ref_h, ref_w = config.reference_size
    scale = float(rng.uniform(*config.scale_range))
    fit = min(scale * ref_h / src_h, scale * ref_w / src_w)
    new_h, new_w = max(1, int(round(src_h * fit))), max(1, int(round(src_w * fit)))
    image, ids = resize_pair(image, ids, (new_h, new_w))

    crop_h, crop_w = config.crop_size
    y0 = int(rng.integers(0, new_h - crop_h + 1)) if new_h > crop_h else 0
    x0 = int(rng.integers(0, new_w - crop_w + 1)) if new_w > crop_w else 0
    image = image[y0 : y0 + crop_h, x0 : x0 + crop_w]
    ids = ids[y0 : y0 + crop_h, x0 : x0 + crop_w]
    out_img = np.zeros((crop_h, crop_w, 3), dtype=np.uint8)
    out_ids = np.zeros((crop_h, crop_w), dtype=ids.dtype)
    padding = np.ones((crop_h, crop_w), dtype=bool)
    h, w = ids.shape
    out_img[:h, :w] = image
    out_ids[:h, :w] = ids
    padding[:h, :w] = False
    return out_img, out_ids, padding

"""The one input policy of the toolkit: how a user's image becomes the network input, and back.

Loading (`load_image`): any image file PIL can read becomes uint8 RGB [H, W, 3]:
    * EXIF orientation is applied first (a phone photo is seen the way it is displayed);
    * grayscale (L, 1) is replicated to three channels;
    * palette (P, PA) is expanded to its colours (a transparent palette entry counts as alpha);
    * alpha (RGBA, LA, PA) is dropped by compositing on black (pixel * alpha / 255);
    * 16-bit and 32-bit integer images (I;16, I) are scaled to 8 bits (value * 255 / 65535, rounded);
      float images (F) are taken as 0..1 when their maximum is <= 1, otherwise as 0..255, then clipped;
    * CMYK, YCbCr, LAB and HSV are converted by PIL to RGB.
    A missing file, a file that is not an image, or a truncated one is a `UserError` naming the file.

Resizing (`letterbox`), the official MaskConver serving policy: scale the image by
    s = min(H_in / h, W_in / w)
keeping its aspect ratio (PIL bilinear, which low-pass filters when shrinking), place it at the top-left
corner and pad the bottom and right with zeros up to the network size (H_in, W_in). An image that already
has the network size passes through untouched.

Mapping back (`unletterbox`): crop the network-size output to the resized image's area (top-left), then
resize it to the original size with nearest-neighbour sampling (pixel centres), so ids are never blended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from maskconver_deploy.errors import UserError

__all__ = ["Letterbox", "load_image", "letterbox", "unletterbox", "to_rgb_uint8"]


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the network input: original size, resized size, network size."""

    original: tuple[int, int]  # (h, w) of the user's image
    resized: tuple[int, int]  # (h, w) after the aspect-preserving resize (top-left of the input)
    size: tuple[int, int]  # (H, W) of the network input
    scale: float  # resized / original

    @property
    def is_identity(self) -> bool:
        return self.original == self.size and self.resized == self.size


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] -> uint8 [H, W, 3], colour * alpha (black background)."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to uint8 RGB [H, W, 3] (rules in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode in ("RGBa", "La"):  # premultiplied alpha: the colour is already composited on black
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        return _composite_on_black(np.asarray(img.convert("RGBA"), dtype=np.uint8))
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str | Path, apply_exif: bool = True) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3], EXIF orientation applied (policy in the module docstring).

    `apply_exif=False` keeps the stored pixel order (for annotations made on the unrotated pixels).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("no such image file", path)
    try:
        with Image.open(path) as img:
            img.load()
            if apply_exif:
                img = ImageOps.exif_transpose(img)
            array = to_rgb_uint8(img)
    except UnidentifiedImageError:
        raise UserError("not an image file PIL can read", path) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise UserError(f"cannot decode image ({exc})", path) from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"decoded to an unusable array of shape {array.shape}", path)
    return array


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        raise UserError(f"expected a uint8 RGB image [H, W, 3], got {got}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise UserError(f"empty image of shape {image.shape}")


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Fit `image` (uint8 [h, w, 3]) into `size` = (H, W): aspect-preserving bilinear resize, zero pad bottom/right."""
    _check_image(image)
    out_h, out_w = int(size[0]), int(size[1])
    h, w = image.shape[:2]
    if (h, w) == (out_h, out_w):
        return image, Letterbox((h, w), (h, w), (out_h, out_w), 1.0)
    scale = min(out_h / h, out_w / w)
    new_h = min(out_h, max(1, int(round(h * scale))))
    new_w = min(out_w, max(1, int(round(w * scale))))
    if (new_h, new_w) == (h, w):
        resized = image
    else:
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8)
    canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas, Letterbox((h, w), (new_h, new_w), (out_h, out_w), float(scale))


def unletterbox(label_map: np.ndarray, box: Letterbox) -> np.ndarray:
    """Inverse of `letterbox` for an integer map [H, W]: crop the resized area, nearest-resize to the original size."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or tuple(label_map.shape) != tuple(box.size):
        raise UserError(f"expected a map of shape {tuple(box.size)}, got {label_map.shape}")
    if box.is_identity:
        return label_map
    rh, rw = box.resized
    h, w = box.original
    cropped = label_map[:rh, :rw]
    rows = np.minimum(((np.arange(h) + 0.5) * (rh / h)).astype(np.int64), rh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (rw / w)).astype(np.int64), rw - 1)
    return np.ascontiguousarray(cropped[rows[:, None], cols[None, :]])

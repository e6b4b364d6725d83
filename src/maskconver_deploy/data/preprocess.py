"""The one input policy of the toolkit: how a user's image becomes the network input, and back.

Loading (`load_image`): any image file PIL can read becomes uint8 RGB [H, W, 3]:
    * EXIF orientation is applied first (a phone photo is seen the way it is displayed);
    * grayscale (L, 1) is replicated to three channels;
    * palette (P, PA) is expanded to its colours (a transparent palette entry counts as alpha);
    * alpha (RGBA, LA, PA) is dropped by compositing on black (pixel * alpha / 255);
    * 16-bit and 32-bit integer images (I;16, I) are scaled to 8 bits (value * 255 / 65535, rounded);
      float images (F) are taken as 0..1 when their maximum is <= 1, otherwise as 0..255, then clipped;
    * CMYK, YCbCr, LAB and HSV are converted by PIL to RGB.
    Every failure to open or decode a user's file is one `UserError` naming the file: missing, not a file,
    not an image PIL can read (with PIL's reason, e.g. an unsupported pixel mode), truncated or corrupt data,
    zero width or height, a mode that cannot become RGB, and images over the size limit: more pixels than
    `max_pixels()` (PIL's decompression-bomb limit, 2 x `PIL.Image.MAX_IMAGE_PIXELS`, about 179 million).
    Between 1x and 2x MAX_IMAGE_PIXELS PIL only warns (DecompressionBombWarning); such an image is legitimate
    here and is loaded reduced (below), without the warning.

Large images (`load_image_fitted`, what `predict` and the Python API use): an image of more than
LARGE_IMAGE_PIXELS pixels is decoded at reduced size when it is at least twice the network input in both
directions: a JPEG through PIL's `draft` (the decoder's DCT scaling: 1/2, 1/4 or 1/8, never below twice the
network size), any other format by `Image.reduce` (box filter, integer factor) before the mode conversion. The
letterbox then resizes as usual; the answer is mapped back to the image's displayed size.

Resizing (`letterbox`), the official MaskConver serving policy: scale the image by
    s = min(H_in / h, W_in / w)
keeping its aspect ratio (PIL bilinear, which low-pass filters when shrinking), place it at the top-left
corner and pad the bottom and right with zeros up to the network size (H_in, W_in). An image that already
has the network size passes through untouched.

Mapping back (`unletterbox`): crop the network-size output to the resized image's area (top-left), then
resize it to the original size with nearest-neighbour sampling (pixel centres), so ids are never blended.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from maskconver_deploy.errors import UserError

__all__ = ["Letterbox", "load_image", "load_image_fitted", "letterbox", "unletterbox", "to_rgb_uint8", "resize_nearest",
           "max_pixels"]  # fmt: skip

LARGE_IMAGE_PIXELS = 16_000_000  # above this, load_image_fitted decodes at reduced size (module docstring)
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def max_pixels() -> int | None:
    """The largest image (in pixels) that is decoded: PIL's decompression-bomb error limit (None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


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


_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"GIF8": "GIF",
               b"BM": "BMP", b"RIFF": "WEBP"}  # fmt: skip


def _unidentified_reason(path: Path) -> str:
    """Why PIL could not open `path`: the complaint of the format plugin its signature or extension names
    (e.g. 'TIFF: unknown pixel mode'), or '' when none applies."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if not head:
        return "the file is empty"
    kind = next((fmt for magic, fmt in _SIGNATURES.items() if head.startswith(magic)), None)
    if kind == "PNG" and len(head) == 24 and head[12:16] == b"IHDR":
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if width == 0 or height == 0:
            return f"its PNG header gives a zero size, {width}x{height} pixels"
    kind = kind or Image.registered_extensions().get(path.suffix.lower())
    if kind is None:
        return ""
    previous = getattr(Image, "WARN_POSSIBLE_FORMATS", False)
    Image.WARN_POSSIBLE_FORMATS = True  # PIL then warns with each plugin's own exception text
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                Image.open(path).close()
            except Exception:  # noqa: BLE001 - only the warnings are wanted
                pass
    finally:
        Image.WARN_POSSIBLE_FORMATS = previous
    prefix = f"{kind} opening failed. "
    reasons = [str(w.message)[len(prefix):] for w in caught if str(w.message).startswith(prefix)]
    return f"{kind}: {reasons[0]}" if reasons else f"a {kind} file PIL cannot open"


def _reduce_for(img: Image.Image, fit: tuple[int, int]) -> Image.Image:
    """A loaded image reduced by an integer factor while it stays >= 2x the network size (or itself)."""
    need = 2 * max(int(fit[0]), int(fit[1]))
    factor = min(img.width // need, img.height // need)
    if factor < 2:
        return img
    try:
        return img.reduce(factor)
    except (ValueError, NotImplementedError):  # a mode reduce does not take (palette, ...): convert first
        if img.mode in ("P", "PA", "1"):
            return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB").reduce(factor)
        return img


def _load(path: str | Path, apply_exif: bool, fit: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 RGB [h, w, 3] and the displayed (H, W) of the full image (h, w smaller only when `fit` reduced it)."""
    path = Path(path)
    if not path.exists():
        raise UserError("no such image file", path)
    if not path.is_file():
        raise UserError("is not a file (an image file is expected)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # legitimate here, see the docstring
            with Image.open(path) as img:
                width, height = img.size
                if width < 1 or height < 1:
                    raise UserError(f"has zero size ({width}x{height} pixels)", path)
                orientation = img.getexif().get(0x0112, 1) if apply_exif else 1
                displayed = (width, height) if orientation not in _SWAPS_AXES else (height, width)
                large = fit is not None and width * height > LARGE_IMAGE_PIXELS
                if large and img.format == "JPEG":
                    need = 2 * max(int(fit[0]), int(fit[1]))  # type: ignore[index]
                    img.draft("RGB", (need, need))  # decodes at 1/2, 1/4 or 1/8 while both sides stay >= need
                img.load()
                if large:
                    img = _reduce_for(img, fit)  # type: ignore[arg-type]
                if apply_exif:
                    img = ImageOps.exif_transpose(img)
                array = to_rgb_uint8(img)
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"is too large to decode: more than the limit of {max_pixels():,} pixels "
                        "(PIL's decompression-bomb guard, Image.MAX_IMAGE_PIXELS)", path) from None  # fmt: skip
    except UnidentifiedImageError:
        reason = _unidentified_reason(path)
        detail = f" ({reason})" if reason else ""
        raise UserError(f"not an image file PIL can read{detail}", path) from None
    except MemoryError:
        raise UserError("is too large to decode in the memory available", path) from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, an unsupported mode: any decoder error
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot decode image ({type(exc).__name__}: {text})", path) from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"decoded to an unusable array of shape {array.shape}", path)
    return array, (int(displayed[1]), int(displayed[0]))


def load_image(path: str | Path, apply_exif: bool = True) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3], EXIF orientation applied (policy in the module docstring).

    `apply_exif=False` keeps the stored pixel order (for annotations made on the unrotated pixels).
    """
    return _load(path, apply_exif, None)[0]


def load_image_fitted(path: str | Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an image for a network of input `size` (H, W): (uint8 RGB image, displayed (H, W) of the file).

    The image is the file's at full size, except for large images (module docstring), which come reduced;
    map an answer back to the second value with `resize_nearest`.
    """
    return _load(path, True, (int(size[0]), int(size[1])))


def resize_nearest(label_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An integer map [h, w] resized to `shape` (H, W) by nearest-neighbour sampling of pixel centres."""
    label_map = np.asarray(label_map)
    h, w = label_map.shape[:2]
    if (h, w) == tuple(shape):
        return label_map
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * (h / shape[0])).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * (w / shape[1])).astype(np.int64), w - 1)
    return np.ascontiguousarray(label_map[rows[:, None], cols[None, :]])


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

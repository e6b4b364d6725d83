"""COCO-panoptic files: the JSON (images, annotations with `segments_info`, categories with `isthing`) and the
segment-id PNGs (id = R + 256 * G + 256^2 * B, 0 = VOID).

Data folder layout used by the whole toolkit (`--data DIR`):
    DIR/images/<split>/<file_name>                 photos (file names from the JSON's `images`)
    DIR/annotations/panoptic_<split>.json          COCO-panoptic JSON
    DIR/annotations/panoptic_<split>/<png>         one segment-id PNG per annotation (`file_name`)

Every problem with these files is a one-line `UserError` naming the file: a missing JSON, PNG or photo,
malformed JSON, an unknown category id, an empty split, and ids in a PNG that its annotation does not list
(or listed segments absent from the PNG; checked whenever a PNG is read).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from maskconver_deploy.data.preprocess import load_image
from maskconver_deploy.data.records import DatasetMeta, PanopticRecord, SegmentInfo
from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import atomic_path, read_json, refuse_overwrite, write_json
from maskconver_deploy.types import LABEL_DIVISOR, VOID_ID, Category, PanopticOutput

__all__ = [
    "MAX_SEGMENT_ID",
    "rgb2id",
    "id2rgb",
    "read_id_map",
    "write_id_map",
    "segment_stats",
    "check_ids_match",
    "parse_categories",
    "parse_segments",
    "split_paths",
    "load_split",
    "load_annotations",
    "load_panoptic_json",
    "load_example",
    "panoptic_to_coco",
    "PredictionWriter",
    "write_panoptic_json",
]

MAX_SEGMENT_ID = 256**3 - 1
_DIRECT_LIMIT = 1 << 18  # ids below this are counted with bincount instead of sorting


# ------------------------------------------------------------------------------------------- id PNGs


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int32 [H, W] segment ids (R + 256 G + 256^2 B)."""
    rgb = np.asarray(rgb)
    c = rgb.astype(np.int32)
    return c[..., 0] + 256 * c[..., 1] + 65536 * c[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """int [H, W] segment ids (0 .. 256^3 - 1) -> uint8 [H, W, 3]."""
    ids = np.asarray(ids).astype(np.int64)
    out = np.empty(ids.shape + (3,), dtype=np.uint8)
    out[..., 0] = ids & 255
    out[..., 1] = (ids >> 8) & 255
    out[..., 2] = (ids >> 16) & 255
    return out


def read_id_map(png_path: str | Path) -> np.ndarray:
    """Read a segment-id PNG as int32 [H, W].

    RGB (and the RGB part of RGBA) is decoded as R + 256 G + 256^2 B; a palette PNG by its colours;
    a single-channel PNG (L, I;16, I) holds the ids directly.
    """
    path = Path(png_path)
    if not path.is_file():
        raise UserError("no such segment PNG", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # as load_image: large is legitimate
            img = Image.open(path)
        with img:
            img.load()
            mode = img.mode
            if mode in ("L", "I", "I;16", "I;16L", "I;16B"):
                return np.asarray(img).astype(np.int32)
            if mode != "RGB":
                img = img.convert("RGBA" if mode in ("RGBA", "PA", "LA") else "RGB")
            array = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise UserError("not a PNG image", path) from None
    except Image.DecompressionBombError:
        raise UserError("is too large to decode (PIL's decompression-bomb limit)", path) from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data: any decoder error is the file's
        raise UserError(f"cannot decode segment PNG ({type(exc).__name__}: {exc})", path) from None
    return rgb2id(array[..., :3])


def write_id_map(path: str | Path, ids: np.ndarray, force: bool = False) -> Path:
    """Write int [H, W] segment ids as an RGB PNG (atomically; refuses to overwrite unless `force`)."""
    path = Path(path)
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"expected an integer id map [H, W], got {ids.dtype} {ids.shape}", path)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > MAX_SEGMENT_ID):
        raise UserError(f"segment ids must lie in 0..{MAX_SEGMENT_ID}, got {int(ids.min())}..{int(ids.max())}", path)
    with atomic_path(path, force=force, suffix=".png") as tmp:
        Image.fromarray(id2rgb(ids)).save(tmp, format="PNG", compress_level=1)
    return path


def segment_stats(ids: np.ndarray) -> dict[int, tuple[int, tuple[int, int, int, int]]]:
    """Area and COCO bbox [x, y, w, h] of every non-VOID id in a map."""
    ids = np.asarray(ids)
    out: dict[int, tuple[int, tuple[int, int, int, int]]] = {}
    if ids.size == 0:
        return out
    low, high = int(ids.min()), int(ids.max())
    if low >= 0 and high < _DIRECT_LIMIT:  # small ids (the toolkit's own encoding): linear-time counting
        labels = ids.astype(np.int32, copy=False)
        counts_all = np.bincount(labels.ravel(), minlength=high + 1)
        values = np.flatnonzero(counts_all)
        counts = counts_all[values]
        all_slices = ndimage.find_objects(labels)
        slices = [all_slices[v - 1] if v > 0 else None for v in values.tolist()]
    else:
        values, inverse, counts = np.unique(ids.ravel(), return_inverse=True, return_counts=True)
        slices = ndimage.find_objects(inverse.reshape(ids.shape).astype(np.int32) + 1)
    for value, count, sl in zip(values.tolist(), counts.tolist(), slices):
        if value == VOID_ID or sl is None:
            continue
        ys, xs = sl
        out[int(value)] = (int(count), (xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start))
    return out


def check_ids_match(ids: np.ndarray, segments: Iterable[SegmentInfo], path: str | Path) -> None:
    """UserError unless the non-VOID ids of the map are exactly the listed segment ids."""
    present = {int(v) for v in np.unique(ids).tolist()} - {VOID_ID}
    listed = {int(s.id) for s in segments}
    extra = sorted(present - listed)
    if extra:
        raise UserError(f"ids {_short(extra)} are in the PNG but not in the JSON segments_info", path)
    missing = sorted(listed - present)
    if missing:
        raise UserError(f"segments {_short(missing)} are in the JSON segments_info but not in the PNG", path)


def _short(values: list[int], keep: int = 5) -> str:
    text = ", ".join(str(v) for v in values[:keep])
    return f"[{text}{', ...' if len(values) > keep else ''}]"


# ------------------------------------------------------------------------------------------- JSON


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not an object", path)
    if key not in obj:
        raise UserError(f"{where} has no '{key}'", path)
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise UserError(f"{where}: '{key}' has the wrong type ({type(value).__name__})", path)
    return value


def parse_categories(raw: Any, path: str | Path) -> list[Category]:
    """The JSON's `categories` list as Category values (file order)."""
    path = Path(path)
    if not isinstance(raw, list) or not raw:
        raise UserError("'categories' must be a non-empty list", path)
    out = []
    for i, item in enumerate(raw):
        where = f"categories[{i}]"
        _require(item, "id", int, where, path)
        _require(item, "isthing", (int, bool), where, path)
        color = item.get("color", (0, 0, 0))
        if not (isinstance(color, (list, tuple)) and len(color) == 3):
            raise UserError(f"{where}: 'color' must be three integers", path)
        try:
            name = str(item.get("name", item["id"]))
            out.append(Category(int(item["id"]), name, bool(item["isthing"]), tuple(int(c) for c in color)))
        except (TypeError, ValueError):
            raise UserError(f"{where} is malformed", path) from None
    return out


def parse_segments(raw: Any, where: str, path: str | Path, meta: DatasetMeta | None = None) -> list[SegmentInfo]:
    """An annotation's `segments_info` as SegmentInfo values; checks ids (unique, not VOID) and categories."""
    path = Path(path)
    if not isinstance(raw, list):
        raise UserError(f"{where}: 'segments_info' must be a list", path)
    out: list[SegmentInfo] = []
    seen: set[int] = set()
    for j, item in enumerate(raw):
        w = f"{where} segment {j}"
        seg_id = _require(item, "id", int, w, path)
        category_id = _require(item, "category_id", int, w, path)
        if not 0 < seg_id <= MAX_SEGMENT_ID:
            raise UserError(f"{w}: id {seg_id} is outside 1..{MAX_SEGMENT_ID} (0 is VOID)", path)
        if seg_id in seen:
            raise UserError(f"{w}: duplicate segment id {seg_id}", path)
        seen.add(seg_id)
        if meta is not None and not meta.has_category(category_id):
            raise UserError(f"{w}: unknown category id {category_id}", path)
        bbox = item.get("bbox", (0, 0, 0, 0))
        try:
            out.append(
                SegmentInfo(
                    id=int(seg_id),
                    category_id=int(category_id),
                    iscrowd=bool(item.get("iscrowd", 0)),
                    area=int(item.get("area", 0)),
                    bbox=tuple(int(v) for v in bbox),  # type: ignore[arg-type]
                )
            )
        except (TypeError, ValueError):
            raise UserError(f"{w} is malformed", path) from None
    return out


def _read_annotations(json_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data = read_json(json_path)
    if not isinstance(data, dict):
        raise UserError("not a COCO-panoptic JSON (the top level is not an object)", json_path)
    annotations = data.get("annotations")
    if not isinstance(annotations, list):
        raise UserError("not a COCO-panoptic JSON (no 'annotations' list)", json_path)
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        _require(ann, "file_name", str, where, json_path)
        if "image_id" not in ann or not isinstance(ann["image_id"], (int, str)) or isinstance(ann["image_id"], bool):
            raise UserError(f"{where} has no integer or string 'image_id'", json_path)
    return data, annotations


def load_panoptic_json(
    json_path: str | Path, png_dir: str | Path, meta: DatasetMeta | None = None
) -> tuple[DatasetMeta | None, dict[int | str, tuple[Path, list[SegmentInfo]]]]:
    """Annotations only (ground truth or predictions): image_id -> (PNG path, segments).

    `images` is not needed. Categories come from `meta` when given, otherwise from the JSON (None if absent).
    Segment categories are checked whenever categories are known; PNG files must exist.
    """
    json_path, png_dir = Path(json_path), Path(png_dir)
    data, annotations = _read_annotations(json_path)
    if meta is None and "categories" in data:
        meta = DatasetMeta(parse_categories(data["categories"], json_path))
    if not png_dir.is_dir():
        raise UserError("no such PNG folder", png_dir)
    out: dict[int | str, tuple[Path, list[SegmentInfo]]] = {}
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}] (image {ann['image_id']})"
        if ann["image_id"] in out:
            raise UserError(f"{where}: a second annotation for the same image", json_path)
        segments = parse_segments(ann.get("segments_info"), where, json_path, meta)
        png = png_dir / ann["file_name"]
        if not png.is_file():
            raise UserError("segment PNG listed in the JSON is missing", png)
        out[ann["image_id"]] = (png, segments)
    return meta, out


def load_annotations(
    json_path: str | Path, png_dir: str | Path, image_dir: str | Path | None = None, verify: bool = False
) -> tuple[DatasetMeta, list[PanopticRecord]]:
    """Read a COCO-panoptic JSON and its PNG folder into records.

    `image_dir` holds the photos (named by `images[].file_name`); when None, photos are looked up beside the
    JSON and not checked here. PNG (and, with `image_dir`, photo) files must exist. `verify=True` also reads
    every PNG and checks its ids against the JSON (slow on big sets; `load_example` checks each one it reads).
    """
    json_path, png_dir = Path(json_path), Path(png_dir)
    data, annotations = _read_annotations(json_path)
    if "categories" not in data:
        raise UserError("no 'categories' list (COCO-panoptic ground truth needs one)", json_path)
    meta = DatasetMeta(parse_categories(data["categories"], json_path))
    images = data.get("images")
    if not isinstance(images, list):
        raise UserError("no 'images' list (COCO-panoptic ground truth needs one)", json_path)
    image_info: dict[int | str, dict[str, Any]] = {}
    for i, img in enumerate(images):
        where = f"images[{i}]"
        _require(img, "file_name", str, where, json_path)
        _require(img, "height", int, where, path=json_path)
        _require(img, "width", int, where, path=json_path)
        if "id" not in img or not isinstance(img["id"], (int, str)):
            raise UserError(f"{where} has no integer or string 'id'", json_path)
        image_info[img["id"]] = img
    if not png_dir.is_dir():
        raise UserError("no such PNG folder", png_dir)
    base = Path(image_dir) if image_dir is not None else json_path.parent
    if image_dir is not None and not base.is_dir():
        raise UserError("no such image folder", base)
    records: list[PanopticRecord] = []
    seen: set[int | str] = set()
    for i, ann in enumerate(annotations):
        image_id = ann["image_id"]
        where = f"annotations[{i}] (image {image_id})"
        if image_id in seen:
            raise UserError(f"{where}: a second annotation for the same image", json_path)
        seen.add(image_id)
        info = image_info.get(image_id)
        if info is None:
            raise UserError(f"{where}: no entry in 'images' for this image_id", json_path)
        segments = parse_segments(ann.get("segments_info"), where, json_path, meta)
        png = png_dir / ann["file_name"]
        if not png.is_file():
            raise UserError("segment PNG listed in the JSON is missing", png)
        photo = base / info["file_name"]
        if image_dir is not None and not photo.is_file():
            raise UserError("image listed in the JSON is missing", photo)
        record = PanopticRecord(image_id, photo, png, int(info["height"]), int(info["width"]), segments)
        if verify:
            ids = read_id_map(png)
            if ids.shape != (record.height, record.width):
                size = f"{ids.shape[1]}x{ids.shape[0]}"
                raise UserError(f"PNG is {size} but the JSON says {record.width}x{record.height}", png)
            check_ids_match(ids, segments, png)
        records.append(record)
    return meta, records


def split_paths(data_dir: str | Path, split: str) -> tuple[Path, Path, Path]:
    """(json, png_dir, image_dir) of a split in the toolkit's data folder layout."""
    data_dir = Path(data_dir)
    ann = data_dir / "annotations"
    return ann / f"panoptic_{split}.json", ann / f"panoptic_{split}", data_dir / "images" / split


def available_splits(data_dir: str | Path) -> list[str]:
    """Split names that have an annotation JSON in a data folder."""
    ann = Path(data_dir) / "annotations"
    if not ann.is_dir():
        return []
    return sorted(p.stem[len("panoptic_") :] for p in ann.glob("panoptic_*.json"))


def load_split(data_dir: str | Path, split: str, verify: bool = False) -> tuple[DatasetMeta, list[PanopticRecord]]:
    """Load one split of a data folder (layout in the module docstring); an empty split is a UserError."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError("no such data folder", data_dir)
    json_path, png_dir, image_dir = split_paths(data_dir, split)
    if not json_path.is_file():
        splits = available_splits(data_dir)
        known = f"splits here: {', '.join(splits)}" if splits else "no annotations/panoptic_<split>.json at all"
        raise UserError(f"no annotations/panoptic_{split}.json ({known})", data_dir)
    meta, records = load_annotations(json_path, png_dir, image_dir, verify=verify)
    if not records:
        raise UserError(f"split '{split}' has no annotated images", json_path)
    return meta, records


def load_example(record: PanopticRecord) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB [H, W, 3] photo, int32 [H, W] segment ids) of a record, checked against each other."""
    ids = read_id_map(record.png_path)
    check_ids_match(ids, record.segments, record.png_path)
    image = load_image(record.image_path)
    if image.shape[:2] != ids.shape:
        raw = load_image(record.image_path, apply_exif=False)  # annotated without the EXIF rotation
        if raw.shape[:2] != ids.shape:
            raise UserError(
                f"image is {image.shape[1]}x{image.shape[0]} but its segment PNG is {ids.shape[1]}x{ids.shape[0]}",
                record.image_path,
            )
        image = raw
    return image, ids


# ------------------------------------------------------------------------------------------- predictions


def panoptic_to_coco(out: PanopticOutput, meta: DatasetMeta) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A model answer as COCO panoptic: (int32 id map, segments_info). The segment id is the panoptic id
    itself; category_id is the data set id of the segment's class index."""
    ids = np.ascontiguousarray(out.panoptic, dtype=np.int32)
    segments = []
    for seg_id, (area, bbox) in segment_stats(ids).items():
        class_index = seg_id // meta.label_divisor - 1
        if not 0 <= class_index < meta.num_classes:
            raise UserError(
                f"prediction has segment id {seg_id}: class index {class_index} is outside 0..{meta.num_classes - 1}"
            )
        category_id = meta.categories[class_index].id
        segments.append({"id": seg_id, "category_id": category_id, "iscrowd": 0, "area": area, "bbox": list(bbox)})
    return ids, segments


def write_panoptic_json(
    path: str | Path,
    annotations: list[dict[str, Any]],
    categories: list[Category],
    images: list[dict[str, Any]] | None = None,
    info: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a COCO-panoptic JSON atomically."""
    obj: dict[str, Any] = {}
    if info is not None:
        obj["info"] = info
    if images is not None:
        obj["images"] = images
    obj["annotations"] = annotations
    obj["categories"] = [c.to_dict() for c in categories]
    return write_json(path, obj, force=force)


class PredictionWriter:
    """Writes model answers as a COCO-panoptic prediction folder:
    `out_dir/panoptic/<png file_name>` per image and `out_dir/panoptic.json` (written atomically by `close`)."""

    def __init__(self, out_dir: str | Path, meta: DatasetMeta, force: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.force = force
        self.png_dir = self.out_dir / "panoptic"
        self.json_path = self.out_dir / "panoptic.json"
        refuse_overwrite(self.json_path, force)
        if self.png_dir.exists() and any(self.png_dir.iterdir()) and not force:
            raise UserError("already holds predictions; pass --force to overwrite them", self.png_dir)
        self.png_dir.mkdir(parents=True, exist_ok=True)
        self._annotations: list[dict[str, Any]] = []
        self._images: list[dict[str, Any]] = []
        self._closed = False

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()

    def add(self, record: PanopticRecord, out: PanopticOutput) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Write one answer's PNG; returns what `panoptic_to_coco` made of it."""
        if self._closed:
            raise RuntimeError("PredictionWriter is closed")
        ids, segments = panoptic_to_coco(out, self.meta)
        file_name = Path(record.png_path.name).with_suffix(".png").name
        write_id_map(self.png_dir / file_name, ids, force=True)
        self._annotations.append({"image_id": record.image_id, "file_name": file_name, "segments_info": segments})
        height, width = (int(v) for v in ids.shape)
        self._images.append({"id": record.image_id, "file_name": record.image_path.name, "height": height, "width": width})
        return ids, segments

    def close(self) -> Path:
        """Write the JSON (once) and return its path."""
        if not self._closed:
            write_panoptic_json(
                self.json_path, self._annotations, self.meta.categories, images=self._images, force=self.force
            )
            self._closed = True
        return self.json_path

"""Calibration sets: the one image format every int8 path reads (ONNX Runtime QDQ, TFLite int8, TensorRT int8).

A calibration set is a folder:
    images/0000.jpg ...   the source photos, byte for byte (JPEG and PNG; other formats are saved as PNG), any size
    manifest.json         format, version, source (data folder, split, its generator info), seed, the images'
                          sizes, and per image: file, source file, image id, height, width, sha256
`manifest_hash` (sha256 of the manifest's canonical JSON) goes into every int8 artifact's build record, so an
artifact names the exact images it was calibrated on. Images are drawn from one split (default `train`) with a
seeded choice, which keeps them disjoint from the split that evaluation uses. Each compile letterboxes the images
to its model's input size (`images(size)`, the policy of data/preprocess.py). numpy and PIL only.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import atomic_path, sha256_bytes, sha256_file

FORMAT = "maskconver-calibration"
VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGES_DIR = "images"
KEPT_FORMATS = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png"}  # copied byte for byte; others become PNG
MAKE_HINT = "make one with `maskconver calib make --data DIR --out calibration/NAME`"


class CalibrationSet:
    """A loaded, checked calibration folder: `len(set)` images, read lazily by `images()`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.manifest_hash = manifest_hash(manifest)
        self._files = [self.path / entry["file"] for entry in manifest["images"]]

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"CalibrationSet({str(self.path)!r}, {len(self)} images, {self.manifest_hash[:12]})"

    def images(self, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """uint8 RGB [H, W, 3] images in manifest order; letterboxed to `size` = (H, W) when given."""
        from maskconver_deploy.data.preprocess import letterbox, load_image

        for file in self._files:
            image = load_image(file)
            if size is not None:
                image, _ = letterbox(image, (int(size[0]), int(size[1])))
            yield image


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace): independent of formatting."""
    return sha256_bytes(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())


def _source_info(data_dir: Path, split: str) -> dict[str, Any]:
    """The `info` block of a split's annotation JSON (the synthetic generator writes its version and seed there)."""
    from maskconver_deploy.data.coco_panoptic import split_paths

    json_path, _, _ = split_paths(data_dir, split)
    try:
        info = json.loads(json_path.read_text()).get("info", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}


def make_calibration(
    data_dir: str | Path,
    out: str | Path,
    *,
    n: int = 64,
    split: str = "train",
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Copy `n` images of `split` (a seeded choice, kept in file order) into a new calibration folder `out`.

    The folder is written atomically (it appears complete or not at all); an existing one is replaced only with
    `force`. A split with fewer than `n` images is a UserError.
    """
    from PIL import Image

    from maskconver_deploy.data.coco_panoptic import load_split
    from maskconver_deploy.data.preprocess import load_image

    data_dir, out = Path(data_dir), Path(out)
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", out)
    _, records = load_split(data_dir, split)
    if len(records) < n:
        raise UserError(f"split '{split}' has {len(records)} images, fewer than --n {n}", data_dir)
    picks = sorted(np.random.default_rng(seed).choice(len(records), size=n, replace=False).tolist())
    entries: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    with atomic_path(out, force=force, suffix="") as tmp:
        (tmp / IMAGES_DIR).mkdir(parents=True)
        for slot, index in enumerate(picks):
            record = records[index]
            image = load_image(record.image_path)  # decodes: a broken source image stops here
            suffix = Path(record.image_path).suffix.lower()
            if suffix in KEPT_FORMATS:  # the source file's exact bytes (a PNG of a decoded JPEG is 5x larger)
                name = f"{IMAGES_DIR}/{slot:04d}{KEPT_FORMATS[suffix]}"
                shutil.copyfile(record.image_path, tmp / name)
            else:
                name = f"{IMAGES_DIR}/{slot:04d}.png"
                Image.fromarray(image).save(tmp / name, format="PNG", optimize=True)
            height, width = image.shape[:2]
            sizes[f"{height}x{width}"] = sizes.get(f"{height}x{width}", 0) + 1
            entries.append({
                "file": name,
                "source_file": Path(record.image_path).name,
                "image_id": record.image_id,
                "height": int(height),
                "width": int(width),
                "sha256": sha256_file(tmp / name),
            })  # fmt: skip
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "source": {"data_dir": str(data_dir), "split": split, "images_in_split": len(records),
                       "info": _source_info(data_dir, split)},  # fmt: skip
            "seed": int(seed),
            "n": len(entries),
            "sizes": sizes,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "images": entries,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def load_calibration(path: str | Path) -> CalibrationSet:
    """Open and check a calibration folder: manifest present and well-formed, at least one image, every image
    present with the sha256 the manifest records. Every problem is a one-line UserError naming the path."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such calibration folder; {MAKE_HINT}", path)
    if not path.is_dir():
        raise UserError(f"not a calibration folder (a file); {MAKE_HINT}", path)
    manifest_file = path / MANIFEST_NAME
    if not manifest_file.is_file():
        if not any(path.iterdir()):
            raise UserError(f"empty calibration folder (no {MANIFEST_NAME}, no images); {MAKE_HINT}", path)
        raise UserError(f"not a calibration set: no {MANIFEST_NAME}; {MAKE_HINT}", path)
    try:
        manifest = json.loads(manifest_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"not valid JSON ({exc})", manifest_file) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"not a calibration manifest (expected format '{FORMAT}')", manifest_file)
    if manifest.get("version") != VERSION:
        raise UserError(f"calibration manifest version {manifest.get('version')!r} is not {VERSION}", manifest_file)
    images = manifest.get("images")
    if not isinstance(images, list) or not all(isinstance(e, dict) and "file" in e and "sha256" in e for e in images):
        raise UserError("calibration manifest has no valid 'images' list (file and sha256 per image)", manifest_file)
    if not images:
        raise UserError(f"empty calibration set: the manifest lists no images; {MAKE_HINT}", manifest_file)
    for entry in images:
        file = path / str(entry["file"])
        if not file.is_file():
            raise UserError(f"calibration image listed in {MANIFEST_NAME} is missing", file)
        if sha256_file(file) != entry["sha256"]:
            raise UserError(f"calibration image does not match the sha256 in {MANIFEST_NAME} (changed or corrupt)",
                            file)  # fmt: skip
    return CalibrationSet(path, manifest)


def describe(calibration: CalibrationSet) -> dict[str, Any]:
    """What `maskconver calib show` prints: size, source, seed, image sizes, hash."""
    source = calibration.manifest.get("source", {})
    info = source.get("info", {}) if isinstance(source, dict) else {}
    return {
        "path": str(calibration.path),
        "images": len(calibration),
        "sizes": calibration.manifest.get("sizes", {}),
        "source": source.get("data_dir") if isinstance(source, dict) else None,
        "split": source.get("split") if isinstance(source, dict) else None,
        "generator": info.get("description"),
        "generator_seed": info.get("seed"),
        "generator_version": info.get("generator_version"),
        "seed": calibration.manifest.get("seed"),
        "bytes": sum(p.stat().st_size for p in (calibration.path / IMAGES_DIR).glob("*") if p.is_file()),
        "created_at": calibration.manifest.get("created_at"),
        "manifest_hash": calibration.manifest_hash,
    }

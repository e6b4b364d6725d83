"""`maskconver predict`: panoptic segmentation of image files with any backend, written as files a person and a
COCO-panoptic tool can read.

Per image STEM.EXT, in --out:
    STEM.png           COCO-panoptic segment-id PNG (id = R + 256 G + 256^2 B, 0 = VOID); the segment id is the
                       toolkit's panoptic id, (class index + 1) * 1000 + instance
    STEM.json          its segments: id, category_id (the model's data set ids), category name, isthing, iscrowd,
                       area, bbox [x, y, w, h], score, plus the image size, backend and preset
    STEM.overlay.png   the image with each segment tinted in its class colour, boundaries white, VOID dimmed
With `--format coco-instances` (alone or in a comma list with `panoptic`, the default), the thing segments of
every image also go into one COCO instance results file, `instances.json` in --out: a list of {image_id,
category_id, segmentation (RLE), score}, what `pycocotools.coco.COCO.loadRes` reads. The image id is the file's
stem as an integer when it is all digits (COCO's `000000142238.jpg` -> 142238), else the stem.
The image goes through the toolkit's one input policy (data/preprocess.py: EXIF rotation, grayscale, alpha,
16-bit converted; aspect-preserving letterbox into the network size; the answer mapped back to the image's size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from maskconver_deploy.cli.options import CheckpointOpt, ForceOpt, JsonOpt, ModelDirOpt, ThreadsOpt
from maskconver_deploy.errors import UserError
from maskconver_deploy.types import LABEL_DIVISOR

OVERLAY_SUFFIX = ".overlay.png"
INSTANCES_JSON = "instances.json"
FORMATS = ("panoptic", "coco-instances")


def parse_formats(text: str) -> list[str]:
    """'panoptic,coco-instances' -> the formats asked for (UserError on an unknown one)."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise UserError(f"unknown --format {(unknown or [text])[0]!r}; use {', '.join(FORMATS)} (a comma list)")
    return [f for f in FORMATS if f in names]


def image_id_of(path: Path) -> int | str:
    """COCO image id of an image file: its stem as an integer when all digits, else the stem."""
    return int(path.stem) if path.stem.isdigit() else path.stem


def output_paths(out: Path, image: Path) -> dict[str, Path]:
    stem = image.stem
    return {"panoptic": out / f"{stem}.png", "segments": out / f"{stem}.json", "overlay": out / f"{stem}{OVERLAY_SUFFIX}"}


def segments_info(answer: Any, categories: list[Any], label_divisor: int = LABEL_DIVISOR) -> list[dict[str, Any]]:
    """COCO-panoptic segments of a PanopticOutput, with the model's category ids, names and scores."""
    from maskconver_deploy.api import segments_of

    return segments_of(answer, categories, label_divisor)


def _at_size(answer: Any, shape: tuple[int, int]) -> Any:
    """The answer with its panoptic map resized (nearest) to `shape`, the file's displayed size."""
    import dataclasses

    from maskconver_deploy.data.preprocess import resize_nearest

    if tuple(answer.panoptic.shape) == tuple(shape):
        return answer
    return dataclasses.replace(answer, panoptic=resize_nearest(answer.panoptic, shape))


def _save_png(path: Path, array: np.ndarray, force: bool) -> None:
    from PIL import Image

    from maskconver_deploy.fileio import atomic_path

    with atomic_path(path, force=force) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _check_images(images: list[Path], out: Path, force: bool, formats: tuple[str, ...] = ("panoptic",),
                  size: tuple[int, int] = (256, 256)) -> None:  # fmt: skip
    """Every image readable, no two with the same stem, no output overwritten without --force, before any work."""
    from maskconver_deploy.data.preprocess import load_image_fitted
    from maskconver_deploy.fileio import refuse_overwrite

    if not images:
        raise UserError("give at least one image file")
    seen: dict[str, Path] = {}
    for path in images:
        load_image_fitted(path, size)  # one line naming the file for every way it can fail to open or decode
        if path.stem in seen:
            raise UserError(f"has the same name as {seen[path.stem]}: their outputs would collide in {out}", path)
        seen[path.stem] = path
        if "panoptic" in formats:
            for target in output_paths(out, path).values():
                refuse_overwrite(target, force)
    if "coco-instances" in formats:
        refuse_overwrite(out / INSTANCES_JSON, force)


def _open_runner(checkpoint: Path | None, preset: str | None, model_dir: Path | None, backend: str | None,
                 threads: int | None) -> Any:  # fmt: skip
    from maskconver_deploy.backends import open_runner, parse_backend

    if (checkpoint is None) == (model_dir is None):
        raise UserError("give either --checkpoint (the PyTorch reference) or --model-dir (an exported model folder)")
    if checkpoint is not None:
        name = str(parse_backend(backend or "torch"))
        if not name.startswith("torch"):
            raise UserError(f"--checkpoint runs the PyTorch reference (backend torch or torch-cuda), not '{name}'; "
                            "use --model-dir for other backends")  # fmt: skip
        if not checkpoint.is_file():
            raise UserError("no such checkpoint file", checkpoint)
        runner = open_runner(name, checkpoint=checkpoint, threads=threads)
        source = checkpoint
    else:
        assert model_dir is not None
        if not model_dir.is_dir():
            raise UserError("no such model folder", model_dir)
        name = str(parse_backend(backend or "ort"))
        runner = open_runner(name, model_dir=model_dir, threads=threads)
        source = model_dir
    if preset is not None and runner.meta.preset != preset:
        what = "checkpoint" if checkpoint is not None else "model folder"
        raise UserError(f"{what} is for preset '{runner.meta.preset}', not '{preset}'", source)
    return runner


ImagesArg = Annotated[
    list[Path],
    typer.Argument(help="Image files (any format PIL reads; grayscale, RGBA, 16-bit and EXIF-rotated photos are "
                   "converted).", show_default=False),
]  # fmt: skip
PresetCheckOpt = Annotated[
    Optional[str],
    typer.Option("--preset", "-p", help="Preset the model must be for (checked, not converted): coco-640, "
                 "coco-256, cityscapes, shapes-256."),
]  # fmt: skip
PredictBackendOpt = Annotated[
    Optional[str],
    typer.Option("--backend", "-b", help="Backend to run --model-dir with (default ort): torch, ort, ort-mobile, "
                 "ort-int8-dynamic, ort-int8-static, tflite[-fp16|-int8-dynamic|-int8], tensorrt[-fp16|-int8]."),
]  # fmt: skip
FormatOpt = Annotated[
    str,
    typer.Option("--format", "-f", help="What to write: panoptic (STEM.png, STEM.json, STEM.overlay.png per image), "
                 "coco-instances (instances.json: thing segments as COCO instance results), or both, comma-separated."),
]  # fmt: skip
OutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="Output folder (created): STEM.png, STEM.json, STEM.overlay.png per image."),
]


def predict(
    images: ImagesArg,
    checkpoint: CheckpointOpt = None,
    preset: PresetCheckOpt = None,
    model_dir: ModelDirOpt = None,
    backend: PredictBackendOpt = None,
    out: OutOpt = None,
    threads: ThreadsOpt = None,
    output_format: FormatOpt = "panoptic",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Segment images with the PyTorch reference (--checkpoint) or any compiled backend (--model-dir, --backend):
    writes a COCO-panoptic PNG, its segments as JSON and an overlay PNG per image."""
    from maskconver_deploy.cli.console import print_json, print_table
    from maskconver_deploy.data.coco_panoptic import write_id_map
    from maskconver_deploy.data.preprocess import load_image_fitted
    from maskconver_deploy.fileio import write_json
    from maskconver_deploy.pipeline import overlay

    if out is None:
        raise UserError("--out is required (the folder that receives the PNG, JSON and overlay files)")
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", out)
    formats = tuple(parse_formats(output_format))
    runner = _open_runner(checkpoint, preset, model_dir, backend, threads)
    meta = runner.meta
    _check_images(images, out, force, formats, tuple(meta.input_size))
    categories = list(meta.categories)
    colors = [c.color for c in categories]
    summary = []
    instances: list[dict[str, Any]] = []
    with runner:
        for path in images:
            image, shown = load_image_fitted(path, tuple(meta.input_size))
            answer = runner.predict(image)
            small = answer.panoptic  # at the decoded size (smaller than the file's only for large images)
            answer = _at_size(answer, shown)
            paths = output_paths(out, path)
            segments = segments_info(answer, categories, meta.label_divisor)
            row: dict[str, Any] = {"image": str(path), "segments": len(segments)}
            if "coco-instances" in formats:
                from maskconver_deploy.metrics.coco_instances import result_instances

                found = result_instances(answer.panoptic, answer.scores, [c.id for c in categories],
                                         [c.isthing for c in categories], image_id_of(path), meta.label_divisor)
                instances.extend(found)
                row["instances"] = len(found)
            height, width = (int(v) for v in answer.panoptic.shape)
            names = sorted({s["category_name"] for s in segments})
            row.update({"size": f"{width}x{height}", "categories": ", ".join(names) or "-",
                        "latency_ms": runner.last_latency_s * 1000.0, "files": {}})  # fmt: skip
            summary.append(row)
            if "panoptic" not in formats:
                continue
            row["files"] = {k: str(v) for k, v in paths.items()}
            write_id_map(paths["panoptic"], answer.panoptic, force=force)
            write_json(paths["segments"], {
                "image": str(path), "file_name": paths["panoptic"].name, "height": height, "width": width,
                "backend": runner.name, "preset": meta.preset, "input_size": list(meta.input_size),
                "merge": meta.merge, "mask_activation": meta.mask_activation, "segments_info": segments,
            }, force=force)  # fmt: skip
            _save_png(paths["overlay"], overlay(image, small, colors), force=force)  # at the decoded size
    extra: dict[str, Any] = {}
    if "coco-instances" in formats:
        extra["instances_json"] = str(write_json(out / INSTANCES_JSON, instances, force=force))
    if as_json:
        print_json({"backend": runner.name, "preset": meta.preset, "merge": meta.merge,
                    "mask_activation": meta.mask_activation, "out": str(out), "images": summary, **extra})  # fmt: skip
        return
    fallback = INSTANCES_JSON
    rows = [{**row, "output": Path(row["files"]["panoptic"]).name if row["files"] else fallback} for row in summary]
    print_table(rows, columns=["image", "size", "segments", "categories", "latency_ms", "output"],
                title=f"{runner.name} ({meta.preset}, merge path {meta.merge}/{meta.mask_activation}) -> {out}")  # fmt: skip

"""`maskconver predict` on the tiny model: PNG + JSON + overlay per image, every ORT backend and torch, the images
users really have, a real photo, and bad input (one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from maskconver_deploy.cli import app
from maskconver_deploy.data.coco_panoptic import read_id_map
from maskconver_deploy.data.synthetic import SHAPES_CATEGORIES, generate_scene

from tests.parity import artifacts

BACKENDS = ("torch", *artifacts.ORT_BACKENDS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    artifacts.require_onnxruntime()
    return artifacts.compiled_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def checkpoint(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts.checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A square scene at the model's size and a wide one that the letterbox has to pad."""
    folder = tmp_path_factory.mktemp("scenes")
    square = folder / "square.png"
    Image.fromarray(generate_scene(5, 0, 64).image).save(square)
    wide = folder / "wide.jpg"
    Image.fromarray(generate_scene(5, 1, 120).image[:80]).save(wide, quality=92)
    return [square, wide]


def _invoke(*args: str):
    return CliRunner().invoke(app, ["predict", *args])


def _check_outputs(out: Path, image: Path, size: tuple[int, int]) -> dict:
    """The three files exist, the PNG's ids are exactly the JSON's segments, areas and bboxes agree."""
    png, segments_json, overlay = out / f"{image.stem}.png", out / f"{image.stem}.json", out / f"{image.stem}.overlay.png"
    ids = read_id_map(png)
    assert ids.shape == size
    info = json.loads(segments_json.read_text())
    assert (info["height"], info["width"]) == size and info["file_name"] == png.name
    listed = {s["id"]: s for s in info["segments_info"]}
    present = set(np.unique(ids).tolist()) - {0}
    assert set(listed) == present
    shapes_ids = {c.id: c for c in SHAPES_CATEGORIES}
    for seg_id, seg in listed.items():
        mask = ids == seg_id
        assert seg["area"] == int(mask.sum())
        rows, cols = np.nonzero(mask)
        assert seg["bbox"] == [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)]
        category = shapes_ids[seg["category_id"]]
        assert seg["category_name"] == category.name and seg["isthing"] == int(category.isthing)
        assert 0.0 <= seg["score"] <= 1.0
    with Image.open(overlay) as img:
        assert img.mode == "RGB" and img.size == (size[1], size[0])
    return info


def test_predict_with_the_checkpoint(checkpoint: Path, scenes: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _invoke(*map(str, scenes), "--checkpoint", str(checkpoint), "--preset", "shapes-256", "--out", str(out), "--json")
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["backend"] == "torch" and len(summary["images"]) == 2
    _check_outputs(out, scenes[0], (64, 64))
    info = _check_outputs(out, scenes[1], (80, 120))  # mapped back to the image's own size
    assert info["segments_info"], "the tiny model answers with segments"
    table = _invoke(*map(str, scenes), "--checkpoint", str(checkpoint), "--out", str(out), "--force")
    assert table.exit_code == 0 and "square.png" in table.output


def test_predict_on_every_ort_backend_and_torch(model_dir: Path, scenes: list[Path], tmp_path: Path) -> None:
    maps = {}
    for backend in BACKENDS:
        out = tmp_path / backend
        done = _invoke(*map(str, scenes), "--model-dir", str(model_dir), "--backend", backend, "--out", str(out), "--threads", "1")
        assert done.exit_code == 0, f"{backend}: {done.output}"
        for image, size in zip(scenes, [(64, 64), (80, 120)]):
            info = _check_outputs(out, image, size)
            assert info["backend"] == backend
        maps[backend] = [read_id_map(out / f"{image.stem}.png") for image in scenes]
    for backend in ("ort", "ort-mobile"):  # fp32 runs the same answer as the reference
        for ours, reference in zip(maps[backend], maps["torch"]):
            assert (ours == reference).mean() >= 0.999, backend


def _user_images(folder: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """Files as people have them, with the (height, width) they are displayed at."""
    rgb = generate_scene(6, 0, 96).image[:, :72]  # 96 high, 72 wide
    made: dict[str, tuple[Path, tuple[int, int]]] = {}
    path = folder / "gray.png"
    Image.fromarray(rgb.mean(axis=2).astype(np.uint8)).save(path)
    made["gray"] = (path, (96, 72))
    path = folder / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(path)
    made["rgba"] = (path, (96, 72))
    path = folder / "deep.png"
    deep = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    assert deep.mode.startswith("I;16")
    deep.save(path)
    made["16-bit"] = (path, (96, 72))
    path = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 72 high, 96 wide
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), quality=92)
    made["exif"] = (path, (72, 96))
    return made


def test_predict_takes_the_images_users_have(model_dir: Path, tmp_path: Path) -> None:
    made = _user_images(tmp_path)
    out = tmp_path / "out"
    done = _invoke(*(str(p) for p, _ in made.values()), "--model-dir", str(model_dir), "--out", str(out))
    assert done.exit_code == 0, done.output
    for path, size in made.values():
        _check_outputs(out, path, size)


def test_predict_on_a_real_photo(model_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    photo = sorted((shared_data / "coco_panoptic_sample" / "input_images").glob("*.jpg"))[0]
    with Image.open(photo) as img:
        width, height = img.size
    out = tmp_path / "out"
    done = _invoke(str(photo), "--model-dir", str(model_dir), "--backend", "ort-mobile", "--out", str(out))
    assert done.exit_code == 0, done.output
    _check_outputs(out, photo, (height, width))


def _png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG file (8-bit RGB) whose header says width x height; its pixel data `idat` (zlib), black by default."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" * (1 + 3 * width) for _ in range(height)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _tiff_two_16bit_samples(path: Path, width: int = 8, height: int = 8) -> Path:
    """A valid baseline TIFF with 2 samples of 16 bits per pixel: a pixel mode PIL has no decoder for."""
    import struct

    data = bytes(width * height * 4)
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 2, (16, 16)), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 10 + 4), (277, 3, 1, 2), (278, 4, 1, height), (279, 4, 1, len(data)),
               (284, 3, 1, 1)]  # fmt: skip
    ifd = b""
    for tag, kind, count, value in entries:
        if kind == 3 and count == 2:
            ifd += struct.pack("<HHIHH", tag, kind, count, *value)
        elif kind == 3:
            ifd += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, kind, count, value)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)) + ifd + bytes(4) + data)
    return path


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each way a user's file can fail to open or decode, and words the one-line error must have."""
    text = folder / "notes.png"
    text.write_text("not an image at all\n")
    full = folder / "full.png"
    Image.fromarray(generate_scene(7, 0, 64).image).save(full)
    truncated = folder / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    (folder / "a-folder.png").mkdir()
    zero = folder / "zero.png"
    zero.write_bytes(_png(0, 8, b""))
    bomb = folder / "bomb.png"  # 20000 x 20000 declared in 70 bytes: over PIL's decompression-bomb limit
    bomb.write_bytes(_png(20000, 20000, b""))
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(_png(8, 8, b"this is not a zlib stream"))
    return {
        "missing": (folder / "nowhere.jpg", "no such image file"),
        "not an image": (text, "not an image file PIL can read"),
        "truncated": (truncated, "cannot decode image"),
        "empty file": (empty, "the file is empty"),
        "a folder": (folder / "a-folder.png", "is not a file"),
        "zero size": (zero, "zero size, 0x8 pixels"),
        "decompression bomb": (bomb, "too large to decode: more than the limit of 178,956,970 pixels"),
        "corrupt data": (corrupt, "cannot decode image (OSError"),
        "unsupported pixel mode": (_tiff_two_16bit_samples(folder / "two-samples.tif"), "TIFF: unknown pixel mode"),
    }


BAD_KINDS = ["missing", "not an image", "truncated", "empty file", "a folder", "zero size", "decompression bomb",
             "corrupt data", "unsupported pixel mode"]  # fmt: skip


@pytest.mark.parametrize("problem", BAD_KINDS)
def test_bad_images_are_one_line_exit_2(checkpoint: Path, tmp_path: Path, problem: str) -> None:
    path, words = _bad_files(tmp_path)[problem]
    good = tmp_path / "good.png"
    Image.fromarray(generate_scene(7, 1, 64).image).save(good)
    out = tmp_path / "out"
    done = _invoke(str(good), str(path), "--checkpoint", str(checkpoint), "--out", str(out))
    assert done.exit_code == 2, done.output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], done.stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in done.output
    assert not out.exists() or not any(out.iterdir())  # checked before anything is written


def test_an_image_between_the_bomb_warning_and_error_limits_is_read_without_a_warning(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and refuses above twice that: the first is a
    legitimate large image here, read quietly; the second is one line and exit 2. The limit is lowered to keep
    the images small; the files and PIL's checks are real."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 60)
    warned = tmp_path / "warned.png"
    Image.fromarray(generate_scene(7, 2, 80).image[:, :70]).save(warned)  # 5600 px: between 3600 and 7200
    refused = tmp_path / "refused.png"
    Image.fromarray(generate_scene(7, 3, 90).image).save(refused)  # 8100 px: over 7200
    out = tmp_path / "out"
    with _no_warnings():
        done = _invoke(str(warned), "--checkpoint", str(checkpoint), "--out", str(out))
    assert done.exit_code == 0, done.output
    assert "Warning" not in done.stderr
    assert read_id_map(out / "warned.png").shape == (80, 70)
    again = _invoke(str(refused), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out2"))
    assert again.exit_code == 2 and "more than the limit of 7,200 pixels" in again.stderr, again.output


def _no_warnings():
    import warnings

    catcher = warnings.catch_warnings()

    class _Strict:
        def __enter__(self):
            catcher.__enter__()
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a leaked warning would fail the run

        def __exit__(self, *exc):
            return catcher.__exit__(*exc)

    return _Strict()


def test_a_large_photo_is_decoded_reduced_and_answered_at_its_size(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JPEG over LARGE_IMAGE_PIXELS (lowered here) is decoded by the JPEG decoder at 1/2..1/8 scale (draft),
    never below twice the network size; the answer still has the photo's size."""
    from maskconver_deploy.data import preprocess

    monkeypatch.setattr(preprocess, "LARGE_IMAGE_PIXELS", 100_000)
    photo = tmp_path / "large.jpg"
    scene = np.asarray(Image.fromarray(generate_scene(8, 0, 128).image).resize((1200, 1200)))[:900]
    Image.fromarray(scene).save(photo, quality=90)
    image, shown = preprocess.load_image_fitted(photo, (64, 64))
    assert shown == (900, 1200) and image.shape == (225, 300, 3)  # 1/4: 1/8 would be 112 high, under 2 x 64
    png = tmp_path / "large.png"
    Image.fromarray(scene).save(png)
    image, shown = preprocess.load_image_fitted(png, (64, 64))
    assert shown == (900, 1200) and image.shape == (129, 172, 3)  # Image.reduce(7): min(900 // 128, 1200 // 128)
    out = tmp_path / "out"
    done = _invoke(str(photo), "--checkpoint", str(checkpoint), "--out", str(out))
    assert done.exit_code == 0, done.output
    assert read_id_map(out / "large.png").shape == (900, 1200)
    assert json.loads((out / "large.json").read_text())["height"] == 900


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--preset", "coco-256"], "is for preset 'shapes-256', not 'coco-256'"),
        (["--backend", "ort"], "--checkpoint runs the PyTorch reference"),
        (["--model-dir", "."], "either --checkpoint"),
        (["--backend", "torch-int4"], "unknown backend"),
    ],
)
def test_bad_options_are_one_line_exit_2(checkpoint: Path, scenes: list[Path], tmp_path: Path, extra: list[str],
                                         words: str) -> None:  # fmt: skip
    done = _invoke(str(scenes[0]), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), *extra)
    assert done.exit_code == 2, done.output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr


def test_a_checkpoint_that_is_not_one_is_exit_2(scenes: list[Path], tmp_path: Path) -> None:
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"\x00" * 100)
    done = _invoke(str(scenes[0]), "--checkpoint", str(fake), "--out", str(tmp_path / "out"))
    assert done.exit_code == 2 and str(fake) in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_existing_outputs_need_force(checkpoint: Path, scenes: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _invoke(str(scenes[0]), "--checkpoint", str(checkpoint), "--out", str(out)).exit_code == 0
    before = (out / "square.png").read_bytes()
    again = _invoke(str(scenes[0]), "--checkpoint", str(checkpoint), "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert (out / "square.png").read_bytes() == before
    forced = _invoke(str(scenes[0]), "--checkpoint", str(checkpoint), "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    assert not [p for p in out.iterdir() if p.name.startswith(".maskconver-tmp")]


def test_coco_instances_load_with_pycocotools_and_score_as_eval_does(checkpoint: Path, tmp_path: Path) -> None:
    """predict --format coco-instances writes a COCO results list that COCO().loadRes reads and COCOeval scores
    against the ground truth that eval --save-predictions converts; the AP equals eval's from the same images."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from maskconver_deploy.data import load_split
    from maskconver_deploy.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "shapes", n=6, size=64, seed=2, val_fraction=0.5).out
    _, records = load_split(data, "val")
    images = [str(r.image_path) for r in records]
    out = tmp_path / "pred"
    done = _invoke(*images, "--checkpoint", str(checkpoint), "--out", str(out), "--format", "coco-instances", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["instances_json"] == str(out / "instances.json")
    assert not list(out.glob("*.png")), "coco-instances alone writes no per-image files"
    results = json.loads((out / "instances.json").read_text())
    assert isinstance(results, list) and results, "the tiny model finds thing instances"
    assert {r["image_id"] for r in results} <= {r.image_id for r in records}
    saved = tmp_path / "eval"
    evaluated = CliRunner().invoke(app, ["eval", "--checkpoint", str(checkpoint), "--data", str(data),
                                         "--save-predictions", str(saved), "--json"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    mask_ap = json.loads(evaluated.stdout)["mask_ap"]
    assert mask_ap["n_gt"] > 0 and mask_ap["ap"] is not None
    assert json.loads((saved / "instances.json").read_text()) == results  # the same answers, either command
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(saved / "instances_gt.json"))
        evaluator = COCOeval(gt, gt.loadRes(str(out / "instances.json")), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert 100.0 * evaluator.stats[0] == pytest.approx(mask_ap["ap"])
    assert 100.0 * evaluator.stats[1] == pytest.approx(mask_ap["ap50"])
    again = _invoke(*images, "--checkpoint", str(checkpoint), "--out", str(out), "--format", "coco-instances")
    assert again.exit_code == 2 and "instances.json" in again.stderr and "--force" in again.stderr
    bad = _invoke(*images, "--checkpoint", str(checkpoint), "--out", str(out), "--format", "coco-boxes")
    assert bad.exit_code == 2 and "unknown --format 'coco-boxes'" in bad.stderr

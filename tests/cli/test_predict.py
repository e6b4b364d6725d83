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


def _bad_files(folder: Path) -> dict[str, Path]:
    text = folder / "notes.png"
    text.write_text("not an image at all\n")
    full = folder / "full.png"
    Image.fromarray(generate_scene(7, 0, 64).image).save(full)
    truncated = folder / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return {"missing": folder / "nowhere.jpg", "not an image": text, "truncated": truncated}


@pytest.mark.parametrize("problem", ["missing", "not an image", "truncated"])
def test_bad_images_are_one_line_exit_2(checkpoint: Path, tmp_path: Path, problem: str) -> None:
    path = _bad_files(tmp_path)[problem]
    good = tmp_path / "good.png"
    Image.fromarray(generate_scene(7, 1, 64).image).save(good)
    out = tmp_path / "out"
    done = _invoke(str(good), str(path), "--checkpoint", str(checkpoint), "--out", str(out))
    assert done.exit_code == 2, done.output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], done.stderr
    assert "Traceback" not in done.output
    assert not out.exists() or not any(out.iterdir())  # checked before anything is written


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

"""`maskconver calib make/show` and the calibration-set format every int8 path reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maskconver_deploy.calibration import MANIFEST_NAME, load_calibration, make_calibration, manifest_hash
from maskconver_deploy.cli import app
from maskconver_deploy.data.coco_panoptic import load_split
from maskconver_deploy.data.synthetic import write_dataset
from maskconver_deploy.errors import UserError

from tests.conftest import one_line_exit_2, skip_unless_ci

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "calibration" / "shapes-64"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synth") / "shapes", n=10, size=48, seed=3, val_fraction=0.3).out


def test_make_writes_images_and_a_manifest_from_the_train_split(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibration" / "small"
    result = CliRunner().invoke(app, ["calib", "make", "--data", str(data_dir), "--n", "4", "--out", str(out),
                                      "--seed", "5", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    calibration = load_calibration(out)
    assert summary["images"] == len(calibration) == 4 and summary["manifest_hash"] == calibration.manifest_hash
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format"] == "maskconver-calibration" and manifest["version"] == 1
    assert manifest["source"]["split"] == "train" and manifest["seed"] == 5 and manifest["sizes"] == {"48x48": 4}
    assert manifest["source"]["info"]["generator_version"] >= 1
    _, train = load_split(data_dir, "train")
    _, val = load_split(data_dir, "val")
    ids = {entry["image_id"] for entry in manifest["images"]}
    assert ids <= {r.image_id for r in train} and not ids & {r.image_id for r in val}  # disjoint from evaluation
    for entry in manifest["images"]:  # byte-for-byte copies of the source photos
        source = next(r.image_path for r in train if r.image_id == entry["image_id"])
        assert (out / entry["file"]).read_bytes() == Path(source).read_bytes()
    images = list(calibration.images())
    assert all(i.dtype == np.uint8 and i.shape == (48, 48, 3) for i in images)
    boxed = list(calibration.images((32, 64)))  # letterboxed to a model size (H, W)
    assert all(i.shape == (32, 64, 3) for i in boxed) and not boxed[0][:, 32:].any()
    again = make_calibration(data_dir, tmp_path / "again", n=4, seed=5)
    assert [e["sha256"] for e in json.loads((again / MANIFEST_NAME).read_text())["images"]] == \
        [e["sha256"] for e in manifest["images"]]  # fmt: skip
    shown = CliRunner().invoke(app, ["calib", "show", "--calib", str(out)])
    assert shown.exit_code == 0 and "48x48" in shown.output


def test_make_refuses_overwrite_and_impossible_requests(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "calib"
    runner = CliRunner()
    assert runner.invoke(app, ["calib", "make", "--data", str(data_dir), "--n", "2", "--out", str(out)]).exit_code == 0
    first = manifest_hash(json.loads((out / MANIFEST_NAME).read_text()))
    line = one_line_exit_2(runner.invoke(app, ["calib", "make", "--data", str(data_dir), "--n", "3", "--out", str(out)]))
    assert "already exists; pass --force" in line
    assert load_calibration(out).manifest_hash == first
    done = runner.invoke(app, ["calib", "make", "--data", str(data_dir), "--n", "3", "--out", str(out), "--force"])
    assert done.exit_code == 0 and len(load_calibration(out)) == 3
    line = one_line_exit_2(runner.invoke(app, ["calib", "make", "--data", str(data_dir), "--n", "50", "--out",
                                                str(tmp_path / "big")]))  # fmt: skip
    assert "has 7 images, fewer than --n 50" in line and not (tmp_path / "big").exists()
    line = one_line_exit_2(runner.invoke(app, ["calib", "make", "--data", str(tmp_path / "none"), "--out",
                                                str(tmp_path / "x")]))  # fmt: skip
    assert "no such data folder" in line
    assert not list(tmp_path.glob(".maskconver-tmp-*"))


def test_load_refuses_broken_sets(data_dir: Path, tmp_path: Path) -> None:
    good = make_calibration(data_dir, tmp_path / "good", n=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty calibration folder") as info:
        load_calibration(empty)
    assert str(empty) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="no such calibration folder"):
        load_calibration(tmp_path / "absent")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "a.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not a calibration set: no manifest.json"):
        load_calibration(stray)

    changed = tmp_path / "changed"
    shutil.copytree(good, changed)
    manifest = json.loads((changed / MANIFEST_NAME).read_text())
    image = changed / manifest["images"][1]["file"]
    image.write_bytes(image.read_bytes()[:-10])
    with pytest.raises(UserError, match="does not match the sha256") as info:
        load_calibration(changed)
    assert str(image) in str(info.value)
    image.unlink()
    with pytest.raises(UserError, match="is missing"):
        load_calibration(changed)
    manifest["images"] = []
    (changed / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="empty calibration set"):
        load_calibration(changed)
    (changed / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_calibration(changed)
    (changed / MANIFEST_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a calibration manifest"):
        load_calibration(changed)
    result = CliRunner().invoke(app, ["calib", "show", "--calib", str(empty)])
    assert "empty calibration folder" in one_line_exit_2(result)


def test_the_shipped_calibration_set() -> None:
    if not SHIPPED.is_dir():
        skip_unless_ci(f"{SHIPPED} is not in this checkout")
    calibration = load_calibration(SHIPPED)  # every image's sha256 is checked
    manifest = calibration.manifest
    assert len(calibration) == 64 and manifest["sizes"] == {"256x256": 64}
    assert manifest["source"]["split"] == "train" and manifest["source"]["info"]["description"].endswith("shapes")
    assert sum(p.stat().st_size for p in (SHIPPED / "images").iterdir()) < 4_000_000
    first = next(calibration.images((64, 64)))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8

"""The synthetic shapes generator: determinism, prefix-stable splits, scene content, and `maskconver data synth`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from maskconver_deploy.cli import app
from maskconver_deploy.data import load_example, load_split
from maskconver_deploy.data.coco_panoptic import check_ids_match, segment_stats
from maskconver_deploy.data.synthetic import MIN_AREA, SHAPES_CATEGORIES, generate_scene, split_of, write_dataset
from maskconver_deploy.errors import UserError
from maskconver_deploy.model.specs import PRESETS
from maskconver_deploy.types import LABEL_DIVISOR


def test_categories_fit_the_preset() -> None:
    spec = PRESETS["shapes-256"]
    assert [c.id for c in SHAPES_CATEGORIES] == list(range(1, 10))
    assert [c.name for c in SHAPES_CATEGORIES] == ["circle", "rectangle", "triangle", "cross", "ring", "sky", "grass", "water", "sand"]
    assert len(SHAPES_CATEGORIES) == spec.num_classes and sum(c.isthing for c in SHAPES_CATEGORIES) == spec.num_things
    assert all(c.isthing for c in SHAPES_CATEGORIES[:5]) and not any(c.isthing for c in SHAPES_CATEGORIES[5:])


def test_scene_is_deterministic_per_seed_and_index() -> None:
    a, b = generate_scene(3, 5, 96), generate_scene(3, 5, 96)
    assert (a.image == b.image).all() and (a.ids == b.ids).all() and a.segments == b.segments
    assert not (generate_scene(3, 6, 96).image == a.image).all()
    assert not (generate_scene(4, 5, 96).image == a.image).all()


def test_split_share_is_exact_and_prefix_stable() -> None:
    splits = [split_of(i, 0.1) for i in range(200)]
    assert splits.count("val") == 20
    assert [split_of(i, 0.25) for i in range(8)].count("val") == 2
    assert all(split_of(i, 0.0) == "train" for i in range(50))


@pytest.fixture(scope="module")
def scenes() -> list:  # type: ignore[type-arg]
    return [generate_scene(0, i, 256) for i in range(30)]


def test_ground_truth_is_consistent(scenes: list) -> None:  # type: ignore[type-arg]
    for scene in scenes:
        assert scene.image.shape == (256, 256, 3) and scene.image.dtype == np.uint8
        check_ids_match(scene.ids, scene.segments, "scene")
        stats = segment_stats(scene.ids)
        for seg in scene.segments:
            assert stats[seg.id] == (seg.area, tuple(seg.bbox))
            assert seg.area >= MIN_AREA
            category = SHAPES_CATEGORIES[seg.id // LABEL_DIVISOR - 1]
            assert category.id == seg.category_id
            assert (seg.id % LABEL_DIVISOR == 0) == (not category.isthing)


def test_scenes_have_the_hard_parts(scenes: list) -> None:  # type: ignore[type-arg]
    stuff_ids = {c.id for c in SHAPES_CATEGORIES if not c.isthing}
    crowd = small = void = islands = 0
    sizes: list[int] = []
    for scene in scenes:
        void += int((scene.ids == 0).any())
        for seg in scene.segments:
            crowd += int(seg.iscrowd)
            if seg.category_id in stuff_ids:
                _, parts = ndimage.label(scene.ids == seg.id)
                islands += int(parts >= 2)
            elif not seg.iscrowd:
                sizes.append(max(seg.bbox[2], seg.bbox[3]))
                small += int(max(seg.bbox[2], seg.bbox[3]) <= 20)  # the small things are 12-19 px across
    assert crowd >= 2 and void >= 5 and islands >= 5 and small >= 15
    assert max(sizes) > 60  # sizes vary from a few pixels to a sizeable part of the image
    per_image = [sum(1 for s in sc.segments if s.category_id not in stuff_ids) for sc in scenes]
    assert max(per_image) >= 6


def test_larger_n_only_adds_images(tmp_path: Path) -> None:
    small = write_dataset(tmp_path / "a", 6, size=64, seed=2, val_fraction=0.34)
    write_dataset(tmp_path / "b", 9, size=64, seed=2, val_fraction=0.34)
    assert (small.n_train, small.n_val) == (4, 2)
    for split in ("train", "val"):
        _, a = load_split(tmp_path / "a", split)
        _, b = load_split(tmp_path / "b", split)
        assert [r.image_id for r in a] == [r.image_id for r in b][: len(a)]
        for ra, rb in zip(a, b):
            assert ra.image_path.read_bytes() == rb.image_path.read_bytes()
            assert ra.segments == rb.segments


def test_val_only_folder_holds_the_same_val_images(tmp_path: Path) -> None:
    write_dataset(tmp_path / "full", 9, size=64, seed=2, val_fraction=0.34)
    only = write_dataset(tmp_path / "val", 9, size=64, seed=2, val_fraction=0.34, splits=("val",))
    assert (only.n_train, only.n_val) == (0, 3) and not (tmp_path / "val" / "images" / "train").exists()
    _, full = load_split(tmp_path / "full", "val")
    _, val = load_split(tmp_path / "val", "val")
    assert [r.image_id for r in val] == [r.image_id for r in full]
    assert all(a.image_path.read_bytes() == b.image_path.read_bytes() and a.segments == b.segments for a, b in zip(val, full))


def test_write_dataset_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="val-fraction"):
        write_dataset(tmp_path / "x", 3, size=64, val_fraction=1.0)
    with pytest.raises(UserError, match="splits"):
        write_dataset(tmp_path / "x", 3, size=64, splits=("test",))
    with pytest.raises(UserError, match="--n"):
        write_dataset(tmp_path / "x", 0, size=64)
    assert not (tmp_path / "x").exists()


def test_synth_command(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "shapes"
    args = ["data", "synth", "--out", str(out), "--n", "5", "--size", "64", "--seed", "1", "--val-fraction", "0.2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta, records = load_split(out, "train", verify=True)
    assert [c.id for c in meta.categories] == list(range(1, 10)) and len(records) == 4
    image, ids = load_example(records[0])
    assert image.shape == (64, 64, 3) and ids.shape == (64, 64)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    check = runner.invoke(app, ["data", "check", "--data", str(out), "--split", "val", "--json"])
    assert check.exit_code == 0 and '"images": 1' in check.output
    missing = runner.invoke(app, ["data", "check", "--data", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "no such data folder" in missing.output

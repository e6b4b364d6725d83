"""COCO-panoptic reading and writing on the real samples, and one-line errors for broken data folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskconver_deploy.data import (
    DatasetMeta,
    PredictionWriter,
    load_annotations,
    load_example,
    load_split,
    panoptic_to_coco,
    read_id_map,
    write_id_map,
)
from maskconver_deploy.data.coco_panoptic import id2rgb, rgb2id, segment_stats
from maskconver_deploy.errors import UserError
from maskconver_deploy.evaluate import evaluate_folders
from maskconver_deploy.types import LABEL_DIVISOR, Category, PanopticOutput


def _coco(shared_data: Path) -> tuple[Path, Path, Path]:
    d = shared_data / "coco_panoptic_sample"
    return d / "panoptic_examples.json", d / "panoptic_examples", d / "input_images"


def test_rgb_id_round_trip() -> None:
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 16777215, 4260062]], np.int64)
    assert (rgb2id(id2rgb(ids)) == ids).all()


def test_real_sample_records_and_meta(shared_data: Path) -> None:
    meta, records = load_annotations(*_coco(shared_data))
    assert len(meta.categories) == 133 and meta.num_things == 80
    assert all(meta.isthing[:80]) and not any(meta.isthing[80:])
    assert meta.class_index(1) == 0 and meta.category_id(0) == 1
    assert meta.categories[meta.class_index(184)].id == 184 and meta.class_index(184) >= 80
    with pytest.raises(UserError, match="unknown category id 999"):
        meta.class_index(999)
    assert [r.image_id for r in records] == [142238, 439180]
    assert [len(r.segments) for r in records] == [18, 32]
    first = records[0]
    assert (first.height, first.width) == (427, 640)
    crowd = [s for s in first.segments if s.iscrowd]
    assert len(crowd) == 1 and crowd[0].category_id == 1


def test_real_sample_examples_load_and_match(shared_data: Path) -> None:
    meta, records = load_annotations(*_coco(shared_data), verify=True)
    for record in records:
        image, ids = load_example(record)
        assert image.shape == (record.height, record.width, 3) and image.dtype == np.uint8
        assert ids.dtype == np.int32 and ids.shape == (record.height, record.width)
        stats = segment_stats(ids)
        for seg in record.segments:  # the JSON's areas and boxes are the PNG's
            assert stats[seg.id] == (seg.area, tuple(seg.bbox))


def test_real_two_channel_format_agrees(shared_data: Path) -> None:
    """The sample's 2-channel version (R = category, G = instance) describes the same segmentation."""
    _, records = load_annotations(*_coco(shared_data))
    for record in records:
        ids = read_id_map(record.png_path)
        two = np.asarray(Image.open(shared_data / "coco_panoptic_sample" / "panoptic_examples_2ch_format" / record.png_path.name))
        category = {s.id: s.category_id for s in record.segments}
        mapped = np.vectorize(lambda v: category.get(int(v), 0))(ids)
        labelled = ids > 0
        assert (two[..., 0][labelled] == mapped[labelled]).all()


def test_cityscapes_style_sample_with_string_ids_and_category_zero(shared_data: Path) -> None:
    d = shared_data / "deeplab2_testdata"
    meta, records = load_annotations(
        d / "derived" / "cityscapes_panoptic_dummy_trainId_coco.json",
        d / "gtFine" / "cityscapes_panoptic_dummy_trainId",
        d / "leftImg8bit",
        verify=True,
    )
    assert records[0].image_id == "dummy_000000_000000"
    assert meta.num_things == 8 and meta.class_index(0) == 8  # road (id 0) is the first stuff class
    image, ids = load_example(records[0])
    assert image.shape == (800, 800, 3) and int((ids == 0).sum()) == 571


def test_id_map_write_read_and_no_overwrite(tmp_path: Path) -> None:
    ids = np.array([[0, 1001, 9000], [16777215, 5, 0]], np.int32)
    path = write_id_map(tmp_path / "x.png", ids)
    assert (read_id_map(path) == ids).all()
    with pytest.raises(UserError, match="already exists"):
        write_id_map(path, ids)
    with pytest.raises(UserError, match="0..16777215"):
        write_id_map(tmp_path / "y.png", np.array([[-1]]))
    assert not (tmp_path / "y.png").exists()


# ----------------------------------------------------------------------------------------------- data folder errors


def _folder(tmp_path: Path) -> Path:
    """A two-image data folder in the toolkit layout, built from plain arrays."""
    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    (root / "annotations" / "panoptic_val").mkdir(parents=True)
    images, anns = [], []
    for i in range(2):
        ids = np.full((6, 8), 2000, np.int32)
        ids[1:4, 1:4] = 1001
        ids[5, 7] = 0
        Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(root / "images" / "val" / f"{i}.jpg")
        Image.fromarray(id2rgb(ids)).save(root / "annotations" / "panoptic_val" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 6, "width": 8})
        anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": [
            {"id": 1001, "category_id": 1, "iscrowd": 0, "area": 9, "bbox": [1, 1, 3, 3]},
            {"id": 2000, "category_id": 6, "iscrowd": 0, "area": 38, "bbox": [0, 0, 8, 6]},
        ]})
    cats = [{"id": 6, "name": "sky", "isthing": 0}, {"id": 1, "name": "circle", "isthing": 1}]
    (root / "annotations" / "panoptic_val.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _edit(root: Path, fn) -> None:  # type: ignore[no-untyped-def]
    path = root / "annotations" / "panoptic_val.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_valid_folder_loads_things_first(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    meta, records = load_split(root, "val", verify=True)
    assert [c.id for c in meta.categories] == [1, 6]  # things first, whatever the file order
    image, ids = load_example(records[1])
    assert image.shape == (6, 8, 3) and int(ids[2, 2]) == 1001


def _no_json(root: Path) -> None:
    (root / "annotations" / "panoptic_val.json").unlink()


def _bad_json(root: Path) -> None:
    (root / "annotations" / "panoptic_val.json").write_text("{not json")


def _unknown_category(root: Path) -> None:
    _edit(root, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=42))


def _empty(root: Path) -> None:
    _edit(root, lambda d: (d["annotations"].clear(), d["images"].clear()))


def _missing_image(root: Path) -> None:
    (root / "images" / "val" / "1.jpg").unlink()


def _missing_png(root: Path) -> None:
    (root / "annotations" / "panoptic_val" / "0.png").unlink()


def _wrong_type(root: Path) -> None:
    _edit(root, lambda d: d["annotations"][0].update(segments_info={"id": 1}))


def _no_categories(root: Path) -> None:
    _edit(root, lambda d: d.pop("categories"))


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_no_json, "no annotations/panoptic_val.json"),
        (_bad_json, "not valid JSON"),
        (_unknown_category, "unknown category id 42"),
        (_empty, "has no annotated images"),
        (_missing_image, "image listed in the JSON is missing"),
        (_missing_png, "segment PNG listed in the JSON is missing"),
        (_wrong_type, "must be a list"),
        (_no_categories, "no 'categories'"),
    ],
)
def test_broken_folders_are_one_line_user_errors(tmp_path: Path, breaker, message: str) -> None:  # type: ignore[no-untyped-def]
    root = _folder(tmp_path)
    breaker(root)
    with pytest.raises(UserError, match=message) as info:
        load_split(root, "val")
    assert "\n" not in str(info.value)


def test_png_and_json_disagree(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    png = root / "annotations" / "panoptic_val" / "0.png"
    ids = read_id_map(png)
    ids[0, 0] = 4321
    write_id_map(png, ids, force=True)
    _, records = load_split(root, "val")
    with pytest.raises(UserError, match=r"ids \[4321\] are in the PNG but not in the JSON"):
        load_example(records[0])
    with pytest.raises(UserError, match="4321"):
        load_split(root, "val", verify=True)
    _edit(root, lambda d: d["annotations"][1]["segments_info"].append({"id": 77, "category_id": 1, "iscrowd": 0}))
    _, records = load_split(root, "val")
    with pytest.raises(UserError, match=r"segments \[77\] are in the JSON segments_info but not in the PNG"):
        load_example(records[1])


def test_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such data folder"):
        load_split(tmp_path / "nothing", "val")


# ----------------------------------------------------------------------------------------------- predictions


def _output(panoptic: np.ndarray) -> PanopticOutput:
    return PanopticOutput(panoptic.astype(np.int32), np.ones(3, np.float32), np.zeros(3, np.int32), np.zeros((3, 2), np.int32))


def test_panoptic_to_coco_uses_dataset_ids() -> None:
    meta = DatasetMeta([Category(17, "sky", False), Category(3, "dog", True)])
    pan = np.zeros((4, 4), np.int32)
    pan[:2] = 2 * LABEL_DIVISOR  # class index 1 = sky (id 17)
    pan[2:, :2] = 1 * LABEL_DIVISOR + 1  # class index 0 = dog (id 3), instance 1
    ids, segments = panoptic_to_coco(_output(pan), meta)
    assert (ids == pan).all()
    by_id = {s["id"]: s for s in segments}
    assert by_id[2000]["category_id"] == 17 and by_id[2000]["area"] == 8 and by_id[2000]["bbox"] == [0, 0, 4, 2]
    assert by_id[1001]["category_id"] == 3 and by_id[1001]["iscrowd"] == 0
    with pytest.raises(UserError, match="class index 5"):
        panoptic_to_coco(_output(np.full((2, 2), 6 * LABEL_DIVISOR)), meta)


def test_prediction_writer_round_trip(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    meta, records = load_split(root, "val")
    out_dir = tmp_path / "pred"
    with PredictionWriter(out_dir, meta) as writer:
        for record in records:
            _, ids = load_example(record)
            # the data uses the toolkit's own encoding, so the ground truth is a perfect answer
            writer.add(record, _output(ids))
    assert writer.json_path.is_file() and len(list(writer.png_dir.glob("*.png"))) == 2
    result = evaluate_folders(root / "annotations" / "panoptic_val.json", root / "annotations" / "panoptic_val", writer.json_path, writer.png_dir)
    assert result["pq"]["all"]["pq"] == 100.0 and result["pq"]["all"]["n"] == 2
    with pytest.raises(UserError, match="already exists"):
        PredictionWriter(out_dir, meta)
    PredictionWriter(out_dir, meta, force=True)


def test_sample_copy_with_missing_prediction(shared_data: Path, tmp_path: Path) -> None:
    json_path, png_dir, _ = _coco(shared_data)
    data = json.loads(json_path.read_text())
    data["annotations"] = data["annotations"][:1]
    (tmp_path / "p.json").write_text(json.dumps(data))
    shutil.copytree(png_dir, tmp_path / "p")
    with pytest.raises(UserError, match="no prediction for 1 ground-truth images"):
        evaluate_folders(json_path, png_dir, tmp_path / "p.json", tmp_path / "p")

"""Built once per test session, shared by the parity and predict tests: a copy of the tiny model folder with
every ONNX Runtime artifact compiled (fp32 .ort, int8 dynamic and static, panoptic + raw graphs), a small
synthetic validation set, a calibration set, and helpers that turn any images into a one-off data set.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tests.bench import tinymodel

ORT_BACKENDS = ("ort", "ort-mobile", "ort-int8-dynamic", "ort-int8-static")
COMPILED = ("ort-mobile", "ort-int8-dynamic", "ort-int8-static")
VAL_IMAGES = 4
CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def require_onnxruntime() -> None:
    """tests/conftest.py's rule (skip, but fail under CI=true), taken from the module pytest already loaded."""
    import sys

    loaded = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(CONFTEST))
    loaded.require_runtime("onnxruntime", "ONNX Runtime", 'pip install -e "."')


def val_data(base: Path) -> Path:
    """BASE/parity-data: VAL_IMAGES synthetic scenes at the tiny size in the val split (seed 1), plus train scenes."""
    from maskconver_deploy.data.synthetic import write_dataset

    target = base / "parity-data"
    if not (target / "annotations" / "panoptic_val.json").is_file():
        write_dataset(target, n=2 * VAL_IMAGES, size=tinymodel.SIZE, seed=1, val_fraction=0.5, force=True)
    return target


def calibration(base: Path) -> Path:
    from maskconver_deploy.calibration import make_calibration

    target = base / "parity-calib"
    if not (target / "manifest.json").is_file():
        make_calibration(val_data(base), target, n=4, split="train", force=True)
    return target


def compiled_model_dir(base: Path) -> Path:
    """BASE/parity-model: the tiny model folder with every ORT artifact (panoptic and raw) compiled."""
    from maskconver_deploy.modeldir import ModelDir

    target = base / "parity-model"
    done = target / ".complete"
    if done.is_file():
        return target
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(tinymodel.tiny_model_dir(base), target)
    folder = ModelDir(target)
    calib = calibration(base)
    for name in COMPILED:
        for graph in ("panoptic", "raw"):
            folder.compile(name, graph=graph, calib=calib, force=True)
    done.write_text("ok\n")
    return target


def checkpoint(base: Path) -> Path:
    tinymodel.tiny_model_dir(base)
    return tinymodel.checkpoint_path(base)


def images_dataset(target: Path, images: list[np.ndarray], categories: list, answers: list | None = None) -> Path:
    """A COCO-panoptic folder (split val) holding `images`.

    Without `answers` the ground truth is all VOID: for inputs without annotations in the model's classes
    (noise, real photos), so only the agreement levels say anything and PQ against it is 0 for everyone.
    With `answers` (PanopticOutputs, one per image) the ground truth is those answers: a set labelled by the
    reference, on which the reference scores PQ 100 and a candidate's PQ drop is its disagreement."""
    from PIL import Image

    from maskconver_deploy.data.coco_panoptic import panoptic_to_coco, split_paths, write_id_map, write_panoptic_json
    from maskconver_deploy.data.records import DatasetMeta

    meta = DatasetMeta(list(categories))
    json_path, png_dir, image_dir = split_paths(target, "val")
    png_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for index, image in enumerate(images):
        name = f"{index:04d}"
        Image.fromarray(image).save(image_dir / f"{name}.png")
        if answers is None:
            ids, segments = np.zeros(image.shape[:2], dtype=np.int32), []
        else:
            ids, segments = panoptic_to_coco(answers[index], meta)
        write_id_map(png_dir / f"{name}.png", ids, force=True)
        entries.append({"id": index, "file_name": f"{name}.png", "height": image.shape[0], "width": image.shape[1]})
        annotations.append({"image_id": index, "file_name": f"{name}.png", "segments_info": segments})
    write_panoptic_json(json_path, annotations, meta.categories, images=entries, force=True)
    return target


def perturbed_model_dir(source: Path, target: Path) -> tuple[Path, str, str]:
    """A copy of a model folder (export files only) whose model.onnx has one perturbed Conv weight: a real fault
    in the `ort` candidate's artifact, while reference.pt and model.json stay as exported.
    Returns (folder, initializer name, consuming node name)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("model.json", "model.raw.onnx", "reference.pt"):
        shutil.copy2(source / name, target / name)
    weight, node = perturb_initializer(source / "model.onnx", target / "model.onnx")
    return target, weight, node


def perturb_initializer(source: Path, target: Path, scale: float = 3.0) -> tuple[str, str]:
    """Copy an ONNX file with one Conv weight in the middle of the graph multiplied by `scale`.

    Returns (initializer name, name of the node that consumes it)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    initializers = {init.name: init for init in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initializers]
    node = convs[len(convs) // 3]
    weight = initializers[node.input[1]]
    array = numpy_helper.to_array(weight).astype(np.float32) * np.float32(scale)
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(target))
    return weight.name, node.name

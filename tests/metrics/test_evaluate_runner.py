"""Streaming evaluation of a runner (a stand-in runner with known answers), and `maskconver eval` in both modes
(folders, and a real ONNX Runtime artifact)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import maskconver_deploy.backends as backends
from maskconver_deploy.cli import app
from maskconver_deploy.data import load_example, load_split
from maskconver_deploy.data.coco_panoptic import split_paths
from maskconver_deploy.data.synthetic import SHAPES_CATEGORIES, write_dataset
from maskconver_deploy.errors import UserError
from maskconver_deploy.evaluate import evaluate_folders, evaluate_runner
from maskconver_deploy.types import LABEL_DIVISOR, Category, ModelMeta, PanopticOutput


class LookupRunner:
    """Answers with a stored map per image (found by the image's bytes), like a model with known outputs."""

    def __init__(self, answers: dict[str, np.ndarray], categories: list[Category] = SHAPES_CATEGORIES) -> None:
        self.answers = answers
        self.name = "lookup"
        self.meta = ModelMeta("shapes-256", list(categories), (64, 64), (0.0,) * 3, (1.0,) * 3, 4)
        self.last_latency_s = float("nan")
        self.calls = 0

    def __enter__(self) -> LookupRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def predict(self, image: np.ndarray) -> PanopticOutput:
        self.calls += 1
        self.last_latency_s = 0.001 * self.calls
        pan = self.answers[hashlib.sha256(image.tobytes()).hexdigest()]
        return PanopticOutput(pan.astype(np.int32), np.ones(4, np.float32), np.zeros(4, np.int32), np.zeros((4, 2), np.int32))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "shapes"
    write_dataset(root, 10, size=64, seed=5, val_fraction=0.5)
    return root


def _answers(root: Path, transform=lambda ids: ids) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    _, records = load_split(root, "val")
    out = {}
    for record in records:
        image, ids = load_example(record)
        out[hashlib.sha256(image.tobytes()).hexdigest()] = transform(ids)  # GT ids use the toolkit's encoding
    return out


def test_perfect_answers_score_100(shapes: Path) -> None:
    meta, records = load_split(shapes, "val")
    result = evaluate_runner(LookupRunner(_answers(shapes)), records, meta)
    assert result["pq"]["all"]["pq"] == 100.0 and result["miou"]["miou"] == 100.0
    assert result["n_images"] == 5 and result["backend"] == "lookup"
    assert result["timing"]["latency_ms"]["median"] == pytest.approx(3.0)


def test_limit_and_written_predictions_agree_with_folder_evaluation(shapes: Path, tmp_path: Path) -> None:
    meta, records = load_split(shapes, "val")

    def degrade(ids: np.ndarray) -> np.ndarray:
        out = ids.copy()
        things = np.unique(out[(out % LABEL_DIVISOR) > 0])
        out[np.isin(out, things[::2])] = 0  # drop every other thing
        out[:8] = 9 * LABEL_DIVISOR  # a band of sand everywhere
        return out

    runner = LookupRunner(_answers(shapes, degrade))
    result = evaluate_runner(runner, records, meta, limit=4, pred_dir=tmp_path / "pred")
    assert runner.calls == 4 and result["n_images"] == 4
    assert 0.0 < result["pq"]["all"]["pq"] < 100.0
    json_path, png_dir, _ = split_paths(shapes, "val")
    folders = evaluate_folders(json_path, png_dir, tmp_path / "pred" / "panoptic.json", tmp_path / "pred" / "panoptic", limit=4)
    assert folders["pq"] == result["pq"] and folders["miou"] == result["miou"]


def test_runner_with_other_categories_is_refused(shapes: Path) -> None:
    meta, records = load_split(shapes, "val")
    swapped = SHAPES_CATEGORIES[1:] + SHAPES_CATEGORIES[:1]
    with pytest.raises(UserError, match="must be the same"):
        evaluate_runner(LookupRunner({}, swapped), records, meta)


def test_eval_command_folder_mode(shared_data: Path, tmp_path: Path) -> None:
    d = shared_data / "deeplab2_testdata"
    args = [
        "eval",
        "--gt-json", str(d / "derived" / "cityscapes_panoptic_dummy_trainId_coco.json"),
        "--gt-dir", str(d / "gtFine" / "cityscapes_panoptic_dummy_trainId"),
        "--pred-json", str(d / "derived" / "pred_from_original_ids.json"),
        "--pred-dir", str(d / "derived" / "pred_from_original_ids"),
    ]
    runner = CliRunner()
    out_file = tmp_path / "r.json"
    result = runner.invoke(app, [*args, "--json", "--json-out", str(out_file)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out_file.read_text())
    assert round(saved["pq"]["all"]["pq"], 2) == 93.29 and saved["pq"]["all"]["n"] == 5
    table = runner.invoke(app, [*args, "--json-out", str(out_file)])
    assert table.exit_code == 2 and "already exists" in table.output
    table = runner.invoke(app, [*args, "--json-out", str(out_file), "--force"])
    assert table.exit_code == 0 and "93.29" in table.output and "things" in table.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gt-json", "a.json"], "missing --gt-dir"),
        ([], "nothing to evaluate"),
        (["--checkpoint", "x.pt"], "--data is required"),
        (["--checkpoint", "x.pt", "--model-dir", "m"], "not both"),
    ],
)
def test_eval_command_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_eval_command_runs_the_real_int8_static_artifact(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`maskconver eval --model-dir --backend ort-int8-static` runs that artifact in ONNX Runtime: its PQ is the
    PQ of the same artifact evaluated in-process, and differs from the fp32 graph's (a quantised computation)."""
    from tests.parity import artifacts

    artifacts.require_onnxruntime()
    base = tmp_path_factory.getbasetemp()  # the parity artifacts are built there once per session
    model_dir = artifacts.compiled_model_dir(base)
    # ground truth = the fp32 graph's own answers (this random-weight model scores PQ 0 on generated labels)
    meta, records = load_split(artifacts.val_data(base), "val")
    images = [load_example(r)[0] for r in records]
    with backends.open_runner("ort", model_dir=model_dir, threads=1) as runner:
        answers = [runner.predict(image) for image in images]
        categories = list(runner.meta.categories)
    data = artifacts.images_dataset(tmp_path / "labelled", images, categories, answers)
    meta, records = load_split(data, "val")
    expected = {}
    for name in ("ort", "ort-int8-static"):
        with backends.open_runner(name, model_dir=model_dir, threads=1) as runner:
            expected[name] = evaluate_runner(runner, records[:3], meta)
    args = ["eval", "--model-dir", str(model_dir), "--backend", "ort-int8-static", "--data", str(data), "--n", "3",
            "--threads", "1", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--save-predictions", str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["n_images"] == 3
    assert payload["pq"]["all"]["pq"] == pytest.approx(expected["ort-int8-static"]["pq"]["all"]["pq"], abs=1e-9)
    assert expected["ort"]["pq"]["all"]["pq"] == pytest.approx(100.0)
    assert expected["ort-int8-static"]["pq"]["all"]["pq"] < 99.0  # the quantised artifact, not the fp32 graph
    assert len(list((tmp_path / "pred" / "panoptic").glob("*.png"))) == 3
    again = CliRunner().invoke(app, [*args, "--save-predictions", str(tmp_path / "pred")])
    assert again.exit_code == 2 and "already exists" in again.output

"""Every command that reads an artifact says which merge path (and mask activation) it ran: list, predict, eval,
parity (table title and --json), on a model folder exported with `--merge feature`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from maskconver_deploy.cli import app
from maskconver_deploy.data.synthetic import generate_scene, write_dataset

from tests.bench import tinymodel


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from maskconver_deploy import export as export_mod

    root = tmp_path_factory.mktemp("feature")
    checkpoint = tinymodel.make_checkpoint(root / "tiny.pt")
    export_mod.export(checkpoint, root / "model", merge="feature", force=True)
    return root / "model"


def _json(args: list[str]) -> dict:
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_list_and_predict_show_the_merge_path(feature_dir: Path, tmp_path: Path) -> None:
    listed = _json(["list", "--model-dir", str(feature_dir), "--json"])
    assert (listed["merge"], listed["mask_activation"]) == ("feature", "hard-sigmoid")
    table = CliRunner().invoke(app, ["list", "--model-dir", str(feature_dir)])
    assert "merge path feature/hard-sigmoid" in " ".join(table.output.split())
    image = tmp_path / "scene.png"
    Image.fromarray(generate_scene(5, 0, tinymodel.SIZE).image).save(image)
    out = tmp_path / "out"
    predicted = _json(["predict", str(image), "--model-dir", str(feature_dir), "--backend", "ort", "--out", str(out), "--json"])
    assert predicted["merge"] == "feature"
    assert json.loads((out / "scene.json").read_text())["merge"] == "feature"


def test_eval_and_parity_show_the_merge_path(feature_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", n=4, size=tinymodel.SIZE, seed=1, val_fraction=0.5).out
    saved = tmp_path / "eval.json"
    result = _json(["eval", "--model-dir", str(feature_dir), "--backend", "ort", "--data", str(data), "--json",
                    "--json-out", str(saved)])  # fmt: skip
    assert (result["merge"], result["mask_activation"]) == ("feature", "hard-sigmoid")
    assert json.loads(saved.read_text())["merge"] == "feature"
    table = CliRunner().invoke(app, ["eval", "--model-dir", str(feature_dir), "--backend", "ort", "--data", str(data)])
    assert table.exit_code == 0 and "merge path feature/hard-sigmoid" in " ".join(table.output.split())
    parity = _json(["parity", "--model-dir", str(feature_dir), "--candidates", "ort", "--data", str(data), "--json"])
    assert parity["model"]["merge"] == "feature"

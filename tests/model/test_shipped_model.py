"""The shipped checkpoint models/shapes-256.pt: trained here by `maskconver train` on generated data (no outside
weights), and as accurate as when it was trained, on the first val images of the `make model` data set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from maskconver_deploy.data.synthetic import GENERATOR_VERSION, split_of, write_dataset
from maskconver_deploy.model.checkpoint import load_checkpoint
from maskconver_deploy.training.train import evaluate_checkpoint

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "shapes-256.pt"
# The data set of `make model`: maskconver data synth --n 10000 --size 256 --seed 0 --val-fraction 0.05
DATA_N, DATA_SIZE, DATA_SEED, VAL_FRACTION = 10000, 256, 0, 0.05
SHIPPED_STEP = 250
VAL_IMAGES = 24
# PQ floors on these 24 val images (all, things, stuff). The shipped model gives 55.38 / 30.61 / 86.35 on them and
# PQ 54.73 / 28.63 / 87.35 on the whole val split (500 images; models/shapes-256.eval.json).
PQ_FLOORS = {"all": 50.0, "things": 25.0, "stuff": 80.0}


def _makefile_model_recipe() -> list[str]:
    text = (REPO / "Makefile").read_text()
    match = re.search(r"^model:.*\n((?:\t.*\n?)+)", text, flags=re.MULTILINE)
    assert match, "the Makefile has no 'model' target"
    return [line.strip() for line in match.group(1).splitlines()]


def test_make_model_generates_the_data_this_test_evaluates_on() -> None:
    synth = [line for line in _makefile_model_recipe() if "data synth" in line]
    assert len(synth) == 1
    for option in (f"--n {DATA_N}", f"--size {DATA_SIZE}", f"--seed {DATA_SEED}", f"--val-fraction {VAL_FRACTION}"):
        assert option in synth[0], option


def test_shipped_checkpoint_was_trained_by_maskconver_train() -> None:
    """Two runs of `make model`: run 1 from scratch, run 2 from run 1's weights; the shipped file is run 2's
    checkpoint at step 250 (README "Data and training")."""
    model, categories, provenance = load_checkpoint(SHIPPED, preset="shapes-256")
    assert [c.id for c in categories] == list(range(1, 10)) and model.spec.class_embedding
    recipe = " ".join(_makefile_model_recipe())
    assert provenance["trained_by"] == "maskconver train" and provenance["command"] in recipe
    assert provenance["step"] == SHIPPED_STEP and provenance["steps"] == 1500
    assert provenance["data_info"]["generator_version"] == GENERATOR_VERSION
    # run 2 started from run 1's weights, which the recipe moves to where run 2 reads them
    assert provenance["init"] == "artifacts/shapes-256-stage1.pt" and f"{provenance['init']}\n" in (
        "\n".join(_makefile_model_recipe()) + "\n"
    )
    stage1 = json.loads(SHIPPED.with_name("shapes-256.stage1.train.json").read_text())
    assert stage1["command"] in recipe and stage1["config"]["init"] is None  # from scratch
    assert stage1["data_info"] == provenance["data_info"] and stage1["val"]["n_images"] >= 500
    steps = stage1["config"]["steps"]
    assert f"step {steps}/{steps}" in SHIPPED.with_name("shapes-256.stage1.train.log").read_text()
    evaluation = json.loads(SHIPPED.with_name("shapes-256.eval.json").read_text())
    assert evaluation["n_images"] >= 500


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first VAL_IMAGES val images of the `make model` data set (only those are generated)."""
    val_indices = [i for i in range(DATA_N) if split_of(i, VAL_FRACTION) == "val"]
    n = val_indices[VAL_IMAGES - 1] + 1  # the data set prefix that holds them (splits are prefix-stable)
    out = tmp_path_factory.mktemp("shapes") / "val"
    summary = write_dataset(out, n, size=DATA_SIZE, seed=DATA_SEED, val_fraction=VAL_FRACTION, splits=("val",))
    assert summary.n_val == VAL_IMAGES
    return out


def test_shipped_model_pq_stays_above_its_floor(val_subset: Path) -> None:
    result = evaluate_checkpoint(SHIPPED, val_subset, "val", limit=None, threads=None)
    assert result["n_images"] == VAL_IMAGES
    got = {group: round(float(result["pq"][group]["pq"]), 2) for group in PQ_FLOORS}
    for group, floor in PQ_FLOORS.items():
        assert got[group] >= floor, f"PQ {group} {got[group]} is below its floor {floor} (all results: {got})"

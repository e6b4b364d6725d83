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
SHIPPED_STEP = 3000  # run 6 trained to its end
SHIPPED_INIT = "artifacts/retrain/ft5.pt"  # run 5's checkpoint
TRAINING_RUNS = 6
VAL_IMAGES = 24
# PQ floors on these 24 val images (all, things, stuff). The shipped model gives 71.83 / 57.27 / 90.03 on them and
# PQ 70.29 / 53.00 / 91.91 on the whole val split (500 images; models/shapes-256.eval.json); the previous one (run 3)
# gave 67.47 / 49.77 / 89.59 here and fails these floors.
PQ_FLOORS = {"all": 68.0, "things": 52.0, "stuff": 85.0}


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


def _training_chain(recipe_lines: list[str], command: str) -> list[str]:
    """The `maskconver train` lines of the recipe that lead to `command`, first run first: each run's --init is the
    file an earlier run wrote, directly or through `cp` / `mv` (resolved at that point of the recipe)."""
    made_by: dict[str, str] = {}  # file -> the train line that wrote what the file holds now
    parent: dict[str, str | None] = {}  # train line -> the train line its --init came from
    for line in recipe_lines:
        for step in line.split("&&"):
            if step.strip().startswith(("cp ", "mv ")):
                source, target = step.split()[1:3]
                if source in made_by:
                    made_by[target] = made_by[source]
        if "maskconver train" in line:
            init = re.search(r"--init (\S+)", line)
            assert init is None or init.group(1) in made_by, f"{init.group(1)} comes from no earlier run"
            parent[line] = made_by[init.group(1)] if init else None
            made_by[re.search(r"--out (\S+)", line).group(1)] = line
        if command in line:
            chain, run = [], line
            while run is not None:
                chain.insert(0, run)
                run = parent[run]
            return chain
    raise AssertionError("the shipped checkpoint's command is not in the recipe")


def test_shipped_checkpoint_was_trained_by_maskconver_train() -> None:
    """Six runs of `make model`: run 1 from scratch, each later run from the one before (run 3 with the corrected
    target radius); the shipped file is run 6's last checkpoint (README "Data and training")."""
    model, categories, provenance = load_checkpoint(SHIPPED, preset="shapes-256")
    assert [c.id for c in categories] == list(range(1, 10)) and model.spec.class_embedding
    recipe_lines = _makefile_model_recipe()
    recipe = " ".join(recipe_lines)
    assert provenance["trained_by"] == "maskconver train" and provenance["command"] in recipe
    assert provenance["step"] == SHIPPED_STEP and provenance["steps"] == SHIPPED_STEP
    assert provenance["data_info"]["generator_version"] == GENERATOR_VERSION
    assert provenance["init"] == SHIPPED_INIT
    chain = _training_chain(recipe_lines, provenance["command"])
    assert len(chain) == TRAINING_RUNS, chain
    out = re.search(r"--out (\S+)", provenance["command"]).group(1)
    assert f"cp {out} models/shapes-256.pt" in recipe_lines[recipe_lines.index(chain[-1]) + 1:]
    summary = json.loads(SHIPPED.with_name("shapes-256.train.json").read_text())
    assert summary["command"] == provenance["command"] and summary["val"]["n_images"] >= 500
    assert f"step {SHIPPED_STEP}/{SHIPPED_STEP}" in SHIPPED.with_name("shapes-256.train.log").read_text()
    stage1 = json.loads(SHIPPED.with_name("shapes-256.stage1.train.json").read_text())
    assert stage1["command"] in chain[0] and stage1["config"]["init"] is None  # from scratch
    assert stage1["data_info"] == provenance["data_info"] and stage1["val"]["n_images"] >= 500
    steps = stage1["config"]["steps"]
    assert f"step {steps}/{steps}" in SHIPPED.with_name("shapes-256.stage1.train.log").read_text()
    for run in (3, 4, 5):  # the runs between, as trained (run 4 was resumed once: its command ends in --resume)
        summary = json.loads(SHIPPED.with_name(f"shapes-256.run{run}.train.json").read_text())
        assert summary["command"].removesuffix(" --resume") in chain[run - 1]
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

"""`eval --oracle-centers`: GT-center proposals, center matching, and the predicted path equal to plain eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maskconver_deploy.cli import app
from maskconver_deploy.model.specs import get_preset
from maskconver_deploy.training.diagnose import decode, match_centers, oracle_proposals
from maskconver_deploy.training.targets import TargetSegment
from tests.conftest import one_line_exit_2

SPEC = get_preset("shapes-256")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-image synthetic set (64x64) and a random-weight shapes-256 checkpoint with tame heatmap scores."""
    from maskconver_deploy.model.checkpoint import default_categories, save_checkpoint
    from maskconver_deploy.model.maskconver import MaskConver

    root = tmp_path_factory.mktemp("diag")
    data = root / "shapes"
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(data), "--n", "8", "--size", "64", "--seed", "0",
                                      "--val-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    torch.manual_seed(0)
    model = MaskConver(SPEC)
    with torch.no_grad():  # scores inside (0, 1): no saturated ties in the top-N order
        model.heads["heatmap"].predict.weight.mul_(0.1)
    ckpt = save_checkpoint(root / "m.pt", model.eval(), default_categories(SPEC), {})
    return data, ckpt


def test_oracle_proposals_are_the_training_slots():
    ids = np.zeros((256, 256), np.int32)
    ids[40:104, 20:140] = 7  # thing, class 2: box center (71.5, 79.5) -> cell (8, 9)
    ids[200:256, 0:256] = 9  # stuff, class 6: one island, box center (227.5, 127.5) -> cell (28, 15)
    scores, classes, positions = oracle_proposals(ids, [TargetSegment(7, 2, True), TargetSegment(9, 6, False)], SPEC)
    assert classes.tolist() == [[2, 6]]
    assert positions.tolist() == [[8 * 32 + 9, 28 * 32 + 15]]
    assert scores.tolist() == [[1.0, 1.0]]
    assert oracle_proposals(np.zeros((256, 256), np.int32), [], SPEC) is None


def test_match_centers_radius_class_and_one_to_one():
    gts = [(0, 10, 10, 2.7), (0, 10, 14, 0.7), (1, 20, 20, 0.7)]  # tolerances 2, 1, 1 cells
    assert match_centers([(0, 12, 8, 0.9)], gts) == [True, False, False]  # 2 cells off, radius 2.7
    assert match_centers([(0, 13, 10, 0.9)], gts) == [False, False, False]  # 3 cells off
    assert match_centers([(0, 11, 15, 0.9)], gts) == [False, True, False]  # diagonal neighbour, radius < 1
    assert match_centers([(0, 20, 20, 0.9)], gts) == [False, False, False]  # wrong class
    # one peak finds one center only; the better-scored peak takes the nearer center first
    assert match_centers([(0, 10, 12, 0.5)], gts) == [True, False, False]
    assert match_centers([(0, 10, 12, 0.5), (0, 10, 13, 0.9)], gts) == [True, True, False]


def test_predicted_decode_equals_the_deploy_graph(tiny: tuple[Path, Path]):
    from maskconver_deploy.data.coco_panoptic import load_example, load_split
    from maskconver_deploy.data.preprocess import letterbox
    from maskconver_deploy.model.checkpoint import load_checkpoint
    from maskconver_deploy.model.postprocess import DeployModel, peak_nms, top_proposals

    data, ckpt = tiny
    model, _, _ = load_checkpoint(ckpt)
    _, records = load_split(data, "val")
    image, _ = load_example(records[0])
    boxed, _ = letterbox(image, SPEC.input_size)
    tensor = torch.from_numpy(np.ascontiguousarray(boxed))[None]
    with torch.inference_mode():
        expected = DeployModel(model)(tensor)[0][0].numpy()
        outputs = model(model.normalize(tensor))
        proposals = top_proposals(peak_nms(torch.sigmoid(outputs["heatmap"])), SPEC.num_proposals)
        got = decode(model, outputs, *proposals)
    assert (expected > 0).any()
    np.testing.assert_array_equal(got, expected)


def test_cli_oracle_centers_reports_both_ways(tiny: tuple[Path, Path], tmp_path: Path):
    data, ckpt = tiny
    runner = CliRunner()
    plain = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--json-out", str(tmp_path / "p.json")])
    assert plain.exit_code == 0, plain.output
    diag = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--oracle-centers",
                               "--json-out", str(tmp_path / "o.json")])
    assert diag.exit_code == 0, diag.output
    assert "PQ oracle" in diag.output and "center recall" in diag.output
    p, o = json.loads((tmp_path / "p.json").read_text()), json.loads((tmp_path / "o.json").read_text())
    for group in ("all", "things", "stuff"):  # the predicted path is plain eval's
        assert o["pq"][group]["pq"] == pytest.approx(p["pq"][group]["pq"])
    assert set(o["oracle"]) == {"pq", "miou"}
    centers = o["centers"]
    assert centers["things"]["gt"] > 0 and centers["stuff"]["gt"] > 0
    assert centers["all"]["gt"] == centers["things"]["gt"] + centers["stuff"]["gt"]
    assert 0 <= centers["things"]["matched"] <= min(centers["things"]["gt"], centers["things"]["pred"])
    assert centers["score_threshold"] == 0.3 and set(centers["by_threshold"]) == {"0.1", "0.3", "0.5"}
    assert centers["by_threshold"]["0.3"]["things"] == centers["things"]
    low, high = centers["by_threshold"]["0.1"]["all"], centers["by_threshold"]["0.5"]["all"]
    assert low["pred"] >= high["pred"] and low["matched"] >= high["matched"]


def test_cli_oracle_centers_needs_a_checkpoint(tiny: tuple[Path, Path], tmp_path: Path):
    data, _ = tiny
    (tmp_path / "md").mkdir()
    result = CliRunner().invoke(app, ["eval", "--model-dir", str(tmp_path / "md"), "--data", str(data), "--oracle-centers"])
    assert "--oracle-centers needs --checkpoint" in one_line_exit_2(result)

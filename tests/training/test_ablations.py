"""The ablation table: three run summaries -> PQ, differences to the baseline, and the paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskconver_deploy.errors import UserError
from maskconver_deploy.training.ablations import RUNS, SCRATCH_RUNS, collect, main


def _summary(pq_all: float, things: float, stuff: float) -> dict:
    val = {g: {"pq": v, "sq": 80.0, "rq": v / 0.8, "n": 4} for g, v in (("all", pq_all), ("things", things), ("stuff", stuff))}
    return {"command": "maskconver train ...", "config": {"steps": 300, "init": "m.pt"}, "train_seconds": 10.0,
            "val": {**val, "n_images": 500}}


def _write_runs(folder: Path, values: dict[str, tuple[float, float, float]]) -> None:
    for name, (a, t, s) in values.items():
        (folder / f"{name}.train.json").write_text(json.dumps(_summary(a, t, s)))


def test_collect_gives_differences_next_to_the_paper(tmp_path: Path) -> None:
    _write_runs(tmp_path, {"baseline": (70.0, 60.0, 82.5), "global": (68.0, 60.5, 77.0),
                           "no-class-embedding": (65.0, 52.0, 81.0)})
    table = collect(tmp_path)
    assert set(table["runs"]) == set(RUNS) and table["runs"]["global"]["val_images"] == 500
    assert table["table6_stuff_centers"]["ours"]["islands_minus_global"] == {"all": 2.0, "things": -0.5, "stuff": 5.5}
    assert table["table6_stuff_centers"]["paper"]["islands_minus_global"] == {"all": 0.43, "stuff": 1.53}
    assert table["table7_class_embedding"]["ours"]["on_minus_off"] == {"all": 5.0, "things": 8.0, "stuff": 1.5}
    assert table["table7_class_embedding"]["paper"]["on_minus_off"] == {"all": 1.81, "things": 2.05, "stuff": 1.44}


def test_missing_run_or_evaluation_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_runs(tmp_path, {"baseline": (70.0, 60.0, 82.5), "global": (68.0, 60.5, 77.0)})
    with pytest.raises(UserError, match="no-class-embedding"):
        collect(tmp_path)
    (tmp_path / "no-class-embedding.train.json").write_text(json.dumps({"val": None}))
    assert main([str(tmp_path), str(tmp_path / "out.json")]) == 2
    assert "final evaluation" in capsys.readouterr().err and not (tmp_path / "out.json").exists()


def test_the_from_scratch_pair_adds_its_own_table7_difference(tmp_path: Path) -> None:
    runs = {"baseline": (70.0, 60.0, 82.5), "global": (68.0, 60.5, 77.0), "no-class-embedding": (65.0, 52.0, 81.0)}
    _write_runs(tmp_path, runs)
    assert "ours_from_scratch" not in collect(tmp_path)["table7_class_embedding"]
    _write_runs(tmp_path, {"scratch-on": (40.0, 30.0, 52.5), "scratch-off": (38.5, 27.0, 52.0)})
    table = collect(tmp_path)
    assert set(table["runs"]) == set(RUNS) | set(SCRATCH_RUNS)
    assert table["table7_class_embedding"]["ours_from_scratch"]["on_minus_off"] == {"all": 1.5, "things": 3.0,
                                                                                    "stuff": 0.5}
    assert table["table7_class_embedding"]["ours"]["on_minus_off"] == {"all": 5.0, "things": 8.0, "stuff": 1.5}

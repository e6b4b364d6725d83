"""`maskconver train` end to end on a tiny synthetic set: checkpoint, resume, errors, and 2-process torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskconver_deploy.cli import app

from tests.conftest import skip_unless_ci

TINY = ["--preset", "shapes-256", "--size", "64", "--mask-loss", "per-mask", "--batch", "2", "--workers", "0", "--threads", "1",
        "--final-eval", "0", "--warmup", "1", "--checkpoint-every", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "shapes"
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "--n", "12", "--size", "64", "--seed", "0"])
    assert result.exit_code == 0, result.output
    return out


def _train(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *TINY, *args])
    return result.exit_code, result.output


def test_two_steps_write_a_loadable_checkpoint_and_resume(tiny_data: Path, tmp_path: Path):
    from maskconver_deploy.model.checkpoint import load_checkpoint

    out = tmp_path / "m.pt"
    code, output = _train("--data", str(tiny_data), "--out", str(out), "--steps", "2")
    assert code == 0, output
    model, categories, provenance = load_checkpoint(out, preset="shapes-256")
    assert provenance["step"] == 2 and len(categories) == 9
    state_path = tmp_path / "m.state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    assert state["step"] == 2 and state["optimizer"]["state"]  # momentum buffers were saved
    summary = json.loads((tmp_path / "m.train.json").read_text())
    assert summary["steps_this_run"] == 2 and set(summary["final_losses"]) == {"total", "center", "bce", "dice"}
    assert all(v == v and v >= 0 for v in summary["final_losses"].values())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # refuses to start over an existing run without --force
    code, output = _train("--data", str(tiny_data), "--out", str(out), "--steps", "2")
    assert code == 2 and "already exists" in output

    code, output = _train("--data", str(tiny_data), "--out", str(out), "--steps", "3", "--resume")
    assert code == 0, output
    assert torch.load(state_path, map_location="cpu", weights_only=False)["step"] == 3
    resumed, _, provenance = load_checkpoint(out)
    assert provenance["step"] == 3
    assert any(not torch.equal(before[k], v) for k, v in resumed.state_dict().items() if v.is_floating_point())
    log = (tmp_path / "m.train.log").read_text()
    assert "resumed from" in log and "at step 2" in log and "step 3/3" in log
    # a new run initialised from the trained weights
    other = tmp_path / "init.pt"
    code, output = _train("--data", str(tiny_data), "--out", str(other), "--steps", "2", "--init", str(out),
                          "--early-size", "32", "--early-steps", "1")
    assert code == 0, output
    init_log = (tmp_path / "init.train.log").read_text()
    assert "initialised from" in init_log and "(32x32 for steps < 1)" in init_log
    assert load_checkpoint(other)[2]["init"] == str(out)
    # nothing left to do
    code, output = _train("--data", str(tiny_data), "--out", str(out), "--steps", "3", "--resume")
    assert code == 2 and "nothing left" in output


def test_bad_options_are_user_errors(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "m.pt"
    code, output = _train("--data", str(tiny_data), "--out", str(out), "--steps", "1", "--stuff-centers", "middle")
    assert code == 2 and "--stuff-centers" in output
    code, output = _train("--data", str(tmp_path / "missing"), "--out", str(out), "--steps", "1")
    assert code == 2 and "missing" in output
    code, output = _train("--data", str(tiny_data), "--out", str(out), "--steps", "1", "--resume")
    assert code == 2 and "resume" in output
    code, output = _train("--data", str(tiny_data), "--out", str(out), "--steps", "1", "--size", "60")
    assert code == 2 and "--size" in output
    code, output = _train("--data", str(tiny_data), "--out", str(out), "--steps", "1", "--mask-loss", "sum")
    assert code == 2 and "--mask-loss" in output
    code, output = _train("--data", str(tiny_data), "--out", str(out), "--steps", "1", "--batch", "1")
    assert code == 2 and "--batch" in output
    assert not out.exists()


def test_torchrun_two_processes(tiny_data: Path, tmp_path: Path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        skip_unless_ci("torchrun is not installed beside this interpreter (it comes with torch)")
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "maskconver_deploy", "train", *TINY,
           "--data", str(tiny_data), "--out", str(out), "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp.train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_this_run"] == 2
    assert "x 2 process(es)" in (tmp_path / "ddp.train.log").read_text()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".maskconver-tmp")]
    assert not leftovers

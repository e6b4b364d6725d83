"""`maskconver train` device, precision and layout options: AMP on the CPU, bitwise resume, the CUDA path (gpu)."""

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
from tests.conftest import one_line_exit_2
from tests.training.test_train_cli import TINY

NO_CUDA = "no CUDA GPU visible (torch.cuda.is_available() is False)"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "shapes"
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "--n", "8", "--size", "64", "--seed", "0"])
    assert result.exit_code == 0, result.output
    return out


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *TINY, *args])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from maskconver_deploy.model.checkpoint import load_checkpoint

    return load_checkpoint(path)[0].state_dict()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu_trains_and_reports_throughput(tiny_data: Path, tmp_path: Path, amp: str):
    out = tmp_path / "m.pt"
    result = _train("--data", str(tiny_data), "--out", str(out), "--steps", "2", "--device", "cpu", "--amp", amp)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m.train.json").read_text())
    assert summary["amp"] == amp and summary["device"] == "cpu" and summary["channels_last"] is True
    assert summary["images_per_second"] > 0
    assert all(v == v for v in summary["final_losses"].values())
    log = (tmp_path / "m.train.log").read_text()
    assert f"amp {amp}" in log and "img/s=" in log and "images/s)" in log
    if amp == "fp16":  # the gradient scaler's state travels with the resume state
        state = torch.load(tmp_path / "m.state.pt", map_location="cpu", weights_only=False)
        assert state["scaler"]["scale"] > 0
        resumed = _train("--data", str(tiny_data), "--out", str(out), "--steps", "3", "--device", "cpu", "--amp", amp,
                         "--resume")
        assert resumed.exit_code == 0, resumed.output


def test_resume_is_bitwise_the_uninterrupted_run(tiny_data: Path, tmp_path: Path):
    """3 steps in one go == 2 steps, then --resume to 3 (channels_last, one data worker)."""
    common = ["--data", str(tiny_data), "--device", "cpu", "--workers", "1"]
    straight, split = tmp_path / "a.pt", tmp_path / "b.pt"
    assert _train(*common, "--out", str(straight), "--steps", "3").exit_code == 0
    assert _train(*common, "--out", str(split), "--steps", "2").exit_code == 0
    # a 3-step schedule from step 2: the resumed run must use the same cosine as the straight one
    res = _train(*common, "--out", str(split), "--steps", "3", "--resume")
    assert res.exit_code == 0, res.output
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_is_the_same_training(tiny_data: Path, tmp_path: Path):
    """channels_last changes the memory layout, not the math: the losses of 2 steps agree with NCHW's."""
    common = ["--data", str(tiny_data), "--device", "cpu", "--steps", "2"]
    assert _train(*common, "--out", str(tmp_path / "cl.pt")).exit_code == 0
    assert _train(*common, "--out", str(tmp_path / "nchw.pt"), "--no-channels-last").exit_code == 0
    a = json.loads((tmp_path / "cl.train.json").read_text())["history"]
    b = json.loads((tmp_path / "nchw.train.json").read_text())["history"]
    assert [e["step"] for e in a] == [e["step"] for e in b] == [1, 2]
    for x, y in zip(a, b):
        for key in ("total", "center", "bce", "dice"):
            assert x[key] == pytest.approx(y[key], rel=1e-3), (x["step"], key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error seen without a GPU")
def test_device_cuda_without_a_gpu_is_one_line_exit_2(tiny_data: Path, tmp_path: Path):
    result = _train("--data", str(tiny_data), "--out", str(tmp_path / "m.pt"), "--steps", "1", "--device", "cuda")
    assert "--device cuda" in one_line_exit_2(result)
    assert not (tmp_path / "m.pt").exists()


def test_bad_device_and_amp_are_user_errors(tiny_data: Path, tmp_path: Path):
    out = str(tmp_path / "m.pt")
    assert "--device" in one_line_exit_2(_train("--data", str(tiny_data), "--out", out, "--steps", "1", "--device", "tpu"))
    assert "--amp" in one_line_exit_2(_train("--data", str(tiny_data), "--out", out, "--steps", "1", "--amp", "fp8"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_bf16_trains_evaluates_and_resumes(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "g.pt"
    args = ["--data", str(tiny_data), "--out", str(out), "--device", "cuda", "--amp", "bf16", "--workers", "2"]
    result = _train(*args, "--steps", "4", "--final-eval", "4")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "g.train.json").read_text())
    assert summary["device"] == "cuda" and summary["gpu"] and summary["images_per_second"] > 0
    assert summary["val"] is not None  # evaluated on the GPU (torch-cuda)
    result = _train(*args, "--steps", "6", "--resume")
    assert result.exit_code == 0, result.output
    assert torch.load(tmp_path / "g.state.pt", map_location="cpu", weights_only=False)["step"] == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_torchrun_nccl_one_process_per_gpu(tiny_data: Path, tmp_path: Path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this interpreter")
    gpus = torch.cuda.device_count()
    out = tmp_path / "ddp.pt"
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(gpus), "-m", "maskconver_deploy", "train", *TINY,
           "--data", str(tiny_data), "--out", str(out), "--steps", "3", "--device", "cuda", "--amp", "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp.train.json").read_text())
    assert summary["world_size"] == gpus and summary["device"] == "cuda"

"""The torch reference behind the Runner interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from maskconver_deploy.backends import parse_backend
from maskconver_deploy.backends import torch_ref
from maskconver_deploy.errors import UserError
from maskconver_deploy.model.checkpoint import default_categories, model_meta, save_checkpoint
from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.specs import get_preset


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MaskConver]:
    torch.manual_seed(0)
    spec = get_preset("shapes-256").with_changes(name="tiny-64", input_size=(64, 64), num_proposals=8)
    model = MaskConver(spec).eval()
    path = tmp_path_factory.mktemp("model") / torch_ref.ARTIFACT_NAME
    save_checkpoint(path, model, default_categories(spec), {})
    return path, model


def test_runner_outputs(checkpoint: tuple[Path, MaskConver]) -> None:
    path, model = checkpoint
    meta = model_meta(model, default_categories(model.spec))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with torch_ref.open_runner(path, meta, parse_backend("torch"), threads=1) as runner:
        out = runner.infer(image)
        assert runner.last_latency_s > 0
        with pytest.raises(UserError, match="expected a uint8 image"):
            runner.infer(image[:32])
    assert set(out) == {"panoptic", "scores", "classes", "centers"}
    assert out["panoptic"].shape == (64, 64) and out["panoptic"].dtype == np.int32
    assert out["scores"].shape == (8,) and out["classes"].dtype == np.int32 and out["centers"].shape == (8, 2)

    with torch_ref.open_runner(path, meta, parse_backend("torch"), output="raw") as runner:
        raw = runner.infer(image)
    assert raw["mask_logits"].shape == (8, 8, 8) and raw["heatmap"].shape == (9, 8, 8)
    np.testing.assert_array_equal(raw["scores"], out["scores"])


def test_availability_and_names(checkpoint: tuple[Path, MaskConver], tmp_path: Path) -> None:
    assert torch_ref.availability("torch").ok
    cuda = torch_ref.availability("torch-cuda")
    assert cuda.ok == torch.cuda.is_available()
    if not cuda.ok:
        assert cuda.reason and cuda.hint
    assert torch_ref.artifact_path(tmp_path, parse_backend("torch")) == tmp_path / "reference.pt"
    with pytest.raises(UserError):
        torch_ref.compile_onnx(tmp_path / "m.onnx", tmp_path / "x", parse_backend("torch"))
    path, model = checkpoint
    meta = model_meta(model, default_categories(model.spec))
    with pytest.raises(UserError, match="precision"):
        torch_ref.open_runner(path, meta, parse_backend("torch-fp16"))
    if not cuda.ok:
        with pytest.raises(UserError, match="unavailable"):
            torch_ref.open_runner(path, meta, parse_backend("torch-cuda-fp16"))


def test_meta_for_another_preset_is_refused(checkpoint: tuple[Path, MaskConver]) -> None:
    path, model = checkpoint
    meta = model_meta(model, default_categories(model.spec))
    meta.preset = "shapes-256"
    with pytest.raises(UserError, match="preset"):
        torch_ref.open_runner(path, meta, parse_backend("torch")).open()

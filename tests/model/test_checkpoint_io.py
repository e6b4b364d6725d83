"""Checkpoint round trip, metadata, and every kind of bad file refused with a one-line UserError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from maskconver_deploy.errors import UserError
from maskconver_deploy.model.checkpoint import default_categories, load_checkpoint, model_meta, save_checkpoint
from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.specs import get_preset


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MaskConver]:
    torch.manual_seed(0)
    spec = get_preset("shapes-256").with_changes(name="tiny-64", input_size=(64, 64))
    model = MaskConver(spec)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, default_categories(spec), {"seed": 0, "steps": [1, 2], "note": None})
    return path, model


def _refused(path: Path, match: str, preset: str | None = None) -> None:
    with pytest.raises(UserError, match=match) as info:
        load_checkpoint(path, preset)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_round_trip(saved: tuple[Path, MaskConver]) -> None:
    path, model = saved
    loaded, categories, provenance = load_checkpoint(path, "tiny-64")
    assert loaded.spec == model.spec and not loaded.training
    assert provenance == {"seed": 0, "steps": [1, 2], "note": None}
    assert [c.name for c in categories] == [f"class_{i}" for i in range(9)]
    assert [c.isthing for c in categories] == [True] * 5 + [False] * 4
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_overwrite_needs_force(saved: tuple[Path, MaskConver], tmp_path: Path) -> None:
    path, model = saved
    with pytest.raises(UserError, match="already exists"):
        save_checkpoint(path, model, default_categories(model.spec), {})
    copy = tmp_path / "copy.pt"
    save_checkpoint(copy, model, default_categories(model.spec), {})
    save_checkpoint(copy, model, default_categories(model.spec), {"again": True}, force=True)
    assert load_checkpoint(copy)[2] == {"again": True}
    assert [p.name for p in tmp_path.iterdir()] == ["copy.pt"]  # no temporary files left


def test_provenance_must_be_plain(saved: tuple[Path, MaskConver], tmp_path: Path) -> None:
    _, model = saved
    with pytest.raises(UserError, match="provenance.when"):
        save_checkpoint(tmp_path / "x.pt", model, default_categories(model.spec), {"when": tmp_path})
    assert not (tmp_path / "x.pt").exists()


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.getcwd, ())  # harmless, but code: weights_only must refuse to run it


def test_pickled_object_is_refused(saved: tuple[Path, MaskConver], tmp_path: Path) -> None:
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["provenance"] = {"object": _Payload()}
    bad = tmp_path / "pickled.pt"
    torch.save(payload, bad)
    _refused(bad, "pickled Python objects")


def test_bad_files_are_refused(saved: tuple[Path, MaskConver], tmp_path: Path) -> None:
    path, _ = saved
    _refused(tmp_path / "missing.pt", "no such checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:5000])
    _refused(truncated, "not a readable checkpoint")
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    _refused(text, "not a readable checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    _refused(other, "not a maskconver checkpoint")
    _refused(path, "preset 'tiny-64', not 'coco-256'", preset="coco-256")


def test_state_dict_mismatch_is_refused(saved: tuple[Path, MaskConver], tmp_path: Path) -> None:
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["spec"]["embedding_dim"] = 128
    mismatch = tmp_path / "mismatch.pt"
    torch.save(payload, mismatch)
    _refused(mismatch, "weights do not match the spec")
    payload = torch.load(path, weights_only=True)
    payload["spec"]["colour"] = "blue"
    unknown = tmp_path / "unknown.pt"
    torch.save(payload, unknown)
    _refused(unknown, "spec is invalid")


def test_model_meta(saved: tuple[Path, MaskConver]) -> None:
    _, model = saved
    meta = model_meta(model, default_categories(model.spec), output="raw", num_proposals=7, checkpoint_sha256="ab")
    assert meta.preset == "tiny-64" and meta.input_size == (64, 64) and meta.num_proposals == 7
    assert meta.output_names == ("heatmap", "mask_logits", "scores", "classes", "centers")
    assert meta.small_area_threshold == model.spec.scaled_small_area() == 3
    assert meta.num_classes == 9 and meta.checkpoint_sha256 == "ab"
    assert model_meta(model, default_categories(model.spec)).num_proposals == model.spec.num_proposals

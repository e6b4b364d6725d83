"""The tiny test model (tests/bench/tinymodel.py: shapes-256 at 64x64, 10 proposals, random weights) with the
heatmap head's prediction conv scaled by 0.1, so center scores stay inside (0, 1) instead of saturating at 1.0.

Saturated scores are exact ties, and TopK may order ties differently in PyTorch and ONNX Runtime; a trained model
does not saturate, and the exact-equality checks here need a model whose top-N order is defined. Exported once per
test session into pytest's session temp folder (the export and ORT backend tests share it).
"""

from __future__ import annotations

from pathlib import Path

from tests.bench import tinymodel

SIZE = tinymodel.SIZE
PROPOSALS = tinymodel.PROPOSALS
HEATMAP_SCALE = 0.1


def make_checkpoint(path: Path) -> Path:
    import torch

    from maskconver_deploy.model.checkpoint import load_checkpoint, save_checkpoint

    source = tinymodel.make_checkpoint(path.with_name(path.stem + ".source.pt"))
    model, categories, provenance = load_checkpoint(source)
    with torch.no_grad():
        model.heads["heatmap"].predict.weight.mul_(HEATMAP_SCALE)
    return save_checkpoint(path, model, categories, {**provenance, "heatmap_scale": HEATMAP_SCALE}, force=True)


def tame_model_dir(base: Path) -> Path:
    """BASE/tame/model: panoptic + raw graphs of the tame model, exported once per session."""
    from maskconver_deploy import export as export_mod

    root = base / "tame"
    model_dir = root / "model"
    if (model_dir / "model.json").is_file():
        return model_dir
    root.mkdir(parents=True, exist_ok=True)
    export_mod.export(make_checkpoint(root / "tame.pt"), model_dir, force=True)
    return model_dir


def checkpoint_path(base: Path) -> Path:
    return base / "tame" / "tame.pt"

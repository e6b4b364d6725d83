"""A tiny model for the bench, report and pipeline tests: shapes-256 at 64x64 with 10 proposals, random weights.

Built and exported once per test session into pytest's session temp folder (the bench and report conftests both
call `tiny_model_dir`; the second call finds the folder already there).
"""

from __future__ import annotations

from pathlib import Path

SIZE = 64
PROPOSALS = 10


def make_checkpoint(path: Path) -> Path:
    """Random-init checkpoint with the synthetic data set's categories; BN statistics from a few random batches
    and scaled embedding heads, so the merge produces real segments instead of an all-VOID map."""
    import torch

    from maskconver_deploy.data.synthetic import SHAPES_CATEGORIES
    from maskconver_deploy.model.checkpoint import save_checkpoint
    from maskconver_deploy.model.maskconver import MaskConver
    from maskconver_deploy.model.specs import get_preset

    torch.manual_seed(0)
    spec = get_preset("shapes-256").with_changes(input_size=(SIZE, SIZE), num_proposals=PROPOSALS, small_area_threshold=0)
    net = MaskConver(spec)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(net.normalize(torch.randint(0, 256, (4, SIZE, SIZE, 3), dtype=torch.uint8)))
        for name in ("center_embedding", "mask_features"):
            net.heads[name].predict.weight.mul_(10.0)
    net.eval()
    return save_checkpoint(path, net, list(SHAPES_CATEGORIES), {"purpose": "tests (random weights)"}, force=True)


def tiny_model_dir(base: Path) -> Path:
    """BASE/tiny/model: exported panoptic + raw graphs and the ONNX Runtime fp32 artifacts (once per session)."""
    from maskconver_deploy import export as export_mod

    root = base / "tiny"
    model_dir = root / "model"
    if (model_dir / "model.json").is_file():
        return model_dir
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(root / "tiny.pt")
    export_mod.export(checkpoint, model_dir, force=True)
    return model_dir


def checkpoint_path(base: Path) -> Path:
    return base / "tiny" / "tiny.pt"

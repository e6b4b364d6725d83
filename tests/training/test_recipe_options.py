"""The official-recipe options: stuff-island rule, per-layer init, weight decay on the class embedding, and the
CLI flags that select them (global mask loss and the scale range included)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from maskconver_deploy.cli import app
from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.specs import get_preset
from maskconver_deploy.training.init import apply_init
from maskconver_deploy.training.targets import TargetSegment, build_targets, stuff_rule
from maskconver_deploy.training.train import parameter_groups
from tests.training.test_train_cli import TINY

SPEC = get_preset("shapes-256")


def test_official_stuff_rule_ignores_the_input_size():
    assert stuff_rule((256, 256), "official") == (21, 1024)
    assert stuff_rule((64, 64), "official") == (21, 1024)
    assert stuff_rule((256, 256)) == (9, 164)
    with pytest.raises(ValueError):
        stuff_rule((256, 256), "halfway")


def test_official_stuff_rule_drops_islands_under_1024_px_and_merges_wider():
    ids = np.zeros((256, 256), np.int32)
    ids[0:30, 0:30] = 5  # 900 px: an island under the scaled rule (>= 164 px), none under the official one
    ids[200:256, 0:256] = 5  # 14336 px
    ids[200:256, 60:100] = 0
    # the 40-px gap splits the band under the scaled rule (3 x 9x9 pooling = a 25x25 dilation: 12 px each side
    # bridge gaps up to 24 px) and is bridged by the official one (61x61: gaps up to 60 px)
    segments = [TargetSegment(5, 6, False)]
    scaled = build_targets(ids, segments, SPEC)
    official = build_targets(ids, segments, SPEC, rule="official")
    assert int(scaled["num_instances"]) == 3
    assert int(official["num_instances"]) == 1


def _convs(module: nn.Module, depthwise: bool) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and (m.groups > 1) == depthwise]


def test_official_init_by_layer():
    torch.manual_seed(0)
    model = MaskConver(SPEC)
    apply_init(model, "official")
    model.requires_grad_(False)
    # backbone / ASPP: VarianceScaling(1, fan_in, truncated normal): std sqrt(1 / fan_in), |w| <= 2 / 0.8796 * that
    for conv in _convs(model.backbone, False) + _convs(model.decoder, False):
        fan_in = conv.weight[0].numel()
        bound = 2 * math.sqrt(1 / fan_in) / 0.87962566
        assert conv.weight.abs().max() <= bound + 1e-6
        if conv.weight.numel() >= 4096:
            assert float(conv.weight.std()) == pytest.approx(math.sqrt(1 / fan_in), rel=0.1)
    # depthwise: Glorot uniform, limit sqrt(6 / (fan_in + fan_out)) = sqrt(6 / (k^2 (C + 1)))
    for conv in _convs(model, True):
        k2, c = conv.weight[0, 0].numel(), conv.in_channels
        limit = math.sqrt(6 / (k2 * (c + 1)))
        assert conv.weight.abs().max() <= limit + 1e-6
        assert conv.weight.abs().max() > 0.8 * limit
    for name, head in model.heads.items():
        assert head.predict.weight.abs().max() <= 0.02 + 1e-6  # truncated normal, std 0.01
        assert float(head.predict.bias.mean()) == pytest.approx(-2.19 if name == "heatmap" else 0.0)
        pointwise = [m for m in _convs(head, False) if m is not head.predict]
        for conv in pointwise:  # He normal: std sqrt(2 / fan_in)
            assert float(conv.weight.std()) == pytest.approx(math.sqrt(2 / conv.weight[0].numel()), rel=0.1)
    he = MaskConver(SPEC)  # the default keeps the model's own init
    before = {k: v.clone() for k, v in he.state_dict().items()}
    apply_init(he, "he")
    assert all(torch.equal(before[k], v) for k, v in he.state_dict().items())


def test_weight_decay_on_class_embedding_is_an_option():
    model = MaskConver(SPEC)
    table = model.class_embedding.weight
    default = parameter_groups(model, 1e-5)
    official = parameter_groups(model, 1e-5, embedding_decay=True)
    assert not any(p is table for p in default[0]["params"])
    assert any(p is table for p in official[0]["params"]) and not any(p is table for p in official[1]["params"])
    assert len(official[0]["params"]) == len(default[0]["params"]) + 1


def test_official_recipe_flags_reach_the_run(tmp_path: Path):
    data = tmp_path / "shapes"
    made = CliRunner().invoke(app, ["data", "synth", "--out", str(data), "--n", "4", "--size", "64", "--seed", "0"])
    assert made.exit_code == 0, made.output
    out = tmp_path / "m.pt"
    args = ["train", *TINY, "--data", str(data), "--out", str(out), "--steps", "1", "--mask-loss", "global",
            "--stuff-rule", "official", "--init-scheme", "official", "--embedding-decay", "--scale-min", "0.1",
            "--scale-max", "1.9", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m.train.json").read_text())["config"]
    assert (config["mask_norm"], config["stuff_rule"], config["init_scheme"], config["embedding_decay"]) == (
        "global", "official", "official", True)
    assert config["scale_range"] == [0.1, 1.9]
    from maskconver_deploy.model.checkpoint import load_checkpoint

    assert load_checkpoint(out)[2]["stuff_rule"] == "official"  # the diagnosis reads it back
    bad = CliRunner().invoke(app, [*args[:-2], "--stuff-rule", "wide", "--force"])
    assert bad.exit_code == 2 and "--stuff-rule" in bad.output

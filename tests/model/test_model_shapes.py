"""Output shapes of MaskConver per preset: a meta-device pass at full size, one real forward on a small input."""

from __future__ import annotations

import pytest
import torch

from maskconver_deploy.model.backbone import MobileNetMH
from maskconver_deploy.model.blocks import InvertedResidual, make_divisible
from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.specs import MOBILENET_MH_AVG_SEG, PRESETS, get_preset


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_full_size_output_shapes(preset: str) -> None:
    spec = get_preset(preset)
    with torch.device("meta"):
        model = MaskConver(spec).eval()
        out = model(torch.empty(2, 3, *spec.input_size))
    h, w = spec.feature_size
    assert out["heatmap"].shape == (2, spec.num_classes, h, w)
    assert out["center_embedding"].shape == (2, spec.embedding_dim, h, w)
    assert out["mask_features"].shape == (2, spec.embedding_dim, h, w)


def test_backbone_endpoints_follow_the_official_table() -> None:
    backbone = MobileNetMH(MOBILENET_MH_AVG_SEG, output_stride=16)
    assert backbone.feature_channels == {"s4": 32, "s8": 64, "s16": 448}
    assert backbone.feature_strides == {"s4": 4, "s8": 8, "s16": 16}
    blocks = list(backbone.blocks)
    # expand widths of the official table (facts 5.1) and dilation 2 from block 13 on
    expected_hidden = [96, 64, 160, 192, 128, 192, 384, 384, 384, 384, 768, 640, 960, 384, 384, 384]
    assert [b.hidden_channels for b in blocks[1:17]] == expected_hidden
    dilations = [b.depthwise[0].dilation[0] for b in blocks[1:17]]
    assert dilations == [1] * 12 + [2] * 4
    assert all(b.depthwise[0].stride[0] == 1 for b in blocks[13:17])
    residual = [b.use_residual for b in blocks[1:17]]
    residual_blocks = {2, 4, 5, 6, 8, 9, 10, 12, 15, 16}
    assert residual == [index in residual_blocks for index in range(1, 17)]
    assert isinstance(blocks[13], InvertedResidual)


def test_make_divisible() -> None:
    assert make_divisible(32 * 3) == 96
    assert make_divisible(160 * 6) == 960
    assert make_divisible(10) == 16  # never more than 10% below the value
    assert make_divisible(3) == 8


def test_real_forward_small_input_and_gradients() -> None:
    torch.manual_seed(0)
    spec = get_preset("shapes-256").with_changes(name="tiny-64", input_size=(64, 64))
    model = MaskConver(spec).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["heatmap"].shape == (2, 9, 8, 8)
    assert out["center_embedding"].shape == (2, 256, 8, 8)
    assert out["mask_features"].shape == (2, 256, 8, 8)
    assert all(torch.isfinite(v).all() for v in out.values())
    sum(v.square().mean() for v in out.values()).backward()
    assert model.backbone.blocks[0][0].weight.grad is not None
    assert model.heads["heatmap"].predict.bias.grad is not None


def test_initialisation_of_prediction_convs() -> None:
    torch.manual_seed(0)
    model = MaskConver(get_preset("shapes-256"))
    assert torch.allclose(model.heads["heatmap"].predict.bias, torch.full((9,), -2.19))
    assert torch.count_nonzero(model.heads["center_embedding"].predict.bias) == 0
    assert 0.005 < model.heads["mask_features"].predict.weight.std().item() < 0.015


def test_head_kernel_follows_the_spec() -> None:
    for kernel in (3, 7):
        model = MaskConver(get_preset("shapes-256").with_changes(head_kernel=kernel))
        depthwise = model.heads["heatmap"].convs[0][0][0]
        assert depthwise.kernel_size == (kernel, kernel) and depthwise.groups == 256


def test_normalize_uses_spec_mean_and_std() -> None:
    spec = get_preset("shapes-256").with_changes(name="tiny-64", input_size=(64, 64))
    model = MaskConver(spec)
    image = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    expected = (image.permute(0, 3, 1, 2).float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(
        spec.std
    ).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(image), expected, atol=1e-5)
    assert "input_scale" not in model.state_dict()


def test_input_not_a_multiple_of_the_output_stride_is_refused() -> None:
    model = MaskConver(get_preset("shapes-256").with_changes(name="tiny-64", input_size=(64, 64))).eval()
    with pytest.raises(ValueError, match="multiple of the output stride"):
        model(torch.zeros(1, 3, 72, 64))

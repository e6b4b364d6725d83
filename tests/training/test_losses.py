"""Losses: known values on tiny tensors and zero loss for perfect predictions."""

from __future__ import annotations

import math

import pytest
import torch

from maskconver_deploy.training.losses import (
    adaptive_dice_loss,
    center_focal_loss,
    mask_bce_loss,
    maskconver_loss,
    upsample_logits,
)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_focal_loss_known_value():
    # one image, one class, 1x3 map: a positive (p=0.8), a near-center negative (t=0.5, p=0.3), a far one (t=0, p=0.1)
    logits = torch.tensor([[[[_logit(0.8), _logit(0.3), _logit(0.1)]]]])
    target = torch.tensor([[[[1.0, 0.5, 0.0]]]])
    pos = -(0.2**2) * math.log(0.8)
    near = -(0.5**4) * 0.3**2 * math.log(0.7)
    far = -(1.0**4) * 0.1**2 * math.log(0.9)
    expected = (pos + near + far) / (1 + 1)
    got = center_focal_loss(logits, target, torch.tensor([1]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_focal_loss_normalisation_weights_and_near_zero_for_perfect():
    target = torch.zeros(2, 3, 4, 4)
    target[0, 1, 2, 2] = 1.0
    target[1, 0, 0, 0] = 1.0
    perfect = torch.where(target == 1, torch.tensor(30.0), torch.tensor(-30.0))
    loss = center_focal_loss(perfect, target, torch.tensor([1, 1]))
    assert 0 <= loss.item() < 1e-6  # clamped probabilities: tiny, not exactly 0
    wrong = -perfect
    weight = torch.ones(2, 4, 4)
    full = center_focal_loss(wrong, target, torch.tensor([1, 1]), weight)
    weight[:, :, 2:] = 0  # drop the columns that hold the image-0 positive
    part = center_focal_loss(wrong, target, torch.tensor([1, 1]), weight)
    assert full.item() > part.item() > 0
    # per-image division by (num_instances + 1), then the batch mean
    per_image = center_focal_loss(wrong, target, torch.tensor([3, 3]))
    assert per_image.item() == pytest.approx(full.item() * 2 / 4, rel=1e-5)


def test_bce_known_value_and_weights():
    logits = torch.tensor([[[[0.0, 2.0]], [[5.0, -5.0]]]])  # [B=1, K=2, 1, 2]
    gt = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])
    valid = torch.tensor([[1.0, 0.0]])  # second slot is padding
    expected = (math.log(2) + (2 + math.log1p(math.exp(-2)))) / (2 + 1)
    assert mask_bce_loss(logits, gt, valid).item() == pytest.approx(expected, rel=1e-5)
    pixel = torch.tensor([[[1.0, 0.0]]])
    assert mask_bce_loss(logits, gt, valid, pixel).item() == pytest.approx(math.log(2) / 2, rel=1e-5)


def test_dice_perfect_is_zero_and_known_value():
    gt = torch.zeros(2, 3, 8, 8)
    gt[0, 0, :4] = 1
    gt[1, 1, :, :2] = 1
    valid = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    perfect = torch.where(gt > 0, torch.tensor(40.0), torch.tensor(-40.0))
    assert adaptive_dice_loss(perfect, gt, valid).item() == pytest.approx(0.0, abs=1e-6)
    # all predictions 0.5: d = 2 * 0.5 * |g| / (0.5 * N + |g|) over the valid slots only
    half = torch.zeros_like(gt)
    n, g = 2 * 64, gt[0, 0].sum() + gt[1, 1].sum()
    d = float(2 * 0.5 * g / (0.5 * n + g))
    assert adaptive_dice_loss(half, gt, valid).item() == pytest.approx(1 - d * math.exp(1 - d), rel=1e-5)
    assert adaptive_dice_loss(-perfect, gt, valid).item() == pytest.approx(1.0, abs=1e-6)


def test_total_upsamples_and_weights_5_5():
    torch.manual_seed(0)
    heat_t = torch.zeros(1, 2, 4, 4)
    heat_t[0, 0, 1, 1] = 1.0
    masks = torch.zeros(1, 1, 32, 32)
    masks[0, 0, :16, :16] = 1
    targets = {
        "heatmap": heat_t,
        "masks": masks,
        "valid": torch.ones(1, 1),
        "num_instances": torch.tensor([1]),
        "pixel_valid": torch.ones(1, 32, 32),
    }
    outputs = {"heatmap": torch.randn(1, 2, 4, 4)}
    small = torch.randn(1, 1, 4, 4)
    losses = maskconver_loss(outputs, small, targets)
    assert losses["total"].item() == pytest.approx(
        losses["center"].item() + 5 * losses["bce"].item() + 5 * losses["dice"].item(), rel=1e-6
    )
    full = upsample_logits(small, (32, 32))
    assert full.shape == (1, 1, 32, 32)
    assert losses["bce"].item() == pytest.approx(mask_bce_loss(full, masks, torch.ones(1, 1)).item(), rel=1e-6)
    # perfect masks at full resolution: zero dice, near-zero BCE
    perfect = torch.where(masks > 0, torch.tensor(40.0), torch.tensor(-40.0))
    good = maskconver_loss(outputs, perfect, targets)
    assert good["dice"].item() == pytest.approx(0.0, abs=1e-6) and good["bce"].item() < 1e-6


def test_per_mask_losses_weigh_small_masks_like_large_ones():
    from maskconver_deploy.training.losses import per_mask_bce_loss, per_mask_dice_loss

    gt = torch.zeros(1, 3, 16, 16)
    gt[0, 0, :2, :2] = 1  # a 4-pixel mask
    gt[0, 1] = 1  # a whole-image mask
    valid = torch.tensor([[1.0, 1.0, 0.0]])  # third slot is padding
    perfect = torch.where(gt > 0, torch.tensor(40.0), torch.tensor(-40.0))
    assert per_mask_dice_loss(perfect, gt, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert per_mask_bce_loss(perfect, gt, valid).item() < 1e-6
    # miss only the small mask: per-mask dice loses half, the global dice barely notices
    miss_small = perfect.clone()
    miss_small[0, 0] = -40.0
    assert per_mask_dice_loss(miss_small, gt, valid).item() == pytest.approx(0.5, abs=1e-6)
    assert adaptive_dice_loss(miss_small, gt, valid).item() < 0.01
    # per-mask BCE: mean BCE of each mask over its pixels, then over valid masks (+1 in the denominator)
    half = torch.zeros_like(gt)
    assert per_mask_bce_loss(half, gt, valid).item() == pytest.approx(2 * math.log(2) / 3, rel=1e-5)


def test_mask_norm_option_is_checked():
    targets = {
        "heatmap": torch.zeros(1, 1, 2, 2),
        "masks": torch.ones(1, 1, 16, 16),
        "valid": torch.ones(1, 1),
        "num_instances": torch.tensor([1]),
        "pixel_valid": torch.ones(1, 16, 16),
    }
    outputs = {"heatmap": torch.zeros(1, 1, 2, 2)}
    per_mask = maskconver_loss(outputs, torch.zeros(1, 1, 2, 2), targets, mask_norm="per-mask")
    assert per_mask["bce"].item() == pytest.approx(math.log(2) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        maskconver_loss(outputs, torch.zeros(1, 1, 2, 2), targets, mask_norm="mean")

"""MaskConver training losses (facts section 3): center focal loss, mask BCE and global adaptive dice.

total = 1 * center + 5 * BCE + 5 * dice. All use the real sigmoid (the hard-sigmoid is a deployment
choice of the mask activation, not a training one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CENTER_WEIGHT = 1.0
MASK_WEIGHT = 5.0
PROB_EPS = 1e-4
DICE_EPS = 1e-7


def center_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_instances: torch.Tensor,
    pixel_weight: torch.Tensor | None = None,
    alpha: float = 2.0,
    beta: float = 4.0,
) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss.

    logits, target: [B, C, h, w]; positives are pixels where target == 1 exactly.
    num_instances: [B] valid centers per image; each image's sum is divided by (num_instances + 1),
    then the batch mean is taken. pixel_weight: optional [B, h, w] (0 on padding).
    """
    p = torch.sigmoid(logits.float()).clamp(PROB_EPS, 1 - PROB_EPS)
    target = target.float()
    pos = target == 1.0
    pos_loss = -((1 - p) ** alpha) * torch.log(p)
    neg_loss = -((1 - target) ** beta) * (p**alpha) * torch.log(1 - p)
    loss = torch.where(pos, pos_loss, neg_loss)
    if pixel_weight is not None:
        loss = loss * pixel_weight.float().unsqueeze(1)
    per_image = loss.flatten(1).sum(1) / (num_instances.float() + 1.0)
    return per_image.mean()


def upsample_logits(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (half-pixel centers, as TF2 resize) of [B, K, h, w] logits to `size`."""
    if tuple(mask_logits.shape[-2:]) == tuple(size):
        return mask_logits
    return F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)


def _mask_weights(gt: torch.Tensor, valid: torch.Tensor, pixel_weight: torch.Tensor | None) -> torch.Tensor:
    weight = valid.float()[:, :, None, None].expand_as(gt)
    if pixel_weight is not None:
        weight = weight * pixel_weight.float()[:, None]
    return weight


def mask_bce_loss(
    logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted sigmoid BCE on full-resolution logits: sum(w * bce) / (sum(w) + 1).

    logits, gt: [B, K, H, W] (gt in {0, 1}); valid: [B, K] slot weights; pixel_weight: [B, H, W].
    """
    gt = gt.float()
    weight = _mask_weights(gt, valid, pixel_weight)
    bce = F.binary_cross_entropy_with_logits(logits.float(), gt, reduction="none")
    return (bce * weight).sum() / (weight.sum() + 1.0)


def adaptive_dice_loss(
    logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """One global dice over every valid mask of the batch, adaptively weighted: 1 - d * exp(1 - d).

    d = 2 * sum(p * g) / (sum(p) + sum(g) + 1e-7) with p = sigmoid(logits) * w and g = gt * w.
    (Slices with empty prediction and label, which the official code drops, add nothing to the sums.)
    """
    weight = _mask_weights(gt, valid, pixel_weight)
    p = torch.sigmoid(logits.float()) * weight
    g = gt.float() * weight
    dice = 2 * (p * g).sum() / (p.sum() + g.sum() + DICE_EPS)
    return 1 - dice * torch.exp(1 - dice)


def per_mask_bce_loss(
    logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE averaged over each mask's pixels, then over the valid masks (small masks count as much as large ones)."""
    gt = gt.float()
    weight = _mask_weights(gt, valid, pixel_weight)
    bce = F.binary_cross_entropy_with_logits(logits.float(), gt, reduction="none")
    per_mask = (bce * weight).flatten(2).sum(2) / weight.flatten(2).sum(2).clamp(min=1.0)
    return (per_mask * valid.float()).sum() / (valid.float().sum() + 1.0)


def per_mask_dice_loss(
    logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Adaptive dice (1 - d * exp(1 - d)) of each valid mask, averaged over the valid masks."""
    weight = _mask_weights(gt, valid, pixel_weight)
    p = (torch.sigmoid(logits.float()) * weight).flatten(2)
    g = (gt.float() * weight).flatten(2)
    dice = 2 * (p * g).sum(2) / (p.sum(2) + g.sum(2) + DICE_EPS)
    per_mask = 1 - dice * torch.exp(1 - dice)
    return (per_mask * valid.float()).sum() / valid.float().sum().clamp(min=1.0)


MASK_NORMS = ("global", "per-mask")


def maskconver_loss(
    outputs: dict[str, torch.Tensor],
    mask_logits: torch.Tensor,
    targets: dict[str, torch.Tensor],
    mask_weight: float = MASK_WEIGHT,
    mask_norm: str = "global",
) -> dict[str, torch.Tensor]:
    """All losses of one batch. `mask_logits` are the stride-8 logits [B, K, h, w] of the GT slots.

    targets: heatmap [B, C, h, w], masks [B, K, H, W], valid [B, K], num_instances [B],
    pixel_valid [B, H, W]. Returns center, bce, dice and total (scalars).
    mask_norm: "global" (official: BCE over all mask pixels of the batch, one global dice) or "per-mask"
    (each mask's BCE and dice computed alone, then averaged over masks: small objects weigh as much as
    whole-image stuff masks).
    """
    if mask_norm not in MASK_NORMS:
        raise ValueError(f"mask_norm must be one of {MASK_NORMS}, not {mask_norm!r}")
    pixel_valid = targets["pixel_valid"].float()
    heatmap = targets["heatmap"]
    hw = tuple(heatmap.shape[-2:])
    # padding mask at the heatmap size, nearest neighbour (padding is bottom/right, so a strided pick is exact)
    small_valid = F.interpolate(pixel_valid[:, None], size=hw, mode="nearest")[:, 0]
    center = center_focal_loss(outputs["heatmap"], heatmap, targets["num_instances"], small_valid)
    gt = targets["masks"]
    full = upsample_logits(mask_logits, tuple(gt.shape[-2:]))
    bce_fn, dice_fn = (mask_bce_loss, adaptive_dice_loss) if mask_norm == "global" else (per_mask_bce_loss, per_mask_dice_loss)
    bce = bce_fn(full, gt, targets["valid"], pixel_valid)
    dice = dice_fn(full, gt, targets["valid"], pixel_valid)
    total = CENTER_WEIGHT * center + mask_weight * bce + mask_weight * dice
    return {"total": total, "center": center, "bce": bce, "dice": dice}

"""Weight initialisation schemes of a fresh MaskConver for training (`--init-scheme`).

* ``he``: the model's own init (He-normal fan-in for every conv, see `MaskConver._init_weights`).
* ``official``: by layer, as the official code (facts 1.4-1.5): backbone and ASPP convs Keras
  ``VarianceScaling`` (scale 1, fan-in, truncated normal); every depthwise kernel Glorot-uniform; the heads'
  1x1 convs He-normal (Keras ``he_normal``: scale 2, fan-in, truncated normal); the heads' prediction convs a
  truncated normal of std 0.01 with their biases (-2.19 heatmap, 0 embeddings); the MLP Glorot-uniform with
  zero biases and the class embedding uniform(-0.05, 0.05), as the model already does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from maskconver_deploy.model.heads import PREDICTION_STD
from maskconver_deploy.model.maskconver import MaskConver

INIT_SCHEMES = ("he", "official")
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2] (Keras' correction)


def variance_scaling_(weight: torch.Tensor, scale: float) -> None:
    """Keras VarianceScaling(scale, "fan_in", "truncated_normal") on a torch conv weight [out, in/groups, kh, kw]."""
    fan_in = weight.shape[1] * weight[0, 0].numel()
    std = math.sqrt(scale / fan_in) / _TRUNC_STD
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def official_init(model: MaskConver) -> None:
    """Re-initialise `model`'s convs layer by layer as the official code does (module docstring)."""
    with torch.no_grad():
        for part in (model.backbone, model.decoder):
            for module in part.modules():
                if isinstance(module, nn.Conv2d):
                    if _is_depthwise(module):
                        nn.init.xavier_uniform_(module.weight)
                    else:
                        variance_scaling_(module.weight, 1.0)
        for head in model.heads.values():
            for module in head.modules():
                if not isinstance(module, nn.Conv2d) or module is head.predict:
                    continue
                if _is_depthwise(module):
                    nn.init.xavier_uniform_(module.weight)
                else:
                    variance_scaling_(module.weight, 2.0)
            nn.init.trunc_normal_(head.predict.weight, std=PREDICTION_STD, a=-2 * PREDICTION_STD, b=2 * PREDICTION_STD)
            nn.init.constant_(head.predict.bias, head.bias_init)


def apply_init(model: MaskConver, scheme: str) -> None:
    """Apply an `INIT_SCHEMES` scheme to a freshly built model ("he" keeps the model's own init)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme must be one of {INIT_SCHEMES}, not {scheme!r}")
    if scheme == "official":
        official_init(model)

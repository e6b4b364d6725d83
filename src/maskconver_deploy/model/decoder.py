"""ASPP v1 pixel decoder with depthwise-separable atrous branches (official facts 1.4).

Branches: 1x1 conv; one separable branch per rate (depthwise 3x3 dilated -> 1x1 -> BN -> ReLU, no BN between
the two convs); image pooling (global mean -> 1x1 -> BN -> ReLU -> broadcast back to the map). Concatenate,
then 1x1 -> BN -> ReLU. The image-pooling branch exports as ReduceMean + Expand (no Resize of a 1x1 map).
Training note: the pooled branch's BN sees one value per channel and image, so training needs batch >= 2.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskconver_deploy.model.blocks import ConvBNAct, NormConfig, SeparableConvBNAct


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv -> BN -> ReLU, broadcast to the input's spatial size."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormConfig = NormConfig()) -> None:
        super().__init__()
        self.project = ConvBNAct(in_channels, out_channels, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.project(x.mean(dim=(2, 3), keepdim=True))
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3, v1 layout) producing `channels` maps at the input stride."""

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        rates: tuple[int, ...] = (6, 12, 18),
        norm: NormConfig = NormConfig(),
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [ConvBNAct(in_channels, channels, 1, norm=norm)]
        branches += [SeparableConvBNAct(in_channels, channels, 3, dilation=rate, norm=norm) for rate in rates]
        branches.append(ImagePooling(in_channels, channels, norm=norm))
        self.branches = nn.ModuleList(branches)
        self.project = ConvBNAct(channels * len(branches), channels, 1, norm=norm)
        self.out_channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))

"""Small typed building blocks of MaskConver: conv + BN + ReLU, inverted bottleneck, separable convs.

All convolutions use symmetric 'same' padding, pad = dilation * (kernel - 1) // 2, and no bias (a BN follows).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class NormConfig:
    """BatchNorm settings shared by every block (PyTorch momentum convention)."""

    eps: float = 1e-3
    momentum: float = 0.01

    def batch_norm(self, channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never going more than 10% below `value` (MobileNet rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def same_padding(kernel: int, dilation: int = 1) -> int:
    """Symmetric padding that keeps the spatial size at stride 1."""
    return dilation * (kernel - 1) // 2


class ConvBNAct(nn.Sequential):
    """kxk conv (no bias) -> BN -> optional ReLU. `groups=in_channels` makes it depthwise."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm: NormConfig = NormConfig(),
        activation: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel,
                stride=stride,
                padding=same_padding(kernel, dilation),
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            norm.batch_norm(out_channels),
        ]
        if activation:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNet inverted bottleneck: 1x1 expand -> BN -> ReLU -> kxk depthwise -> BN -> ReLU -> 1x1 project -> BN.

    The expansion conv is present only when the ratio is above 1; the residual is added iff stride is 1 and the
    input and output widths are equal. Expand width = make_divisible(in_channels * expand_ratio, 8).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand_ratio: float,
        dilation: int = 1,
        norm: NormConfig = NormConfig(),
    ) -> None:
        super().__init__()
        hidden = make_divisible(in_channels * expand_ratio, 8) if expand_ratio > 1 else in_channels
        self.expand = ConvBNAct(in_channels, hidden, 1, norm=norm) if expand_ratio > 1 else nn.Identity()
        self.depthwise = ConvBNAct(hidden, hidden, kernel, stride=stride, dilation=dilation, groups=hidden, norm=norm)
        self.project = ConvBNAct(hidden, out_channels, 1, norm=norm, activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.hidden_channels = hidden

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_residual else y


class SeparableConvBNAct(nn.Sequential):
    """ASPP-style separable conv: depthwise kxk (dilated, no BN) -> 1x1 -> BN -> ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int = 3, dilation: int = 1, norm: NormConfig = NormConfig()
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                in_channels,
                kernel,
                padding=same_padding(kernel, dilation),
                dilation=dilation,
                groups=in_channels,
                bias=False,
            ),
            ConvBNAct(in_channels, out_channels, 1, norm=norm),
        )


class DepthwiseSeparableBlock(nn.Sequential):
    """Head block: depthwise kxk -> BN -> ReLU -> 1x1 -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, norm: NormConfig = NormConfig()) -> None:
        super().__init__(
            ConvBNAct(in_channels, in_channels, kernel, groups=in_channels, norm=norm),
            ConvBNAct(in_channels, out_channels, 1, norm=norm),
        )


def upsample_bilinear(x: Tensor, factor: int) -> Tensor:
    """Bilinear upsampling by an integer factor (align_corners=False); a constant scale, so exported graphs carry
    a fixed Resize and no shape arithmetic."""
    if factor == 1:
        return x
    return nn.functional.interpolate(x, scale_factor=float(factor), mode="bilinear", align_corners=False)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "ConvBNAct",
    "DepthwiseSeparableBlock",
    "InvertedResidual",
    "NormConfig",
    "SeparableConvBNAct",
    "count_parameters",
    "make_divisible",
    "upsample_bilinear",
    "same_padding",
]

"""MobileNet-MH (MobileNetMultiAVGSeg) built from a block table, with output-stride (atrous) handling.

Once the running stride reaches `output_stride`, later strided blocks run at stride 1 and the dilation rate is
multiplied by their stride; that block and every later k>1 depthwise conv use the new rate (official facts 5.1:
block 13 on runs at dilation 2 for output stride 16). No ImageNet tail (global pool + 1x1 to 1280) is built.
"""

from __future__ import annotations

from torch import Tensor, nn

from maskconver_deploy.model.blocks import ConvBNAct, InvertedResidual, NormConfig
from maskconver_deploy.model.specs import BlockRow


class MobileNetMH(nn.Module):
    """Backbone returning the endpoints named in the table ("s4", "s8", "s16") as a dict.

    `feature_channels` and `feature_strides` describe each endpoint, so the decoder and heads never
    hard-code widths. When several rows name one endpoint, the last one wins.
    """

    def __init__(
        self, rows: tuple[BlockRow, ...], output_stride: int = 16, norm: NormConfig = NormConfig(), in_channels: int = 3
    ) -> None:
        super().__init__()
        if not rows:
            raise ValueError("the block table is empty")
        blocks: list[nn.Module] = []
        self.endpoint_of_block: list[str | None] = []
        self.feature_channels: dict[str, int] = {}
        self.feature_strides: dict[str, int] = {}
        current_stride, rate, channels = 1, 1, in_channels
        for row in rows:
            stride, dilation = row.stride, 1
            if current_stride >= output_stride and stride > 1:
                rate *= stride
                stride = 1
            if current_stride >= output_stride:
                dilation = rate
            else:
                current_stride *= stride
            if row.kind == "conv":
                block: nn.Module = ConvBNAct(
                    channels, row.out, row.kernel, stride=stride, dilation=dilation if row.kernel > 1 else 1, norm=norm
                )
            elif row.kind == "ib":
                block = InvertedResidual(
                    channels,
                    row.out,
                    row.kernel,
                    stride,
                    row.expand,
                    dilation=dilation if row.kernel > 1 else 1,
                    norm=norm,
                )
            else:
                raise ValueError(f"unknown block kind '{row.kind}'")
            blocks.append(block)
            self.endpoint_of_block.append(row.endpoint)
            channels = row.out
            if row.endpoint is not None:
                self.feature_channels[row.endpoint] = channels
                self.feature_strides[row.endpoint] = current_stride
        self.blocks = nn.ModuleList(blocks)
        self.output_stride = current_stride

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = {}
        for block, endpoint in zip(self.blocks, self.endpoint_of_block):
            x = block(x)
            if endpoint is not None:
                features[endpoint] = x
        return features

"""The three prediction heads (DeepLabV3+ "sum to merge"), the class-embedding table and the mask-embedding MLP.

Each head: low-level 1x1 conv on the stride-8 backbone feature -> BN -> ReLU; the decoder output is bilinearly
upsampled to that size and added (no activation after the sum); `num_convs` x [depthwise kxk -> BN -> ReLU ->
1x1 -> BN -> ReLU]; a final 1x1 conv with bias. Official facts 1.3, 1.5.
"""

from __future__ import annotations

from torch import Tensor, nn

from maskconver_deploy.model.blocks import ConvBNAct, DepthwiseSeparableBlock, NormConfig, upsample_bilinear

HEATMAP_BIAS = -2.19  # CenterNet prior: sigmoid(-2.19) ~ 0.1
PREDICTION_STD = 0.01


class SumMergeHead(nn.Module):
    """One DeepLabV3+ sum-merge head producing `out_channels` maps at the low-level feature's resolution."""

    def __init__(
        self,
        low_level_channels: int,
        decoder_channels: int,
        out_channels: int,
        channels: int = 256,
        kernel: int = 7,
        num_convs: int = 2,
        bias_init: float = 0.0,
        upsample: int = 2,
        norm: NormConfig = NormConfig(),
    ) -> None:
        super().__init__()
        if decoder_channels != channels:
            raise ValueError(f"sum-merge needs decoder width == head width, got {decoder_channels} and {channels}")
        self.low_level = ConvBNAct(low_level_channels, channels, 1, norm=norm)
        self.convs = nn.Sequential(
            *[DepthwiseSeparableBlock(channels, channels, kernel, norm=norm) for _ in range(num_convs)]
        )
        self.predict = nn.Conv2d(channels, out_channels, 1, bias=True)
        self.bias_init = bias_init
        self.upsample = upsample  # decoder stride / low-level stride

    def reset_prediction(self) -> None:
        """Prediction conv: normal(std 0.01) weights, constant bias (heatmap -2.19, embeddings 0)."""
        nn.init.normal_(self.predict.weight, std=PREDICTION_STD)
        nn.init.constant_(self.predict.bias, self.bias_init)

    def forward(self, low_level: Tensor, decoded: Tensor) -> Tensor:
        merged = self.low_level(low_level) + upsample_bilinear(decoded, self.upsample)
        return self.predict(self.convs(merged))


class MaskEmbeddingMLP(nn.Sequential):
    """Linear(E, E) -> LayerNorm(eps 1e-6) -> ReLU -> Linear(E, E)."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-6), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and zero biases (Keras Dense defaults)."""
        for layer in self:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)


def class_embedding_table(num_classes: int, dim: int) -> nn.Embedding:
    """Learned class-embedding table, uniform(-0.05, 0.05) as Keras' Embedding default."""
    table = nn.Embedding(num_classes, dim)
    nn.init.uniform_(table.weight, -0.05, 0.05)
    return table


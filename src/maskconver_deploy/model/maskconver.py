"""MaskConver: backbone -> ASPP -> three sum-merge heads, plus the class embedding and the mask-embedding MLP.

`forward` gives the dense training outputs; `mask_embeddings` and `mask_logits` turn (center, class) pairs into
mask logits; `normalize` maps uint8 NHWC images to the network input. Inference post-processing (peaks, top-N,
panoptic merge) lives in postprocess.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskconver_deploy.model.backbone import MobileNetMH
from maskconver_deploy.model.blocks import NormConfig
from maskconver_deploy.model.decoder import ASPP
from maskconver_deploy.model.heads import HEATMAP_BIAS, MaskEmbeddingMLP, SumMergeHead, class_embedding_table
from maskconver_deploy.model.specs import BACKBONES, MaskConverSpec

HEAD_NAMES = ("heatmap", "center_embedding", "mask_features")  # keys of forward()


def _endpoint_with_stride(backbone: MobileNetMH, stride: int) -> str:
    """Name of the backbone endpoint at `stride`; a spec asking for a missing stride is a ValueError."""
    for name, endpoint_stride in backbone.feature_strides.items():
        if endpoint_stride == stride:
            return name
    raise ValueError(f"the backbone has no endpoint at stride {stride} (it has {backbone.feature_strides})")


class MaskConver(nn.Module):
    """The MaskConver network for one `MaskConverSpec`."""

    def __init__(self, spec: MaskConverSpec) -> None:
        super().__init__()
        if spec.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone '{spec.backbone}'; known: {', '.join(BACKBONES)}")
        if spec.mask_activation not in ("hard_sigmoid", "hard-sigmoid", "sigmoid"):
            raise ValueError(f"mask_activation must be 'hard-sigmoid' or 'sigmoid', got '{spec.mask_activation}'")
        if spec.merge not in ("input", "feature", "official", "input-legacy"):
            raise ValueError(f"merge must be input, feature, official or input-legacy, got '{spec.merge}'")
        self.spec = spec
        norm = NormConfig(eps=spec.bn_eps, momentum=spec.bn_momentum)
        self.backbone = MobileNetMH(BACKBONES[spec.backbone], output_stride=spec.output_stride, norm=norm)
        self.low_level_endpoint = _endpoint_with_stride(self.backbone, spec.feature_stride)
        self.decoder_endpoint = _endpoint_with_stride(self.backbone, spec.output_stride)
        self.decoder = ASPP(
            self.backbone.feature_channels[self.decoder_endpoint], spec.decoder_channels, spec.aspp_rates, norm=norm
        )
        if spec.output_stride % spec.feature_stride:
            raise ValueError(
                f"output_stride {spec.output_stride} is not a multiple of feature_stride {spec.feature_stride}"
            )
        if spec.input_size[0] % spec.output_stride or spec.input_size[1] % spec.output_stride:
            raise ValueError(f"input size {spec.input_size} is not a multiple of output_stride {spec.output_stride}")
        low_channels = self.backbone.feature_channels[self.low_level_endpoint]
        out_widths = dict(zip(HEAD_NAMES, (spec.num_classes, spec.embedding_dim, spec.embedding_dim)))
        self.heads = nn.ModuleDict(
            {
                name: SumMergeHead(
                    low_channels,
                    self.decoder.out_channels,
                    width,
                    channels=spec.head_channels,
                    kernel=spec.head_kernel,
                    num_convs=spec.head_convs,
                    bias_init=HEATMAP_BIAS if name == "heatmap" else 0.0,
                    upsample=spec.output_stride // spec.feature_stride,
                    norm=norm,
                )
                for name, width in out_widths.items()
            }
        )
        self.class_embedding = class_embedding_table(spec.num_classes, spec.embedding_dim)
        self.mlp = MaskEmbeddingMLP(spec.embedding_dim)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        # uint8 -> (x / 255 - mean) / std folded into one multiply-add; not part of the state_dict
        self.register_buffer("input_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("input_shift", -mean / std, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal (fan-in) convs, unit BN; then the heads' prediction convs and the MLP get their own init."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for head in self.heads.values():
            head.reset_prediction()
        self.mlp.reset_parameters()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Normalised float images [B, 3, H, W] -> heatmap logits [B, C, h, w], center embedding and mask
        features [B, E, h, w], with (h, w) = (H, W) / feature_stride."""
        stride = self.spec.output_stride
        if not torch.jit.is_tracing() and (images.shape[-2] % stride or images.shape[-1] % stride):
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the output stride {stride}")
        features = self.backbone(images)
        decoded = self.decoder(features[self.decoder_endpoint])
        low_level = features[self.low_level_endpoint]
        return {name: head(low_level, decoded) for name, head in self.heads.items()}

    def mask_embeddings(self, center_embedding: Tensor, positions: Tensor, classes: Tensor) -> Tensor:
        """Mask embedding [B, K, E] of K (position, class) pairs per image.

        positions: flat index y * w + x on the feature grid, [B, K]; classes: [B, K], negative = padding (row 0).
        The center embedding at each position is multiplied by the class embedding (unless the spec disables it),
        then passed through the MLP.
        """
        per_pixel = center_embedding.flatten(2).transpose(1, 2)  # [B, h*w, E]
        index = positions.unsqueeze(-1).expand(-1, -1, self.spec.embedding_dim)
        gathered = torch.gather(per_pixel, 1, index)
        if self.spec.class_embedding:
            gathered = gathered * self.class_embedding(classes.clamp(min=0))
        return self.mlp(gathered)

    def mask_logits(self, mask_embeddings: Tensor, mask_features: Tensor) -> Tensor:
        """Dot product over E of each mask embedding [B, K, E] with every pixel of [B, E, h, w] -> [B, K, h, w]."""
        logits = torch.matmul(mask_embeddings, mask_features.flatten(2))  # [B, K, h*w]
        return logits.reshape(logits.shape[0], logits.shape[1], mask_features.shape[2], mask_features.shape[3])

    def normalize(self, image_uint8_nhwc: Tensor) -> Tensor:
        """uint8 RGB [B, H, W, 3] -> float [B, 3, H, W] normalised with the spec's mean/std (0..1 scale)."""
        pixels = image_uint8_nhwc.permute(0, 3, 1, 2).to(self.input_scale.dtype)
        return pixels * self.input_scale + self.input_shift

"""Architecture as data: the MobileNet-MH block table and the presets. No torch here.

Sources: the MaskConver paper (sections 3-4, Tables 1-3) and the official implementation
(`MobileNetMultiAVGSeg`, ASPP v1, DeepLabV3+ "sum to merge" heads; see README "Model").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BlockRow:
    """One row of a MobileNet block table.

    kind: "conv" (conv + BN + ReLU) or "ib" (inverted bottleneck: 1x1 expand, kxk depthwise, 1x1 project).
    expand: expansion ratio of an "ib" block; `out`: output channels; `endpoint`: feature name it feeds.
    """

    kind: str
    kernel: int
    stride: int
    expand: float
    out: int
    endpoint: str | None = None


# MobileNetMultiAVGSeg (MobileNet-MH, "reduced last-stage filters"), the official MaskConver backbone.
# Endpoints: "s4" (stride 4), "s8" (stride 8, low-level feature of every head), "s16" (ASPP input).
# The ImageNet tail (global pool + 1x1 conv to 1280) of the official Keras model is not built: MaskConver
# never uses it (it is 576,000 parameters; see README "Model").
MOBILENET_MH_AVG_SEG: tuple[BlockRow, ...] = (
    BlockRow("conv", 3, 2, 0, 32),
    BlockRow("ib", 3, 2, 3, 32),
    BlockRow("ib", 3, 1, 2, 32, "s4"),
    BlockRow("ib", 5, 2, 5, 64),
    BlockRow("ib", 3, 1, 3, 64),
    BlockRow("ib", 3, 1, 2, 64),
    BlockRow("ib", 3, 1, 3, 64, "s8"),
    BlockRow("ib", 5, 2, 6, 128),
    BlockRow("ib", 3, 1, 3, 128),
    BlockRow("ib", 3, 1, 3, 128),
    BlockRow("ib", 3, 1, 3, 128),
    BlockRow("ib", 3, 1, 6, 160),
    BlockRow("ib", 3, 1, 4, 160),
    BlockRow("ib", 3, 2, 6, 192),  # output stride 16: runs at stride 1, dilation 2 from here on
    BlockRow("ib", 5, 1, 2, 96),
    BlockRow("ib", 5, 1, 4, 96),
    BlockRow("ib", 5, 1, 4, 96),
    BlockRow("conv", 1, 1, 0, 448, "s16"),
)

BACKBONES: dict[str, tuple[BlockRow, ...]] = {"mobilenet-mh-avg-seg": MOBILENET_MH_AVG_SEG}


@dataclass(frozen=True)
class MaskConverSpec:
    """Everything that defines one MaskConver variant. One dataclass per variant, no inheritance."""

    name: str
    num_classes: int  # contiguous class indices, things first
    num_things: int
    input_size: tuple[int, int]  # (H, W) of the network input
    backbone: str = "mobilenet-mh-avg-seg"
    output_stride: int = 16  # backbone stride at the ASPP input
    feature_stride: int = 8  # stride of the heads' outputs (low-level feature "s8")
    decoder_channels: int = 256  # ASPP width (paper: hidden size 256)
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    head_channels: int = 256
    head_kernel: int = 7  # depthwise kernel of the heads: 7 official code, 3 in the paper's text
    head_convs: int = 2
    embedding_dim: int = 256  # C_E
    num_proposals: int = 100  # N, top-N centers at inference (paper default)
    class_embedding: bool = True  # Table 7 ablation switch
    stuff_centers: str = "islands"  # "islands" (k largest) or "global" (Table 6 ablation)
    max_stuff_islands: int = 3  # k
    max_instances: int = 100  # padded number of GT centers in training
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01  # PyTorch convention (Keras 0.99)
    # panoptic merge (official generator values; small_area at 640x640 output, scaled by area for other sizes)
    object_mask_threshold: float = 0.01
    overlap_threshold: float = 0.7
    small_area_threshold: int = 256
    mask_activation: str = "hard_sigmoid"  # deployed path (paper section 3.4); "sigmoid" is the option
    merge: str = "input"  # merge path of the deployed graphs (postprocess.MERGES)

    @property
    def num_stuff(self) -> int:
        return self.num_classes - self.num_things

    @property
    def feature_size(self) -> tuple[int, int]:
        return (self.input_size[0] // self.feature_stride, self.input_size[1] // self.feature_stride)

    def scaled_small_area(self) -> int:
        """Small-area threshold in pixels at this spec's output size (official value is at 640x640)."""
        h, w = self.input_size
        return int(round(self.small_area_threshold * (h * w) / (640 * 640)))

    def with_changes(self, **changes: Any) -> MaskConverSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("input_size", "aspp_rates", "mean", "std"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskConverSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown spec fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("input_size", "aspp_rates", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


PRESETS: dict[str, MaskConverSpec] = {
    # COCO panoptic: 133 classes (80 things, 53 stuff), the paper's Tables 1-3.
    "coco-640": MaskConverSpec("coco-640", num_classes=133, num_things=80, input_size=(640, 640)),
    "coco-256": MaskConverSpec("coco-256", num_classes=133, num_things=80, input_size=(256, 256)),
    # Cityscapes: 19 train classes (8 things, 11 stuff), full resolution.
    "cityscapes": MaskConverSpec("cityscapes", num_classes=19, num_things=8, input_size=(1024, 2048)),
    # The synthetic shapes data set (maskconver data synth): 5 thing shapes, 4 stuff textures.
    "shapes-256": MaskConverSpec(
        "shapes-256", num_classes=9, num_things=5, input_size=(256, 256), num_proposals=50, max_instances=50
    ),
}


def get_preset(name: str) -> MaskConverSpec:
    """Look up a preset by name; unknown names list the known ones."""
    from maskconver_deploy.errors import UserError

    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]

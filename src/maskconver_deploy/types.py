"""Value types shared by every part of the toolkit. numpy only: no torch, no runtime imports.

The panoptic encoding is fixed here, once:
    panoptic id = (class_index + 1) * LABEL_DIVISOR + instance,   0 = VOID
`class_index` is the model's contiguous class index (0..C-1, things first); `instance` is 0 for stuff
(all pixels of a stuff class form one segment) and the proposal slot + 1 (1..N) for things.
The same integer is used as the segment id in COCO-panoptic PNGs, where 0 is VOID too.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

LABEL_DIVISOR = 1000
VOID_ID = 0

INPUT_NAME = "image"  # uint8, [1, H, W, 3], RGB
PANOPTIC_OUTPUTS = ("panoptic", "scores", "classes", "centers")
RAW_OUTPUTS = ("heatmap", "mask_logits", "scores", "classes", "centers")
SEMANTIC_OUTPUTS = ("semantic",)
OUTPUT_NAMES = {"panoptic": PANOPTIC_OUTPUTS, "raw": RAW_OUTPUTS, "semantic": SEMANTIC_OUTPUTS}
METADATA_KEY = "maskconver"  # ONNX metadata_props key holding ModelMeta as JSON


class Precision(str, enum.Enum):
    """Numeric precision of a compiled artifact."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"  # bfloat16 network, float32 post-processing (OpenVINO on CPUs with AVX512-BF16 / AMX)
    INT8_DYNAMIC = "int8-dynamic"  # weight-only int8
    INT8_STATIC = "int8-static"  # ONNX Runtime QDQ with calibration
    INT8 = "int8"  # full integer (TFLite, TensorRT) with calibration


@dataclass(frozen=True)
class Category:
    """One class of a data set. `id` is the data set's category id (COCO ids are not contiguous)."""

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Category:
        return cls(int(d["id"]), str(d["name"]), bool(d["isthing"]), tuple(int(c) for c in d.get("color", (0, 0, 0))))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "isthing": int(self.isthing), "color": list(self.color)}


@dataclass
class ModelMeta:
    """What every artifact carries (ONNX metadata key `maskconver`, and the `.json` sidecar)."""

    preset: str
    categories: list[Category]
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_proposals: int
    output: str = "panoptic"  # panoptic | raw | semantic
    object_mask_threshold: float = 0.01
    overlap_threshold: float = 0.7
    small_area_threshold: int = 0
    label_divisor: int = LABEL_DIVISOR
    feature_stride: int = 8
    merge: str = "input"  # merge path of the post-processing (model/postprocess.py MERGES)
    mask_activation: str = "hard-sigmoid"  # hard-sigmoid | sigmoid
    checkpoint_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES[self.output]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def merge_path(self) -> str:
        """The post-processing path in one label, e.g. 'input/hard-sigmoid' (tables, logs)."""
        return f"{self.merge}/{self.mask_activation}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["categories"] = [c.to_dict() for c in self.categories]
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        d = dict(d)
        d["categories"] = [Category.from_dict(c) for c in d["categories"]]
        d["input_size"] = tuple(int(v) for v in d["input_size"])
        d["mean"] = tuple(float(v) for v in d["mean"])
        d["std"] = tuple(float(v) for v in d["std"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Segment:
    """One segment of a panoptic answer."""

    id: int
    category_index: int
    isthing: bool
    area: int
    score: float


@dataclass
class PanopticOutput:
    """A decoded panoptic answer: the id map plus the proposals that produced it."""

    panoptic: np.ndarray  # int32 [H, W], encoding above
    scores: np.ndarray  # float32 [N], proposal scores, sorted high to low
    classes: np.ndarray  # int32 [N], class index of each proposal
    centers: np.ndarray  # int32 [N, 2], (y, x) on the heatmap grid (stride `feature_stride`)

    def category_map(self) -> np.ndarray:
        """int32 [H, W]: class index of each pixel, -1 for VOID."""
        return np.where(self.panoptic > 0, self.panoptic // LABEL_DIVISOR - 1, -1).astype(np.int32)

    def segments(self, isthing: list[bool] | tuple[bool, ...]) -> list[Segment]:
        """Segments present in the map, with area and score (stuff: best proposal of that class)."""
        ids, areas = np.unique(self.panoptic, return_counts=True)
        out = []
        for seg_id, area in zip(ids.tolist(), areas.tolist()):
            if seg_id == VOID_ID:
                continue
            cls, inst = divmod(seg_id, LABEL_DIVISOR)
            cls -= 1
            if inst > 0:
                score = float(self.scores[inst - 1])
            else:
                same = self.scores[self.classes == cls]
                score = float(same.max()) if same.size else 0.0
            out.append(Segment(int(seg_id), int(cls), bool(isthing[cls]), int(area), score))
        return out


def decode_panoptic(outputs: dict[str, np.ndarray]) -> PanopticOutput:
    """Graph outputs (batch dimension removed) -> PanopticOutput."""
    return PanopticOutput(
        panoptic=np.asarray(outputs["panoptic"], dtype=np.int32),
        scores=np.asarray(outputs["scores"], dtype=np.float32),
        classes=np.asarray(outputs["classes"], dtype=np.int32),
        centers=np.asarray(outputs["centers"], dtype=np.int32),
    )

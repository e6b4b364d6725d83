"""Data sets: COCO-panoptic records and files, synthetic scenes, and the image input policy.

numpy, PIL and scipy only: nothing here imports torch, the model or a backend.
"""

from __future__ import annotations

from maskconver_deploy.data.coco_panoptic import (
    PredictionWriter,
    load_annotations,
    load_example,
    load_panoptic_json,
    load_split,
    panoptic_to_coco,
    read_id_map,
    write_id_map,
)
from maskconver_deploy.data.preprocess import Letterbox, letterbox, load_image, unletterbox
from maskconver_deploy.data.records import DatasetMeta, PanopticRecord, SegmentInfo
from maskconver_deploy.data.synthetic import SHAPES_CATEGORIES

__all__ = [
    "SHAPES_CATEGORIES",
    "DatasetMeta",
    "Letterbox",
    "PanopticRecord",
    "PredictionWriter",
    "SegmentInfo",
    "letterbox",
    "load_annotations",
    "load_example",
    "load_image",
    "load_panoptic_json",
    "load_split",
    "panoptic_to_coco",
    "read_id_map",
    "unletterbox",
    "write_id_map",
]

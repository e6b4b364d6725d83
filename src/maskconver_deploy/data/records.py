"""Light data set records: one `PanopticRecord` per image, and the `DatasetMeta` of a data set.

The class-order rule lives here and only here: the model's contiguous class index of a category is its
position in `DatasetMeta.categories`, which holds the thing categories first, then the stuff categories,
each group in the order the data set lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskconver_deploy.errors import UserError
from maskconver_deploy.types import LABEL_DIVISOR, Category

__all__ = ["SegmentInfo", "PanopticRecord", "DatasetMeta", "model_order"]


@dataclass
class SegmentInfo:
    """One entry of a COCO-panoptic `segments_info` list. `bbox` is [x, y, w, h] in pixels."""

    id: int
    category_id: int
    iscrowd: bool = False
    area: int = 0
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": int(self.id),
            "category_id": int(self.category_id),
            "iscrowd": int(bool(self.iscrowd)),
            "area": int(self.area),
            "bbox": [int(v) for v in self.bbox],
        }


@dataclass
class PanopticRecord:
    """One annotated image: where its photo and its segment-id PNG are, its size and its segments."""

    image_id: int | str
    image_path: Path
    png_path: Path
    height: int
    width: int
    segments: list[SegmentInfo] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        """The PNG's file name (what a COCO-panoptic annotation calls `file_name`)."""
        return self.png_path.name


def model_order(categories: list[Category]) -> list[Category]:
    """Categories in the model's class-index order: things first, then stuff, stable within each group."""
    return [c for c in categories if c.isthing] + [c for c in categories if not c.isthing]


@dataclass
class DatasetMeta:
    """The categories of a data set, in model order (things first, reordered on construction), and the
    id <-> class-index maps."""

    categories: list[Category]
    label_divisor: int = LABEL_DIVISOR

    def __post_init__(self) -> None:
        ordered = model_order(list(self.categories))
        ids = [c.id for c in ordered]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise UserError(f"duplicate category ids {dup}")
        self.categories = ordered
        self.label_divisor = int(self.label_divisor)
        self._index = {c.id: i for i, c in enumerate(ordered)}

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def num_things(self) -> int:
        return sum(1 for c in self.categories if c.isthing)

    @property
    def isthing(self) -> list[bool]:
        """Thing flag per class index."""
        return [c.isthing for c in self.categories]

    @property
    def category_ids(self) -> list[int]:
        """Data set category id per class index."""
        return [c.id for c in self.categories]

    def has_category(self, category_id: int) -> bool:
        return int(category_id) in self._index

    def class_index(self, category_id: int) -> int:
        """The model's contiguous class index of a data set category id; unknown ids are a UserError."""
        try:
            return self._index[int(category_id)]
        except KeyError:
            raise UserError(f"unknown category id {category_id}") from None

    def category(self, category_id: int) -> Category:
        return self.categories[self.class_index(category_id)]

    def category_id(self, class_index: int) -> int:
        """The data set category id of a model class index."""
        if not 0 <= int(class_index) < len(self.categories):
            raise UserError(f"class index {class_index} is outside 0..{len(self.categories) - 1}")
        return self.categories[int(class_index)].id

    def to_dicts(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.categories]

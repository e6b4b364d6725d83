"""The one runner interface every backend implements, and the availability record."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskconver_deploy.errors import UserError
from maskconver_deploy.types import INPUT_NAME, ModelMeta, PanopticOutput, decode_panoptic


@dataclass(frozen=True)
class Availability:
    """Can this backend run here? If not: why, and how to get it. Never raises."""

    ok: bool
    reason: str = ""
    hint: str = ""


class Runner(ABC):
    """Loads one artifact and runs images through it.

    Use as a context manager: `with runner: runner.infer(image)`. `infer` checks the image against the
    artifact's input spec, times only the backend call (`last_latency_s`) and returns the graph outputs
    with the batch dimension removed. `predict` takes an image of any size and returns the panoptic answer
    at that size (the letterbox policy of `data.preprocess`).
    """

    def __init__(self, name: str, artifact: Path, meta: ModelMeta, threads: int | None = None) -> None:
        self.name = name  # e.g. "ort-int8-static"
        self.artifact = Path(artifact)
        self.meta = meta
        self.threads = threads
        self.last_latency_s = float("nan")
        self._opened = False

    # -- subclass hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> None:
        """Load the session / interpreter / engine."""

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the raw backend call; return every output by name, batch dimension kept."""

    def _close(self) -> None:
        """Release what `_open` loaded."""

    # -- public ---------------------------------------------------------------------------------------
    def open(self) -> Runner:
        if not self._opened:
            self._open()
            self._opened = True
        return self

    def close(self) -> None:
        if self._opened:
            self._close()
            self._opened = False

    def __enter__(self) -> Runner:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one uint8 RGB image of exactly the model's input size; outputs without the batch dim."""
        h, w = self.meta.input_size
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (h, w, 3):
            got = f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
            raise UserError(f"{self.name}: expected a uint8 image of shape ({h}, {w}, 3), got {got}")
        self.open()
        feeds = {INPUT_NAME: np.ascontiguousarray(image[None])}
        start = time.perf_counter()
        outputs = self._run(feeds)
        self.last_latency_s = time.perf_counter() - start
        return {name: np.asarray(value)[0] for name, value in outputs.items()}

    def predict(self, image: np.ndarray) -> PanopticOutput:
        """Panoptic answer for a uint8 RGB image of any size, mapped back to that size."""
        from maskconver_deploy.data.preprocess import letterbox, unletterbox

        boxed, box = letterbox(image, self.meta.input_size)
        out = decode_panoptic(self.infer(boxed))
        out.panoptic = unletterbox(out.panoptic, box)
        return out

"""Metrics over outputs only (pure numpy): panoptic quality by the reference rules, and semantic mIoU."""

from __future__ import annotations

from maskconver_deploy.metrics.miou import MIoUAccumulator
from maskconver_deploy.metrics.pq import PQAccumulator

__all__ = ["MIoUAccumulator", "PQAccumulator"]

"""Checkpoints: weights + spec + categories + provenance in one plain-typed dict, loaded with weights_only=True.

Layout: {"format": "maskconver-deploy/1", "spec": spec.to_dict(), "categories": [Category.to_dict()...],
"state_dict": {...}, "provenance": {...}}. Everything but the tensors is plain Python (dict, list, str, int,
float, bool, None), so `torch.load(weights_only=True)` reads it and refuses anything that carries code.
"""

from __future__ import annotations

import colorsys
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import atomic_path
from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.specs import MaskConverSpec
from maskconver_deploy.types import Category, ModelMeta

CHECKPOINT_FORMAT = "maskconver-deploy/1"
_PLAIN_TYPES = (str, int, float, bool, type(None))


def default_categories(spec: MaskConverSpec) -> list[Category]:
    """Placeholder categories class_0..class_{C-1}, things first, ids 1..C, evenly spread colours."""
    categories = []
    for index in range(spec.num_classes):
        red, green, blue = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.65, 0.95)
        color = (int(red * 255), int(green * 255), int(blue * 255))
        categories.append(Category(index + 1, f"class_{index}", index < spec.num_things, color))
    return categories


def _check_plain(value: Any, where: str) -> None:
    """Raise UserError if `value` is not built from plain types only (weights_only could not load it back)."""
    if isinstance(value, _PLAIN_TYPES):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UserError(f"{where} has a non-string key {key!r}; checkpoints hold plain JSON-like values only")
            _check_plain(item, f"{where}.{key}")
        return
    raise UserError(f"{where} is a {type(value).__name__}; checkpoints hold plain JSON-like values only")


def save_checkpoint(
    path: str | Path, model: MaskConver, categories: list[Category], provenance: dict[str, Any], force: bool = False
) -> Path:
    """Write a checkpoint atomically; refuse to overwrite unless `force`. Returns the path."""
    path = Path(path)
    spec = model.spec
    if len(categories) != spec.num_classes:
        raise UserError(f"{len(categories)} categories given for a model with {spec.num_classes} classes", path)
    _check_plain(provenance, "provenance")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "spec": spec.to_dict(),
        "categories": [category.to_dict() for category in categories],
        "state_dict": {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()},
        "provenance": dict(provenance),
    }
    with atomic_path(path, force=force) as tmp:
        torch.save(payload, tmp)
    return path


def _first_sentence(exc: BaseException, limit: int = 100) -> str:
    """A short reason from an exception: its type and the first sentence of its message."""
    text = " ".join(str(exc).split()).split(". ")[0][:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_payload(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True, every failure mapped to a one-line UserError naming the file."""
    if not path.is_file():
        raise UserError("no such checkpoint file", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # weights_only met a class or function reference
            raise UserError("refused: the checkpoint carries pickled Python objects, not only weights", path) from None
        raise UserError("not a readable checkpoint (not a torch archive, or corrupted)", path) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError) as exc:
        raise UserError(f"not a readable checkpoint, or truncated ({_first_sentence(exc)})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"not a maskconver checkpoint (expected format '{CHECKPOINT_FORMAT}')", path)
    for key in ("spec", "categories", "state_dict"):
        if key not in payload:
            raise UserError(f"checkpoint has no '{key}'", path)
    return payload


def load_checkpoint(path: str | Path, preset: str | None = None) -> tuple[MaskConver, list[Category], dict[str, Any]]:
    """Load (model in eval mode, categories, provenance). `preset`, when given, must match the checkpoint's."""
    path = Path(path)
    payload = _read_payload(path)
    try:
        spec = MaskConverSpec.from_dict(payload["spec"])
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"checkpoint spec is invalid ({exc})", path) from None
    if preset is not None and spec.name != preset:
        raise UserError(f"checkpoint is for preset '{spec.name}', not '{preset}'", path)
    try:
        categories = [Category.from_dict(item) for item in payload["categories"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"checkpoint categories are invalid ({exc})", path) from None
    if len(categories) != spec.num_classes:
        raise UserError(f"checkpoint has {len(categories)} categories for {spec.num_classes} classes", path)
    try:
        model = MaskConver(spec)
    except ValueError as exc:
        raise UserError(f"checkpoint spec cannot be built ({exc})", path) from None
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise UserError("checkpoint state_dict is not a dict", path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        name
        for name in set(expected) & set(state)
        if not isinstance(state[name], torch.Tensor) or tuple(state[name].shape) != tuple(expected[name].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if names:
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                parts.append(f"{label}: {', '.join(names[:3])}{more}")
        raise UserError(f"weights do not match the spec '{spec.name}': {'; '.join(parts)}", path)
    model.load_state_dict(state, strict=True)
    model.eval()
    provenance = payload.get("provenance") or {}
    return model, categories, dict(provenance)


def model_meta(
    model: MaskConver,
    categories: list[Category],
    output: str = "panoptic",
    num_proposals: int | None = None,
    checkpoint_sha256: str = "",
) -> ModelMeta:
    """The metadata every artifact carries, from the model's spec."""
    from maskconver_deploy.model.postprocess import feature_small_area, normalize_activation

    spec = model.spec
    return ModelMeta(
        preset=spec.name,
        categories=list(categories),
        input_size=tuple(spec.input_size),
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        num_proposals=spec.num_proposals if num_proposals is None else int(num_proposals),
        output=output,
        object_mask_threshold=spec.object_mask_threshold,
        overlap_threshold=spec.overlap_threshold,
        small_area_threshold=spec.scaled_small_area(),
        feature_stride=spec.feature_stride,
        merge=spec.merge,
        mask_activation=normalize_activation(spec.mask_activation),
        checkpoint_sha256=checkpoint_sha256,
        extra={"num_things": spec.num_things, "mask_activation": spec.mask_activation, "spec": spec.to_dict(),
               "feature_small_area": feature_small_area(spec.small_area_threshold, spec.feature_size)},
    )

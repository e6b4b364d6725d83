"""Shared test settings: markers, the CI rule for required runtimes, and small shared fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def one_line_exit_2(result) -> str:
    """A CLI result that failed as bad input must: exit code 2, no traceback, one non-empty line (returned)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_unless_ci(message: str, module_level: bool = False) -> None:
    """Skip with `message`; under CI=true fail instead: nothing the default suite requires may skip there."""
    if under_ci():
        pytest.fail(f"CI=true and {message}: a required piece is missing", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def require_runtime(module: str, what: str, hint: str, module_level: bool = False) -> None:
    """Skip when a runtime is missing, except under CI=true, where a missing runtime fails the run."""
    if importlib.util.find_spec(module) is None:
        skip_unless_ci(f"{what} is not installed ({hint})", module_level)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real COCO-panoptic samples beside the repository (never copied into it)."""
    if not (SHARED_DATA / "coco_panoptic_sample").is_dir():
        skip_unless_ci(f"{SHARED_DATA / 'coco_panoptic_sample'} is not present (it holds the real COCO samples used "
                       "by format tests)")  # fmt: skip
    return SHARED_DATA

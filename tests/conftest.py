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


def require_runtime(module: str, what: str, hint: str) -> None:
    """Skip when a runtime is missing, except under CI=true, where a missing runtime fails the run."""
    if importlib.util.find_spec(module) is None:
        message = f"{what} is not installed ({hint})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {message}: an install step is missing", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real COCO-panoptic samples beside the repository (never copied into it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present (it holds the real COCO samples used by format tests)")
    return SHARED_DATA

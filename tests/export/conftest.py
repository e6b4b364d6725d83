"""Fixtures of the export tests: the tame tiny model (tamemodel.py), exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export import tamemodel


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tamemodel.tame_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tamemodel.checkpoint_path(tmp_path_factory.getbasetemp())

"""Fixtures of the export tests: the tame tiny model (tamemodel.py), exported once per test session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("maskconver_tests_tamemodel", Path(__file__).with_name("tamemodel.py"))
tamemodel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tamemodel)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tamemodel.tame_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tamemodel.checkpoint_path(tmp_path_factory.getbasetemp())

"""Fixtures of the bench tests: the tiny exported model and one real bench run over it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("maskconver_tests_tinymodel", Path(__file__).with_name("tinymodel.py"))
tinymodel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tinymodel)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.tiny_model_dir(tmp_path_factory.getbasetemp())

"""Fixtures of the bench tests: the tiny exported model and one real bench run over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench import tinymodel


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.tiny_model_dir(tmp_path_factory.getbasetemp())

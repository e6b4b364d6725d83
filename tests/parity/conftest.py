"""Fixtures of the parity tests: the tiny model with every ONNX Runtime artifact, and its validation set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parity import artifacts


@pytest.fixture(scope="session")
def parity_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    artifacts.require_onnxruntime()
    return artifacts.compiled_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def parity_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts.val_data(tmp_path_factory.getbasetemp())

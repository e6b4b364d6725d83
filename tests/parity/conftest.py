"""Fixtures of the parity tests: the tiny model with every ONNX Runtime artifact, and its validation set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("maskconver_tests_parity_artifacts", Path(__file__).with_name("artifacts.py"))
artifacts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(artifacts)


@pytest.fixture(scope="session")
def parity_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    artifacts.require_onnxruntime()
    return artifacts.compiled_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def parity_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts.val_data(tmp_path_factory.getbasetemp())

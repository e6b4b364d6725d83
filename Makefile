# maskconver-deploy: every target installs what it needs first (idempotent: stamps skip a second install).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TFVENV := .venv-onnx2tf
STAMP := $(VENV)/.installed
TFSTAMP := $(TFVENV)/.installed
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: help install test test-all demo model clean

help:
	@echo "make demo      the main job on the shipped model and data (export, compile, parity, eval, bench, report)"
	@echo "make test      the default test suite (no slow, no GPU tests)"
	@echo "make test-all  every test, slow ones included (GPU tests skip without a GPU)"
	@echo "make model     retrain the shipped model models/shapes-256.pt from generated data"
	@echo "make install   only create .venv (toolkit) and .venv-onnx2tf (the onnx2tf converter)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -e ".[tflite,dev]"
	@touch $@

# onnx2tf pins old numpy/onnx/onnxruntime, so it lives in its own environment (README "TFLite").
$(TFSTAMP): requirements-onnx2tf.txt
	@test -x $(TFVENV)/bin/python || $(PYTHON) -m venv $(TFVENV)
	$(TFVENV)/bin/pip install $(PIP_FLAGS) -r requirements-onnx2tf.txt
	@touch $@

install: $(STAMP) $(TFSTAMP)

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu"

test-all: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/maskconver pipeline --out reports/demo --force

model: install
	$(BIN)/maskconver data synth --out data/shapes --n 2400 --size 256 --seed 0 --force
	$(BIN)/maskconver train --preset shapes-256 --data data/shapes --out models/shapes-256.pt --force

clean:
	rm -rf artifacts .pytest_cache

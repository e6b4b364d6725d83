# maskconver-deploy: every target installs what it needs first (idempotent: stamps skip a second install).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TFVENV := .venv-onnx2tf
STAMP := $(VENV)/.installed
TFSTAMP := $(TFVENV)/.installed
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: help install test test-all demo model ablations clean

help:
	@echo "make demo      the main job on the shipped model and data (export, compile, parity, eval, bench, report)"
	@echo "make test      the default test suite (no slow, no GPU tests)"
	@echo "make test-all  every test, slow ones included (GPU tests skip without a GPU)"
	@echo "make model     retrain the shipped model models/shapes-256.pt from generated data"
	@echo "make ablations the paper's Tables 6-7 on the synthetic data: fine-tunes of the shipped model + two short trainings from scratch (models/ablations.json)"
	@echo "make install   only create .venv (toolkit) and .venv-onnx2tf (the onnx2tf converter)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -e ".[tflite,openvino,dev]"
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

# The shipped model: generated data (9,500 train / 500 val images), then six `maskconver train` runs on the CPU
# (device cpu, 2 threads; about 6 h 25 min of training in all on this 2-core machine: 134 + 51 + 84 + 49 + 33 +
# 33 min, run 2's from its first 250 steps). Run 1, from scratch: 8,000 steps (6,000 on 128x128 crops, 2,000 at
# 256x256); its weights become artifacts/shapes-256-stage1.pt and its log and summary
# models/shapes-256.stage1.train.{log,json}. Run 2: 1,500 steps at 256x256 from those weights with a fresh, lower
# learning-rate cycle. Run 3: 6,000 steps at 256x256 from run 2's weights with the corrected CenterNet radius (a
# fresh cycle, lr 0.02). Runs 4-6: fine-tunes, each from the one before with a fresh, lower cycle (4,500 steps at
# lr 0.01, then twice 3,000 at lr 0.005); run 6's last checkpoint is models/shapes-256.pt, the logs and summaries
# of runs 3-5 are models/shapes-256.run{3,4,5}.train.{log,json}. The committed checkpoint's runs 1-2 were trained
# before the radius fix and its run 3 started from run 2's checkpoint at step 250 (README "Data and training"):
# this recipe reproduces the runs, not those bits.
model: install
	$(BIN)/maskconver data synth --out data/shapes --n 10000 --size 256 --seed 0 --val-fraction 0.05 --force
	$(BIN)/maskconver train --preset shapes-256 --data data/shapes --out models/shapes-256.pt --steps 8000 --early-size 128 --early-steps 6000 --batch 8 --lr 0.04 --warmup 200 --seed 0 --threads 2 --workers 1 --mask-loss per-mask --eval-every 2000 --eval-limit 100 --final-eval 500 --force
	mkdir -p artifacts/retrain && mv models/shapes-256.pt artifacts/shapes-256-stage1.pt
	mv models/shapes-256.train.log models/shapes-256.stage1.train.log
	mv models/shapes-256.train.json models/shapes-256.stage1.train.json
	$(BIN)/maskconver train --preset shapes-256 --data data/shapes --init artifacts/shapes-256-stage1.pt --out models/shapes-256.pt --steps 1500 --batch 8 --lr 0.01 --warmup 50 --seed 1 --threads 2 --workers 1 --mask-loss per-mask --eval-every 500 --eval-limit 100 --final-eval 500 --force
	$(BIN)/maskconver train --preset shapes-256 --data data/shapes --init models/shapes-256.pt --out artifacts/retrain/ft.pt --steps 6000 --batch 8 --lr 0.02 --warmup 100 --seed 2 --threads 2 --workers 1 --mask-loss per-mask --eval-every 1000 --eval-limit 100 --final-eval 500 --checkpoint-every 100 --force
	cp artifacts/retrain/ft.pt models/shapes-256.pt
	cp artifacts/retrain/ft.train.log models/shapes-256.run3.train.log
	cp artifacts/retrain/ft.train.json models/shapes-256.run3.train.json
	$(BIN)/maskconver train --preset shapes-256 --data data/shapes --init models/shapes-256.pt --out artifacts/retrain/ft4.pt --steps 4500 --batch 8 --lr 0.01 --warmup 100 --seed 3 --threads 2 --workers 1 --mask-loss per-mask --eval-every 1500 --eval-limit 100 --final-eval 500 --checkpoint-every 100 --force
	cp artifacts/retrain/ft4.train.log models/shapes-256.run4.train.log
	cp artifacts/retrain/ft4.train.json models/shapes-256.run4.train.json
	$(BIN)/maskconver train --preset shapes-256 --data data/shapes --init artifacts/retrain/ft4.pt --out artifacts/retrain/ft5.pt --steps 3000 --batch 8 --lr 0.005 --warmup 50 --seed 4 --threads 2 --workers 1 --mask-loss per-mask --eval-every 1000 --eval-limit 100 --final-eval 500 --checkpoint-every 100 --force
	cp artifacts/retrain/ft5.train.log models/shapes-256.run5.train.log
	cp artifacts/retrain/ft5.train.json models/shapes-256.run5.train.json
	$(BIN)/maskconver train --preset shapes-256 --data data/shapes --init artifacts/retrain/ft5.pt --out artifacts/retrain/ft6.pt --steps 3000 --batch 8 --lr 0.005 --warmup 50 --seed 5 --threads 2 --workers 1 --mask-loss per-mask --eval-every 1000 --eval-limit 100 --final-eval 500 --checkpoint-every 100 --force
	cp artifacts/retrain/ft6.pt models/shapes-256.pt
	cp artifacts/retrain/ft6.train.log models/shapes-256.train.log
	cp artifacts/retrain/ft6.train.json models/shapes-256.train.json
	$(BIN)/maskconver eval --checkpoint models/shapes-256.pt --data data/shapes --split val --json-out models/shapes-256.eval.json --force
	rm -f models/shapes-256.state.pt models/shapes-256.stage1.state.pt

# The paper's ablations (Tables 6-7) on the shapes data (README "Data and training"): three identical fine-tunes of
# the shipped model (200 steps at 256x256, same seed) that differ only in the ablated switch, and, for Table 7, two
# identical short trainings from scratch (1,500 steps on 128x128 crops) with the class embedding on and off; each
# run is evaluated on the 500 val images, and the table (the paper's numbers beside ours) goes to models/ablations.json.
ABLATION_TRAIN := $(BIN)/maskconver train --preset shapes-256 --data data/shapes --init models/shapes-256.pt --steps 200 --batch 8 --lr 0.01 --warmup 20 --seed 0 --threads 2 --workers 1 --mask-loss per-mask --final-eval 500 --force
ABLATION_SCRATCH := $(BIN)/maskconver train --preset shapes-256 --data data/shapes --steps 1500 --early-size 128 --early-steps 1500 --batch 8 --lr 0.04 --warmup 200 --seed 0 --threads 2 --workers 1 --mask-loss per-mask --final-eval 500 --force
ablations: install
	$(BIN)/maskconver data synth --out data/shapes --n 10000 --size 256 --seed 0 --val-fraction 0.05 --force
	$(ABLATION_TRAIN) --out artifacts/ablations/baseline.pt
	$(ABLATION_TRAIN) --out artifacts/ablations/global.pt --stuff-centers global
	$(ABLATION_TRAIN) --out artifacts/ablations/no-class-embedding.pt --no-class-embedding
	$(ABLATION_SCRATCH) --out artifacts/ablations/scratch-on.pt
	$(ABLATION_SCRATCH) --out artifacts/ablations/scratch-off.pt --no-class-embedding
	$(BIN)/python -m maskconver_deploy.training.ablations artifacts/ablations models/ablations.json --force

clean:
	rm -rf artifacts .pytest_cache

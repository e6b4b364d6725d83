"""Fixtures of the report tests: a real results folder (bench, evaluation, overlays) of the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench import tinymodel

BACKENDS = ["torch", "ort"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.tiny_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def results_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench.json (2 threads, proposals 10 and 5, ORT profile), eval/*.json on 2 generated images, overlays/*.png."""
    from maskconver_deploy import backends
    from maskconver_deploy.bench import BenchOptions, run_bench
    from maskconver_deploy.data import load_split
    from maskconver_deploy.data.synthetic import write_dataset
    from maskconver_deploy.evaluate import evaluate_runner
    from maskconver_deploy.pipeline import _save_png, overlay
    from maskconver_deploy.results import EvalRun

    root = tmp_path_factory.mktemp("results")
    options = BenchOptions(backends=BACKENDS, proposals=[10, 5], threads=[2], warmup=1, runs=3, profile=True,
                           peak_matrix=256)  # fmt: skip
    run_bench(tiny_model_dir, options).save(root / "bench.json")
    data = write_dataset(tmp_path_factory.mktemp("data") / "shapes", n=4, size=tinymodel.SIZE, seed=1, val_fraction=0.5)
    meta, records = load_split(data.out, "val")
    for name in BACKENDS:
        with backends.open_runner(name, model_dir=tiny_model_dir, threads=2) as runner:
            result = evaluate_runner(runner, records, meta)
            colors = [c.color for c in runner.meta.categories]
            from maskconver_deploy.data import load_example

            image, _ = load_example(records[0])
            _save_png(root / "overlays" / f"{name}.png", overlay(image, runner.predict(image).panoptic, colors), force=False)
        EvalRun.from_result(name, tinymodel.SIZE, tinymodel.PROPOSALS, result, str(data.out)).save(root / "eval" / f"{name}.json")
    return root

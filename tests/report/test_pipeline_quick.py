"""`maskconver pipeline --quick` end to end on the tiny model: every step runs for real, the report is rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from maskconver_deploy.bench import backend_status
from maskconver_deploy.cli import app
from maskconver_deploy.results import BenchResult, load_results

from tests.bench import tinymodel


def test_pipeline_quick_end_to_end(tmp_path: Path) -> None:
    checkpoint = tinymodel.make_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "reports" / "quick"
    args = ["pipeline", "--checkpoint", str(checkpoint), "--backends", "torch,ort,tensorrt", "--out", str(out),
            "--work", str(tmp_path / "work"), "--quick", "--n", "2", "--calib", str(tmp_path / "no-calibration")]  # fmt: skip
    runner = CliRunner()
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    for name in ("report.md", "report.html", "results/bench.json", "results/pipeline.json", "results/eval/torch.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "results" / "pipeline.json").read_text())
    assert [s["name"] for s in record["steps"]] == ["data", "export", "compile", "parity", "eval", "bench", "overlays", "report"]
    assert all(s["status"] == "ok" for s in record["steps"])
    states = {b["backend"]: b for b in record["backends"]}
    assert states["ort"]["status"] == "ok" and states["torch"]["status"] == "ok"
    if backend_status("tensorrt")[1]:  # no TensorRT here: skipped with why and how to get it
        assert states["tensorrt"]["status"] == "skipped" and states["tensorrt"]["reason"] and states["tensorrt"]["hint"]
    else:  # a machine with TensorRT builds and checks it like every other backend
        assert states["tensorrt"]["status"] == "ok" and states["tensorrt"]["artifacts"]["panoptic"]
    bundle = load_results(out)
    assert {r.backend for r in bundle.evals} >= {"torch", "ort"}
    assert {"0-ground-truth", "torch", "ort"} <= set(bundle.overlays)
    bench = BenchResult.load(out / "results" / "bench.json")
    assert bench.find("ort", "panoptic") is not None and bench.find("torch", "raw") is not None
    assert "ort" in done.output and "tensorrt" in done.output  # the final summary table lists skipped ones too

    # the feature merge path: built for fp32 ort, checked against PyTorch of that path, evaluated, timed; and
    # input-legacy timed beside the input path
    built = {(b["backend"], b["merge"]): b["status"] for b in record["backends"]}
    assert built[("ort", "feature")] == "ok" and built[("ort", "input")] == "ok"
    parity = json.loads((out / "results" / "parity.json").read_text())
    feature_parity = [c for c in parity["candidates"] if c["merge"] == "feature"]
    assert [c["backend"] for c in feature_parity] == ["ort"] and feature_parity[0]["verdict"] == "pass"
    for c in parity["candidates"]:  # every ORT artifact of either path has a raw graph: the merge check ran
        if c["backend"] == "ort":
            assert c["decision"]["merge_check"]["available"] and c["decision"]["merge_check"]["pixels_differ"] == 0
    assert bundle.eval_for("ort", merge="feature") is not None and (out / "results" / "eval" / "ort@feature.json").is_file()
    assert bundle.eval_for("ort", merge="feature").merge == "feature" and bundle.eval_for("ort").merge == "input"
    timed = {(e.backend, e.graph, e.merge) for e in bench.entries if e.ok}
    for merge in ("feature", "input-legacy"):
        assert {("torch", "panoptic", merge), ("ort", "panoptic", merge)} <= timed, merge
    report = (out / "report.md").read_text()
    assert "By merge path" in report and "| ort | feature/hard-sigmoid |" in report
    assert "## Parity" in report and "| ort | feature | fp32 |" in report and "merge check px differ" in report
    assert "input path: post-processing time <= 0.5 x input-legacy's" in report

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    rebuilt = runner.invoke(app, ["report", "--results", str(out), "--out", str(out), "--force"])
    assert rebuilt.exit_code == 0, rebuilt.output

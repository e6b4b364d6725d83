"""`maskconver bench` on a tiny exported model: real runners (PyTorch eager, ONNX Runtime), real timings.

The assertions check the structure and the internal consistency of the result, never how fast anything is.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maskconver_deploy.bench import (
    BenchOptions,
    MemoryProbe,
    parse_int_list,
    parse_ort_profile,
    plan_configs,
    run_bench,
)
from maskconver_deploy.cli import app
from maskconver_deploy.errors import UserError
from maskconver_deploy.results import STATUS_OK, STATUS_SKIPPED, BenchResult, LatencyStats

RUNS = 4
BACKENDS = ["torch", "ort", "tensorrt"]


@pytest.fixture(scope="module")
def result(tiny_model_dir: Path) -> BenchResult:
    options = BenchOptions(backends=BACKENDS, proposals=[10, 5], threads=[1], warmup=1, runs=RUNS, profile=True,
                           peak_matrix=256)  # fmt: skip
    return run_bench(tiny_model_dir, options)


def test_every_requested_backend_is_timed_or_skipped_with_a_reason(result: BenchResult) -> None:
    configs = {(e.size, e.proposals) for e in result.entries}
    assert configs == {(64, 10), (64, 5)}
    for size, proposals in configs:
        for backend in BACKENDS:
            found = [e for e in result.entries if (e.backend, e.size, e.proposals) == (backend, size, proposals)]
            assert {e.graph for e in found} == {"panoptic", "raw"}, (backend, size, proposals)
            for e in found:
                assert e.status == STATUS_OK or e.reason, e
    for e in result.entries:
        if e.backend in ("torch", "ort"):
            assert e.status == STATUS_OK, e.reason
    trt = [e for e in result.entries if e.backend == "tensorrt"]
    assert all(e.status == STATUS_SKIPPED and e.reason for e in trt)


def test_statistics_agree_with_the_samples(result: BenchResult) -> None:
    for e in result.entries:
        if not e.ok:
            continue
        stats = e.latency_ms
        assert stats is not None and stats.n == RUNS == len(e.samples_ms)
        assert stats.p90 >= stats.median >= stats.min > 0
        assert stats.max >= stats.p99 >= stats.p90
        assert math.isclose(stats.median, statistics.median(e.samples_ms), rel_tol=1e-9)
        assert math.isclose(stats.p90, float(np.percentile(e.samples_ms, 90)), rel_tol=1e-6)
        assert math.isclose(stats.mean, float(np.mean(e.samples_ms)), rel_tol=1e-6)
        assert math.isclose(stats.std, float(np.std(e.samples_ms)), rel_tol=1e-6, abs_tol=1e-9)


def test_speedups_are_ratios_of_medians_in_the_same_group(result: BenchResult) -> None:
    checked = 0
    for e in result.entries:
        if not e.ok:
            assert e.speedup_vs_torch is None
            continue
        ref = result.find("torch", e.graph, e.size, e.proposals, e.threads)
        assert ref is not None
        assert math.isclose(e.speedup_vs_torch, ref.median_ms / e.median_ms, rel_tol=1e-3)
        checked += 1
    assert checked >= 8


def test_floor_uses_the_measured_peak_and_the_macs(result: BenchResult) -> None:
    peak = {p["threads"]: p["gflops"] for p in result.peak}
    assert peak[1] > 0
    for e in result.entries:
        assert e.macs["total"] == e.macs["network"] + e.macs["postprocess"] > 0
        assert math.isclose(e.floor_ms, 2 * e.macs["total"] / (peak[e.threads] * 1e9) * 1e3, rel_tol=1e-3)
    fewer = result.find("torch", "panoptic", 64, 5)
    more = result.find("torch", "panoptic", 64, 10)
    assert fewer.macs["postprocess"] < more.macs["postprocess"]


def test_artifacts_memory_and_machine_are_recorded(result: BenchResult, tiny_model_dir: Path) -> None:
    for e in result.entries:
        if e.ok:
            assert Path(e.artifact).exists() and e.artifact_bytes == Path(e.artifact).stat().st_size
            assert e.memory["method"] in ("peak", "rss-growth")
    assert (tiny_model_dir / "variants" / "s64-n5").is_dir()
    machine = result.machine
    assert machine["cpu"] and machine["cores"] >= 1
    assert "onnxruntime" in machine["versions"] and "numpy" in machine["versions"]
    assert result.protocol["runs"] == RUNS and "interleaved" in result.protocol["order"]
    assert result.protocol["burst"] == 5 and "back-to-back" in result.protocol["order"]
    for e in result.entries:  # RUNS < burst: one turn, its first call is the after-pause sample
        if e.ok:
            assert e.after_pause_ms == e.samples_ms[0], e


class _CountingRunner:
    """Records the order of calls; its latency is the call's sequence number (a scheduler test, no runtime)."""

    def __init__(self, name: str, log: list[str], fail_at: int | None = None) -> None:
        self.name, self.log, self.fail_at, self.calls, self.last_latency_s = name, log, fail_at, 0, 0.0

    def infer(self, image: np.ndarray) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("broken")
        self.log.append(self.name)
        self.last_latency_s = len(self.log) / 1e3


def test_turns_are_bursts_of_back_to_back_calls_from_a_rotating_start() -> None:
    from maskconver_deploy.bench import _Slot, time_interleaved
    from maskconver_deploy.results import BenchEntry

    log: list[str] = []
    slots = [_Slot(BenchEntry(n, n, "fp32", "panoptic", 64, 5, 1), _CountingRunner(n, log), np.zeros(1)) for n in "abc"]
    time_interleaved(slots, runs=7, burst=3)
    assert [len(s.samples) for s in slots] == [7, 7, 7]  # 3 + 3 + 1 calls each
    assert "".join(log) == "aaabbbccc" + "bbbcccaaa" + "cab"  # turns of 3, then of the 1 left; start rotates
    assert [s.turn_starts for s in slots] == [[0, 3, 6]] * 3
    one: list[str] = []
    slots = [_Slot(BenchEntry(n, n, "fp32", "panoptic", 64, 5, 1), _CountingRunner(n, one, fail_at=2 if n == "b" else None),
                   np.zeros(1)) for n in "ab"]  # fmt: skip
    time_interleaved(slots, runs=4, burst=1)
    assert "".join(one) == "abaaa" and slots[1].entry.status == "failed" and "broken" in slots[1].entry.reason


def test_ort_profile_shares(result: BenchResult) -> None:
    profiles = [p for p in result.profiles if p.backend == "ort"]
    assert {(p.graph, p.proposals) for p in profiles} == {("panoptic", 10), ("raw", 10), ("panoptic", 5), ("raw", 5)}
    for p in profiles:
        assert math.isclose(sum(o.share for o in p.op_types), 1.0, abs_tol=0.01)
        assert "Conv" in {o.op_type for o in p.op_types}
        assert p.node_ms_per_run > 0


def test_json_round_trip(result: BenchResult, tmp_path: Path) -> None:
    path = result.save(tmp_path / "bench.json")
    again = BenchResult.load(path)
    assert again.to_dict() == json.loads(path.read_text())
    assert again.to_dict() == result.to_dict()
    with pytest.raises(UserError, match="already exists"):
        result.save(path)
    path.write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="not a bench result"):
        BenchResult.load(path)


def test_cli_quick_json_out_and_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "b.json"
    args = ["bench", "--model-dir", str(tiny_model_dir), "--backends", "ort", "--quick", "--threads", "1", "--no-network"]
    done = runner.invoke(app, [*args, "--json-out", str(out)])
    assert done.exit_code == 0, done.output
    data = json.loads(out.read_text())
    assert {e["backend"] for e in data["entries"]} == {"torch", "ort"}
    again = runner.invoke(app, [*args, "--json-out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output
    bad = runner.invoke(app, ["bench", "--model-dir", str(tiny_model_dir), "--backends", "onnx-magic"])
    assert bad.exit_code == 2 and "unknown backend" in bad.output
    missing = runner.invoke(app, ["bench", "--model-dir", str(tmp_path / "nowhere"), "--quick"])
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_plan_and_option_parsing() -> None:
    assert plan_configs((256, 50), None, None, False) == [(256, 50)]
    assert plan_configs((256, 50), [256, 384], [50, 100], False) == [(256, 50), (384, 50), (256, 100)]
    assert plan_configs((256, 50), [256, 384], [50, 100], True) == [(256, 50), (256, 100), (384, 50), (384, 100)]
    assert parse_int_list("256, 384,256", "--sizes") == [256, 384]
    assert parse_int_list(None, "--sizes") is None
    with pytest.raises(UserError, match="--sizes"):
        parse_int_list("256,big", "--sizes")
    with pytest.raises(UserError, match="minimum"):
        parse_int_list("0", "--threads")
    with pytest.raises(ValueError):
        LatencyStats.from_ms([])


def test_memory_probe_sees_an_allocation() -> None:
    with MemoryProbe() as probe:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
        del block
    if probe.result["method"] == "peak":
        assert probe.result["peak_delta_mb"] >= 60
    else:  # no clear_refs: only growth is seen, and freed memory may be gone already
        assert probe.result["rss_delta_mb"] is not None


def test_profile_parser_keeps_only_the_last_runs() -> None:
    events = []
    for run in range(3):
        start = run * 1000
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": 500})
        events.append({"cat": "Node", "name": f"conv_kernel_time", "ts": start + 10, "dur": 100 * (run + 1), "args": {"op_name": "Conv"}})
        events.append({"cat": "Node", "name": "relu_fence_before", "ts": start + 20, "dur": 50, "args": {"op_name": "Relu"}})
        events.append({"cat": "Node", "name": "add_kernel_time", "ts": start + 30, "dur": 100, "args": {"op_name": "Add"}})
    node_ms, run_ms, shares = parse_ort_profile(events, runs=2)
    assert math.isclose(node_ms, ((200 + 300) / 2 + 100) / 1e3)
    assert math.isclose(run_ms, 0.5)
    assert [s.op_type for s in shares] == ["Conv", "Add"]
    assert math.isclose(sum(s.share for s in shares), 1.0)


def test_other_merge_paths_are_exported_and_timed_like_with_like(tiny_model_dir: Path, tmp_path: Path) -> None:
    from maskconver_deploy.modeldir import ModelDir

    options = BenchOptions(backends=["torch", "ort"], threads=[1], warmup=1, runs=3, peak_matrix=256,
                           merges=["input", "feature"])  # fmt: skip
    result = run_bench(tiny_model_dir, options)
    variant = tiny_model_dir / "variants" / "s64-n10-feature"
    assert ModelDir(variant).meta.merge == "feature"  # the other path, exported beside the sizes / counts
    assert result.native_merge == "input" and result.merges() == ["input", "feature"]
    by_key = {(e.backend, e.graph, e.merge): e for e in result.entries}
    assert set(by_key) == {("torch", "panoptic", "input"), ("torch", "raw", "input"), ("ort", "panoptic", "input"),
                           ("ort", "raw", "input"), ("torch", "panoptic", "feature"), ("ort", "panoptic", "feature")}
    for e in result.entries:
        assert e.status == STATUS_OK, e.reason
        assert e.mask_activation == "hard-sigmoid"
    ort, torch_ref = by_key[("ort", "panoptic", "feature")], by_key[("torch", "panoptic", "feature")]
    assert ort.artifact.startswith(str(variant))
    assert ort.speedup_vs_torch == round(torch_ref.median_ms / ort.median_ms, 4)  # against PyTorch of the same path
    assert result.find("ort", "raw", merge="feature") is by_key[("ort", "raw", "input")]  # the raw graph has no merge
    saved = result.save(tmp_path / "bench.json")
    again = BenchResult.load(saved)
    assert [(e.backend, e.merge) for e in again.entries] == [(e.backend, e.merge) for e in result.entries]
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "--model-dir", str(tiny_model_dir), "--merge", "sideways", "--quick"])
    assert bad.exit_code == 2 and "unknown merge path 'sideways'" in bad.output

"""The merge-path trade-off in the report: rows per (backend, merge path), PQ per path, both paths on the plot,
and the per-path targets computed from the run's numbers (each able to fail, "not measured" when a number is
missing). Built from hand-made result records: no runtime is needed to check how the report reads them."""

from __future__ import annotations

import json
from pathlib import Path

from maskconver_deploy.report import check_targets, write_report
from maskconver_deploy.results import BenchEntry, BenchResult, EvalRun, LatencyStats, load_results

N = 50  # the model's own proposal count
PQ_RESULT = {"pq": {"all": {"pq": 40.0, "sq": 80.0, "rq": 50.0}}, "n_images": 3,
             "mask_ap": {"ap": 12.25, "ap50": 30.0, "ap75": 9.0}}


def _e(backend: str, graph: str, proposals: int, ms: float, merge: str = "input") -> BenchEntry:
    family = "torch" if backend == "torch" else backend
    return BenchEntry(backend, family, "fp32", graph, 256, proposals, 2, latency_ms=LatencyStats.from_ms([ms] * 5),
                      merge=merge, mask_activation="hard-sigmoid")  # fmt: skip


def _bench(entries: list[BenchEntry]) -> BenchResult:
    model = {"num_proposals": N, "input_size": [256, 256], "merge": "input", "mask_activation": "hard-sigmoid"}
    return BenchResult("now", "m", model, {}, {}, entries=entries)


def _good() -> list[BenchEntry]:
    """Every target met: feature post 1 of 11 ms (9%), input post 2 ms vs legacy 5 ms, tflite feature 4x torch."""
    out = []
    for name in ("torch", "ort", "tflite"):
        scale = 4.0 if name == "torch" else 1.0
        out += [_e(name, "panoptic", N, 12.0 * scale), _e(name, "raw", N, 10.0 * scale),
                _e(name, "panoptic", N, 11.0 * scale, "feature"),
                _e(name, "panoptic", 100, 12.0 * scale), _e(name, "raw", 100, 10.0 * scale),
                _e(name, "panoptic", 100, 11.0 * scale, "feature"), _e(name, "panoptic", 100, 15.0 * scale, "input-legacy")]  # fmt: skip
    return out


def _line(bench: BenchResult, backend: str, words: str, merge: str):
    (line,) = [t for t in check_targets(bench) if t.subject == backend and words in t.target and t.merge == merge
               and not t.target.startswith("fastest artifact")]  # fmt: skip
    return line


def test_every_merge_path_target_is_measured_and_met() -> None:
    bench = _bench(_good())
    for name in ("ort", "tflite"):
        feature = _line(bench, name, "<= 10% of end to end", "feature")
        assert feature.status == "met" and "9.1%" in feature.detail, feature
        legacy = _line(bench, name, "input-legacy", "input")
        assert legacy.status == "met" and "2.00 ms vs input-legacy 5.00 ms: 0.40x" in legacy.detail, legacy
        speed = _line(bench, name, "PyTorch eager", "feature")
        assert speed.status == "met" and "4.00x" in speed.detail  # against PyTorch of the feature path (44 ms)
    assert _line(bench, "ort", "<= 20% of end to end", "input").status == "met"  # 2 of 12 ms: the input path's own bound


def test_the_merge_path_verdicts_fail_when_the_numbers_miss() -> None:
    entries = _good()
    for e in entries:
        if e.backend == "tflite" and e.graph == "panoptic" and e.merge == "feature":
            e.latency_ms = LatencyStats.from_ms([13.0] * 5)  # post 3 of 13 ms = 23%; 44/13 = 3.4x still
        if e.backend == "ort" and e.merge == "input-legacy":
            e.latency_ms = LatencyStats.from_ms([13.0] * 5)  # legacy post 3 ms: input's 2 ms is 0.67x, not <= 0.5x
        if e.backend == "torch" and e.merge == "feature" and e.proposals == N:
            e.latency_ms = LatencyStats.from_ms([15.0] * 5)  # tflite feature (13 ms, above): 1.15x only
    bench = _bench(entries)
    share = _line(bench, "tflite", "<= 10% of end to end", "feature")
    assert share.status == "missed" and "23.1%" in share.detail
    ratio = _line(bench, "ort", "input-legacy", "input")
    assert ratio.status == "missed" and "0.67x" in ratio.detail
    speed = _line(bench, "tflite", "PyTorch eager", "feature")
    assert speed.status == "missed" and "1.15x" in speed.detail


def test_missing_numbers_are_not_measured_never_met() -> None:
    bench = _bench([e for e in _good() if not (e.backend == "tflite" and e.merge != "input") and e.merge != "input-legacy"])
    assert _line(bench, "tflite", "<= 10% of end to end", "feature").status == "not measured"
    assert _line(bench, "tflite", "PyTorch eager", "feature").status == "not measured"
    for name in ("ort", "tflite"):
        line = _line(bench, name, "input-legacy", "input")
        assert line.status == "not measured" and "input-legacy" in line.detail
    only_input = _bench([e for e in _good() if e.merge == "input"])
    feature = [t for t in check_targets(only_input) if "10%" in t.target]
    assert feature and {t.status for t in feature} == {"not measured"}


def test_old_bench_files_without_merge_load_as_the_input_path(tmp_path: Path) -> None:
    data = _bench(_good()[:2]).to_dict()
    for entry in data["entries"]:
        del entry["merge"], entry["mask_activation"]
    del data["model"]["merge"]
    (tmp_path / "bench.json").write_text(json.dumps(data))
    loaded = BenchResult.load(tmp_path / "bench.json")
    assert {e.merge for e in loaded.entries} == {"input"} and loaded.native_merge == "input"
    assert loaded.find("torch", "panoptic", 256, N, 2) is not None
    assert loaded.find("torch", "panoptic", 256, N, 2, "feature") is None


def test_report_rows_pq_per_path_and_plot(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _bench(_good()).save(results / "bench.json")
    EvalRun.from_result("ort", 256, N, PQ_RESULT, "d", "input", "hard-sigmoid").save(results / "eval" / "ort.json")
    feature = {**PQ_RESULT, "pq": {"all": {"pq": 37.5, "sq": 79.0, "rq": 47.0}}}
    EvalRun.from_result("ort", 256, N, feature, "d", "feature", "hard-sigmoid").save(results / "eval" / "ort@feature.json")
    bundle = load_results(results)
    assert bundle.eval_for("ort", 256, N).pq == 40.0 and bundle.eval_for("ort", 256, N, "feature").pq == 37.5
    written = write_report(results, tmp_path / "out")
    markdown = written["markdown"].read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| ort | input/hard-sigmoid | fp32 | 256 |") for r in rows)
    assert any(r.startswith("| ort | feature/hard-sigmoid | fp32 | 256 |") for r in rows)
    assert any(r.startswith("| tflite | feature/hard-sigmoid | fp32 | 256 |") for r in rows)
    path_row = next(r for r in rows if r.startswith("| ort | feature/hard-sigmoid | 37.50 |"))
    assert "| -2.50 | 12.25 |" in path_row and "| 11.00 |" in path_row  # ΔPQ vs the input path, mask AP, latency
    main_row = next(r for r in rows if r.startswith("| ort | input/hard-sigmoid | fp32 | 256 |"))
    assert "| 40.00 | 0.00 | 12.25 |" in main_row or "| 40.00 | - | 12.25 |" in main_row, main_row  # PQ, ΔPQ, mask AP
    assert "By merge path" in markdown and "one marker per merge path (input, feature)" in markdown
    assert (tmp_path / "out" / "plots" / "pq_vs_latency.png").is_file()
    assert "| input path: post-processing time <= 0.5 x input-legacy's" in markdown


def test_the_fastest_artifact_target_needs_both_speed_ups_and_parity() -> None:
    entries = _good() + [_e("torch-compile", "panoptic", N, 30.0, "feature")]
    verdicts = {("tflite", "feature"): "pass"}
    bench = _bench(entries)

    def fastest(parity):
        (line,) = [t for t in check_targets(bench, parity) if t.target.startswith("fastest artifact")]
        return line

    # ort and tflite tie at 11 ms on the feature path; the first of them is the fastest: 4.00x eager, 2.73x compiled
    line = fastest(lambda b, m: verdicts.get((b, m)))
    assert line.subject in ("ort", "tflite") and line.merge == "feature"
    for e in entries:
        if e.backend == "tflite" and e.merge == "feature" and e.graph == "panoptic" and e.proposals == N:
            e.latency_ms = LatencyStats.from_ms([8.0] * 5)  # 44 / 8 = 5.5x eager, 30 / 8 = 3.75x compiled
    line = fastest(lambda b, m: verdicts.get((b, m)))
    assert (line.subject, line.status) == ("tflite", "met") and "5.50x" in line.detail and "3.75x" in line.detail
    assert fastest(lambda b, m: "fail").status == "missed"  # fast but not equal to the reference
    assert fastest(None).status == "not measured"  # parity unknown: no verdict on speed alone
    for e in entries:
        if e.backend == "torch-compile":
            e.latency_ms = LatencyStats.from_ms([20.0] * 5)  # 2.5x compiled: missed, with the bound
    line = fastest(lambda b, m: verdicts.get((b, m)))
    assert line.status == "missed" and "needs <= 6.67 ms against torch.compile" in line.detail

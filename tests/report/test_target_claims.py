"""The report states only what its run measured: a negative post-processing share is "not measurable", and each
known cause of a missed target is shown as checked, contradicted or not checked by the run's own numbers."""

from __future__ import annotations

from maskconver_deploy.report import check_targets
from maskconver_deploy.results import BenchEntry, BenchResult, LatencyStats, OpShare, ProfileResult


def _entry(backend: str, graph: str, proposals: int, ms: float, precision: str = "fp32") -> BenchEntry:
    family = backend.replace("-int8-static", "").replace("-int8-dynamic", "")
    return BenchEntry(backend, family, precision, graph, 256, proposals, 2, latency_ms=LatencyStats.from_ms([ms] * 5))


def _profile(backend: str, proposals: int, ops: dict[str, float]) -> ProfileResult:
    total = sum(ops.values())
    shares = [OpShare(op, ms, ms / total, 1) for op, ms in ops.items()]
    return ProfileResult(backend=backend, graph="panoptic", size=256, proposals=proposals, threads=2, runs=5,
                         node_ms_per_run=total, run_ms_per_run=None, op_types=shares)  # fmt: skip


def _bench(entries: list[BenchEntry], profiles: list[ProfileResult] | None = None) -> BenchResult:
    return BenchResult("now", "m", {"num_proposals": 50, "input_size": [256, 256]}, {}, {}, entries=entries,
                       profiles=profiles or [])  # fmt: skip


def _lines(bench: BenchResult, backend: str, words: str):
    return [t for t in check_targets(bench) if t.subject == backend and words in t.target]


def test_a_negative_post_processing_share_is_not_measurable() -> None:
    bench = _bench([_entry("torch", "panoptic", 50, 50.0), _entry("ort", "panoptic", 100, 20.0),
                    _entry("ort", "raw", 100, 21.0)])  # fmt: skip
    (line,) = _lines(bench, "ort", "fused post-processing")
    assert line.status == "not measured" and "not measurable in this run" in line.detail
    bench.entries[2] = _entry("ort", "raw", 100, 19.0)  # now the share is 5%: measured, and met
    (line,) = _lines(bench, "ort", "fused post-processing")
    assert line.status == "met"


def test_a_known_cause_is_shown_only_as_far_as_the_run_supports_it() -> None:
    parent = _profile("ort", 50, {"Conv": 10.0, "Resize": 2.0})
    static = _entry("ort-int8-static", "panoptic", 50, 22.0, "int8-static")
    entries = [_entry("torch", "panoptic", 50, 50.0), _entry("ort", "panoptic", 50, 20.0), static]
    supported = _bench(entries, [parent, _profile("ort-int8-static", 50, {"QLinearConv": 6.0, "QuantizeLinear": 2.5,
                                                                            "DequantizeLinear": 2.5, "Resize": 2.0})])
    (line,) = _lines(supported, "ort-int8-static", "int8")
    assert line.status == "missed" and any(w.startswith("why:") and "checked in this run" in w for w in line.where)
    contradicted = _bench(entries, [parent, _profile("ort-int8-static", 50, {"QLinearConv": 6.0, "QuantizeLinear": 0.5,
                                                                               "Resize": 2.0})])
    (line,) = _lines(contradicted, "ort-int8-static", "int8")
    assert any("not supported by this run's numbers" in w for w in line.where)
    assert not any(w.startswith("why:") for w in line.where)
    unprofiled = _bench(entries)
    (line,) = _lines(unprofiled, "ort-int8-static", "int8")
    assert any(w.startswith("known cause, not checked in this run") for w in line.where)

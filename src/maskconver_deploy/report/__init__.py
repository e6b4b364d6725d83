"""`maskconver report`: a results folder -> report.md + a self-contained report.html + plots/*.png.

Reads only result files (`maskconver_deploy.results`); never imports the model or a backend. The document is
built once as blocks (`report.markdown`) and rendered twice, so the two files say the same thing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import atomic_path, write_bytes
from maskconver_deploy.report.markdown import Block, Bullets, Heading, Image, ImageRow, Para, Table, render_markdown
from maskconver_deploy.results import (
    SPAN_END_TO_END,
    LEGACY_MERGE,
    SPAN_NETWORK,
    STATUS_OK,
    BenchEntry,
    BenchResult,
    ResultsBundle,
    load_results,
)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS = "plots"

# Performance targets (issue: at 256x256, 2 threads, the shipped model).
TARGET_SIZE = 256
TARGET_THREADS = 2
TARGET_SPEEDUP = 2.0
TARGET_POST_SHARE = 0.20
TARGET_POST_PROPOSALS = 100
# merge paths (model/postprocess.py) with their own post-processing share target; others take TARGET_POST_SHARE
TARGET_POST_SHARE_BY_MERGE = {"feature": 0.10}
FEATURE_MERGE = "feature"
PATH_TARGET_BACKENDS = ("ort", "tflite")  # the merge-path targets name these two (issue 12)
TARGET_LEGACY_RATIO = 0.5  # input path's post-processing time <= half of input-legacy's, same run
TARGET_FASTEST_VS_EAGER = 5.0  # the fastest artifact against PyTorch eager of its merge path (issue 13) ...
TARGET_FASTEST_VS_COMPILE = 3.0  # ... and against torch.compile of it, passing parity
REFERENCE = "torch"
INT8_PRECISIONS = ("int8-dynamic", "int8-static", "int8")

# The paper's numbers (MaskConver, MobileNet-MH on COCO panoptic val; Tables 1-3). Reference only: never mixed
# into the measured tables.
PAPER_TABLE_1 = [
    ["640", "3.99M", "9.53B", "37.2", "Pixel 6 CPU 244.5 ms (model only)"],
    ["256", "3.99M", "1.54B", "29.7", "Pixel 6 CPU 33.49 ms (model only)"],
]
PAPER_TABLE_2 = [
    ["256", "1.54B", "29.7", "17.12", "10.48", "46.9", "33.2"],
    ["384", "3.37B", "33.8", "18.14", "14.62", "117.1", "66.8"],
    ["640", "9.58B", "37.2", "24.93", "24.93", "347.9", "172.1"],
]
PAPER_TABLE_3 = [
    ["100", "1.57B", "29.9", "11.53", "66.8", "46.9"],
    ["50", "1.55B", "29.7", "10.48", "46.9", "33.2"],
    ["20", "1.54B", "29.6", "9.41", "40.7", "31.2"],
    ["15", "1.53B", "29.2", "8.9", "39.9", "29.3"],
    ["10", "1.53B", "27.1", "8.61", "36.6", "27.9"],
]


@dataclass
class TargetLine:
    """One checked performance target for one backend (or pair)."""

    target: str
    subject: str
    status: str  # "met", "missed", "not measured"
    detail: str
    where: list[str] = field(default_factory=list)  # where the time goes, for a miss
    merge: str = ""  # the merge path the line is about ("": the model folder's own)


# ---------------------------------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    text = text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.00"
    return f"{text}{suffix}"


def _threads(value: int | None) -> str:
    return "default" if value is None else str(value)


def _load(values: Any) -> str:
    return " ".join(str(v) for v in values) if isinstance(values, list) and values else "-"


def _mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.2f}"


def _order(bench: BenchResult) -> dict[str, int]:
    return {name: index for index, name in enumerate(bench.backends())}


# ---------------------------------------------------------------------------------------------------------------
# Facts derived from the results
# ---------------------------------------------------------------------------------------------------------------
def model_size(bench: BenchResult) -> int:
    size = bench.model.get("input_size") or [0, 0]
    return int(size[0])


def model_proposals(bench: BenchResult) -> int:
    return int(bench.model.get("num_proposals") or 0)


def reference_pq(bundle: ResultsBundle, size: int | None, proposals: int | None, merge: str | None = None) -> float | None:
    run = bundle.eval_for(REFERENCE, size, proposals, merge)
    return run.pq if run is not None else None


def pq_and_delta(bundle: ResultsBundle, entry: BenchEntry) -> tuple[float | None, float | None]:
    """PQ of this backend at this setting, and its delta against the PyTorch reference (parity's when it has one)."""
    run = bundle.eval_for(entry.backend, entry.size, entry.proposals, entry.merge)
    pq = run.pq if run is not None else None
    delta = None
    native = bundle.bench is not None and (entry.size, entry.proposals) == (model_size(bundle.bench), model_proposals(bundle.bench))
    parity = bundle.parity_for(entry.backend, entry.merge) if native else None
    if parity is not None and parity.delta_pq is not None:
        delta = parity.delta_pq
        if pq is None:
            pq = parity.pq
    elif pq is not None:
        ref = reference_pq(bundle, entry.size, entry.proposals, entry.merge)
        delta = None if ref is None else pq - ref
    return pq, delta


def post_share(e2e: BenchEntry, raw: BenchEntry) -> float:
    """Share of the end-to-end median spent outside the network (resize + merge), from the two graphs' medians."""
    total = e2e.median_ms or 0.0
    return (total - (raw.median_ms or 0.0)) / total if total > 0 else 0.0


def share_text(e2e: BenchEntry, raw: BenchEntry | None) -> str:
    """The post-processing share for a table cell; 'n/a' where the network alone timed slower than end to end."""
    if raw is None:
        return "-"
    share = post_share(e2e, raw)
    return f"{100 * share:.0f}%" if share >= 0 else "n/a"


def _top_ops(bench: BenchResult, entry: BenchEntry, count: int = 5) -> list[str]:
    profile = bench.profile_for(entry.backend, entry.size, entry.proposals, entry.threads, entry.graph, entry.merge)
    if profile is None:
        return []
    ops = sorted(profile.op_types, key=lambda o: o.share, reverse=True)[:count]
    head = f"ONNX Runtime profile of {entry.backend} ({profile.runs} runs, {profile.node_ms_per_run:.2f} ms of node time per run):"
    return [head] + [f"{o.op_type}: {100 * o.share:.1f}% ({o.ms_per_run:.2f} ms/run, {o.nodes} nodes)" for o in ops]


# Why a target is missed, where the cause is a property of the backend and not of one run (README "Backends").
# Each text is shown only with the check of it on the run's own numbers (`CAUSE_CHECKS`): "checked in this run"
# with the evidence, "not supported by this run" when the numbers say otherwise, or "known cause, not checked in
# this run" when the run lacks what the check needs (a profile, a network-alone timing).
KNOWN_CAUSES: dict[str, str] = {
    "ort-mobile": "converted for ARM (Fixed style, --target_platform arm), so the x86 NCHWc convolution "
                  "kernels are not in it (FusedConv instead of NCHWc Conv); says nothing about a phone",
    "tflite": "XNNPACK runs the network about as fast as ONNX Runtime; the post-processing (resize, argmax, gather "
              "over N x H x W) runs on TFLite's builtin kernels, not XNNPACK, and is slower",
    "ort-int8-dynamic": "weight-only int8, folded back to float when the session opens: it runs the fp32 kernels "
                        "(its profile's node time matches the parent's), so it is a size option (3x smaller), not a "
                        "speed one",
    "ort-int8-static": "QLinearConv is faster than float Conv, but the QuantizeLinear/DequantizeLinear pairs around "
                       "the float post-processing and the QLinearAdd/QLinearMul of the residuals take the gain back",
    "ort-mobile-int8-static": "as ort-int8-static: the quantise/dequantise pairs and QLinearAdd/QLinearMul take back "
                              "what QLinearConv gains",
    "tflite-int8-dynamic": "dynamic-range int8 (int8 weights, activations quantised on the fly inside each op) runs "
                           "on kernels far slower here than XNNPACK's float ones (network alone slower than fp32's)",
}
POST_CAUSE = ("the merge runs at the input resolution over every proposal (mask logits resized to N x H x W, "
              "activation, threshold, argmax over N, area sums), so its cost grows with N while the network's does not")
NCHWC_OPS = ("ReorderInput", "ReorderOutput")  # ONNX Runtime's NCHWc layout transforms: present when NCHWc is used
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearAdd", "QLinearMul")
Check = tuple[bool | None, str]  # (holds? None = cannot be checked with these results, evidence)


def _op_ms(profile: Any, *names: str) -> float:
    return sum(o.ms_per_run for o in profile.op_types if o.op_type in names)


def _profiles(bench: BenchResult, entry: BenchEntry, other: str) -> tuple[Any, Any]:
    return (bench.profile_for(entry.backend, entry.size, entry.proposals, entry.threads),
            bench.profile_for(other, entry.size, entry.proposals, entry.threads))  # fmt: skip


def _check_ort_mobile(bench: BenchResult, entry: BenchEntry) -> Check:
    mine, ort = _profiles(bench, entry, "ort")
    if mine is None or ort is None:
        return None, "needs ONNX Runtime profiles of ort-mobile and ort (bench --profile)"
    fused, reorders, ort_reorders = _op_ms(mine, "FusedConv"), _op_ms(mine, *NCHWC_OPS), _op_ms(ort, *NCHWC_OPS)
    evidence = (f"ort-mobile's profile: FusedConv {fused:.2f} ms/run, NCHWc reorders {reorders:.2f} ms/run; "
                f"ort's: NCHWc reorders {ort_reorders:.2f} ms/run")  # fmt: skip
    return (fused > 0 and reorders == 0 and ort_reorders > 0), evidence


def _raw_pair(bench: BenchResult, entry: BenchEntry, other: str) -> tuple[BenchEntry | None, BenchEntry | None, BenchEntry | None]:
    raw = bench.find(entry.backend, "raw", entry.size, entry.proposals, entry.threads, entry.merge)
    other_e2e = bench.find(other, "panoptic", entry.size, entry.proposals, entry.threads, entry.merge)
    other_raw = bench.find(other, "raw", entry.size, entry.proposals, entry.threads, entry.merge)
    return raw, other_e2e, other_raw


def _check_tflite(bench: BenchResult, entry: BenchEntry) -> Check:
    raw, ort, ort_raw = _raw_pair(bench, entry, "ort")
    if raw is None or ort is None or ort_raw is None:
        return None, "needs network-alone and end-to-end timings of tflite and ort in the same run"
    post, ort_post = entry.median_ms - raw.median_ms, ort.median_ms - ort_raw.median_ms
    ratio = raw.median_ms / ort_raw.median_ms
    evidence = (f"network alone {raw.median_ms:.2f} ms vs ort {ort_raw.median_ms:.2f} ms ({ratio:.2f}x); "
                f"post-processing {post:.2f} ms vs ort {ort_post:.2f} ms")  # fmt: skip
    return (ratio <= 1.25 and post > ort_post), evidence


def _check_int8_dynamic(bench: BenchResult, entry: BenchEntry) -> Check:
    mine, parent = _profiles(bench, entry, entry.family)
    if mine is None or parent is None:
        return None, f"needs ONNX Runtime profiles of {entry.backend} and {entry.family} (bench --profile)"
    ratio = mine.node_ms_per_run / parent.node_ms_per_run if parent.node_ms_per_run else float("inf")
    evidence = f"node time {mine.node_ms_per_run:.2f} ms/run vs the parent's {parent.node_ms_per_run:.2f} ({ratio:.2f}x)"
    return abs(ratio - 1.0) <= 0.10, evidence


def _check_int8_static(bench: BenchResult, entry: BenchEntry) -> Check:
    mine, parent = _profiles(bench, entry, entry.family)
    if mine is None or parent is None:
        return None, f"needs ONNX Runtime profiles of {entry.backend} and {entry.family} (bench --profile)"
    qconv, conv, qdq = _op_ms(mine, "QLinearConv"), _op_ms(parent, "Conv", "FusedConv"), _op_ms(mine, *QDQ_OPS)
    evidence = (f"QLinearConv {qconv:.2f} ms/run vs the parent's Conv {conv:.2f}; quantise/dequantise and "
                f"QLinearAdd/Mul {qdq:.2f} ms/run")  # fmt: skip
    return (qconv < conv and qdq >= conv - qconv), evidence


def _check_tflite_int8_dynamic(bench: BenchResult, entry: BenchEntry) -> Check:
    raw, _, parent_raw = _raw_pair(bench, entry, entry.family)
    if raw is None or parent_raw is None:
        return None, f"needs network-alone timings of {entry.backend} and {entry.family} in the same run"
    evidence = f"network alone {raw.median_ms:.2f} ms vs {entry.family}'s {parent_raw.median_ms:.2f} ms"
    return raw.median_ms > parent_raw.median_ms, evidence


CAUSE_CHECKS = {"ort-mobile": _check_ort_mobile, "tflite": _check_tflite, "ort-int8-dynamic": _check_int8_dynamic,
                "ort-int8-static": _check_int8_static, "ort-mobile-int8-static": _check_int8_static,
                "tflite-int8-dynamic": _check_tflite_int8_dynamic}  # fmt: skip


def _check_post(bench: BenchResult, entry: BenchEntry) -> Check:
    """Does the post-processing time grow with N while the network's stays? Needs two proposal counts."""
    native = model_proposals(bench)
    if entry.proposals == native:
        return None, "needs timings at two proposal counts"
    times = []
    for n in (native, entry.proposals):
        e2e = bench.find(entry.backend, "panoptic", entry.size, n, entry.threads)
        raw = bench.find(entry.backend, "raw", entry.size, n, entry.threads)
        if e2e is None or raw is None:
            return None, f"needs end-to-end and network-alone timings of {entry.backend} at N={native} and N={entry.proposals}"
        times.append((e2e.median_ms - raw.median_ms, raw.median_ms))
    (post_a, net_a), (post_b, net_b) = times
    evidence = (f"post-processing {post_a:.2f} ms at N={native} -> {post_b:.2f} ms at N={entry.proposals}; network "
                f"alone {net_a:.2f} -> {net_b:.2f} ms")  # fmt: skip
    grows = (post_b - post_a) * (entry.proposals - native) > 0
    return grows and abs(post_b - post_a) > abs(net_b - net_a), evidence


def _explained(text: str, check: Check) -> str:
    holds, evidence = check
    if holds is None:
        return f"known cause, not checked in this run: {text} ({evidence})"
    if holds:
        return f"why: {text} (checked in this run: {evidence})"
    return f"known cause, not supported by this run's numbers ({evidence}): {text}"


def _cause(bench: BenchResult, entry: BenchEntry) -> list[str]:
    text, check = KNOWN_CAUSES.get(entry.backend), CAUSE_CHECKS.get(entry.backend)
    if text is None:
        return []
    return [_explained(text, check(bench, entry) if check else (None, "no check of it is defined"))]


def _where(bench: BenchResult, entry: BenchEntry) -> list[str]:
    """Where the time of `entry` goes: its ORT profile, else the network/post-processing split, else a hint."""
    lines = _top_ops(bench, entry)
    raw = bench.find(entry.backend, "raw", entry.size, entry.proposals, entry.threads, entry.merge)
    if raw is not None and entry.graph == "panoptic":
        lines.append(
            f"network alone {raw.median_ms:.2f} ms, post-processing {entry.median_ms - raw.median_ms:.2f} ms "
            f"({100 * post_share(entry, raw):.0f}% of end to end)"
        )
    if not lines:
        lines.append("no profile of this backend in these results (ONNX Runtime backends: `maskconver bench --profile`)")
    return lines


def _target_config(bench: BenchResult) -> tuple[int, int | None, bool]:
    """(size, threads, threads_measured) the targets are checked at."""
    sizes = {e.size for e in bench.entries if e.ok}
    size = TARGET_SIZE if TARGET_SIZE in sizes else model_size(bench)
    measured = any(e.ok and e.threads == TARGET_THREADS for e in bench.entries)
    return size, TARGET_THREADS, measured


def _path_text(bench: BenchResult, merge: str) -> str:
    return f"{merge} path" + (" (the model folder's own)" if merge == bench.native_merge else "")


def check_targets(bench: BenchResult, parity: Callable[[str, str], str | None] | None = None) -> list[TargetLine]:
    """The performance targets, one line per (backend, merge path), each met / missed by how much / not measured.

    Every number comes from this run's timings: speed-ups against PyTorch eager of the same merge path, the
    post-processing share per path (end to end minus the network alone, at 100 proposals), and the `input` path's
    post-processing time against `input-legacy`'s (the same answer in the earlier formulation). `parity(backend,
    merge)`: the parity verdict of an artifact ("pass", "fail", ...; None: not checked), which the fastest-artifact
    target needs as well."""
    size, threads, measured = _target_config(bench)
    native_n = model_proposals(bench)
    lines: list[TargetLine] = []
    merges = [m for m in bench.merges() if m != LEGACY_MERGE] or [bench.native_merge]
    t1 = f"every deployed fp32 backend >= {TARGET_SPEEDUP:.0f}x faster end to end than PyTorch eager (same merge path)"
    t3 = "each int8 variant faster than its fp32 parent"
    t4 = (f"input path: post-processing time <= {TARGET_LEGACY_RATIO:g} x input-legacy's, at "
          f"{TARGET_POST_PROPOSALS} proposals, same run")  # fmt: skip

    def t2(merge: str) -> str:
        share = TARGET_POST_SHARE_BY_MERGE.get(merge, TARGET_POST_SHARE)
        return f"fused post-processing <= {100 * share:.0f}% of end to end at {TARGET_POST_PROPOSALS} proposals ({merge} path)"

    if not measured:
        for target in (t1, *(t2(m) for m in dict.fromkeys([*merges, FEATURE_MERGE])), t3, t4):
            lines.append(TargetLine(target, "all", "not measured", f"no timings at {TARGET_THREADS} threads in these results"))
        return lines
    entries = [e for e in bench.entries if e.size == size and e.threads == threads]

    # 1. speed-up of deployed fp32 backends, per merge path, against PyTorch eager of the same path
    fp32 = [e for e in entries if e.graph == "panoptic" and e.proposals == native_n and e.precision == "fp32"
            and not e.family.startswith("torch") and e.merge != LEGACY_MERGE]  # fmt: skip
    if not fp32:
        lines.append(TargetLine(t1, "-", "not measured", "no deployed fp32 backend in these results"))
    for e in fp32:
        ref = bench.find(REFERENCE, "panoptic", size, native_n, threads, e.merge)
        if not e.ok:
            lines.append(TargetLine(t1, e.backend, "not measured", f"{e.status}: {e.reason}", merge=e.merge))
            continue
        if ref is None:
            lines.append(TargetLine(t1, e.backend, "not measured",
                                    f"PyTorch eager of the {e.merge} path was not timed in the same run", merge=e.merge))
            continue
        speedup = ref.median_ms / e.median_ms
        need = ref.median_ms / TARGET_SPEEDUP
        base = f"{speedup:.2f}x (PyTorch {ref.median_ms:.2f} ms -> {e.median_ms:.2f} ms, {e.merge} path)"
        if speedup >= TARGET_SPEEDUP:
            lines.append(TargetLine(t1, e.backend, "met", f"{base}; margin {e.median_ms - need:+.2f} ms vs the {need:.2f} ms bound",
                                    merge=e.merge))  # fmt: skip
        else:
            detail = (f"{base}; missed by {TARGET_SPEEDUP - speedup:.2f}x: needs <= {need:.2f} ms, "
                      f"{e.median_ms - need:.2f} ms ({100 * (e.median_ms / need - 1):.0f}%) too slow")  # fmt: skip
            lines.append(TargetLine(t1, e.backend, "missed", detail, _where(bench, e) + _cause(bench, e), merge=e.merge))
    if not any(e.backend == "tflite" and e.merge == FEATURE_MERGE for e in fp32):  # named by the issue: never silent
        lines.append(TargetLine(t1, "tflite", "not measured", f"tflite was not timed on the {FEATURE_MERGE} path at "
                                f"N={native_n}, {size}px, {threads} threads in these results", merge=FEATURE_MERGE))

    # 2. post-processing share at 100 proposals, per merge path (the feature path's bound is its own)
    for merge in dict.fromkeys([*merges, FEATURE_MERGE]):
        target = t2(merge)
        bound = TARGET_POST_SHARE_BY_MERGE.get(merge, TARGET_POST_SHARE)
        pan = [e for e in entries if e.graph == "panoptic" and e.proposals == TARGET_POST_PROPOSALS and e.ok and e.merge == merge]
        if not pan:
            lines.append(TargetLine(target, "-", "not measured", f"no end-to-end timings of the {merge} path at "
                                    f"{TARGET_POST_PROPOSALS} proposals, size {size}", merge=merge))  # fmt: skip
        if merge == FEATURE_MERGE:
            for name in PATH_TARGET_BACKENDS:
                if pan and not any(e.backend == name for e in pan):
                    lines.append(TargetLine(target, name, "not measured", f"{name} was not timed on the {merge} path "
                                            f"at {TARGET_POST_PROPOSALS} proposals", merge=merge))  # fmt: skip
        for e in pan:
            raw = bench.find(e.backend, "raw", size, TARGET_POST_PROPOSALS, threads, merge)
            if raw is None:
                lines.append(TargetLine(target, e.backend, "not measured", "no network-alone (raw graph) timing to split against",
                                        merge=merge))  # fmt: skip
                continue
            share = post_share(e, raw)
            base = f"{100 * share:.1f}% ({e.median_ms - raw.median_ms:.2f} ms of {e.median_ms:.2f} ms, {merge} path)"
            if share < 0:  # the network alone timed slower than the whole graph: noise larger than the share
                lines.append(TargetLine(target, e.backend, "not measured", f"not measurable in this run: the network alone "
                                        f"({raw.median_ms:.2f} ms) timed slower than end to end ({e.median_ms:.2f} ms)",
                                        merge=merge))  # fmt: skip
                continue
            if share <= bound:
                lines.append(TargetLine(target, e.backend, "met", base, merge=merge))
            else:
                over = 100 * (share - bound)
                allowed = bound / (1 - bound) * raw.median_ms
                detail = (f"{base}; missed by {over:.1f} percentage points: post-processing must fall to "
                          f"<= {allowed:.2f} ms at this network time")  # fmt: skip
                where = _where(bench, e) + ([_explained(POST_CAUSE, _check_post(bench, e))] if merge != FEATURE_MERGE else [])
                lines.append(TargetLine(target, e.backend, "missed", detail, where, merge=merge))

    # 3. int8 faster than its fp32 parent (the model folder's own path)
    int8 = [e for e in entries if e.graph == "panoptic" and e.proposals == native_n and e.precision in INT8_PRECISIONS
            and e.merge == bench.native_merge]  # fmt: skip
    if not int8:
        lines.append(TargetLine(t3, "-", "not measured", "no int8 variant in these results"))
    for e in int8:
        parent = bench.find(e.family, "panoptic", size, native_n, threads)
        if not e.ok:
            lines.append(TargetLine(t3, e.backend, "not measured", f"{e.status}: {e.reason}"))
            continue
        if parent is None:
            lines.append(TargetLine(t3, e.backend, "not measured", f"its fp32 parent {e.family} was not timed in the same run"))
            continue
        ratio = parent.median_ms / e.median_ms
        base = f"{e.median_ms:.2f} ms vs {parent.backend} {parent.median_ms:.2f} ms ({ratio:.2f}x)"
        if e.median_ms < parent.median_ms:
            lines.append(TargetLine(t3, e.backend, "met", base))
        else:
            detail = f"{base}; missed: {e.median_ms - parent.median_ms:.2f} ms ({100 * (e.median_ms / parent.median_ms - 1):.0f}%) slower"
            where = _where(bench, e)
            parent_ops = _top_ops(bench, parent, 3)
            if parent_ops:
                where += ["fp32 parent, for comparison: " + "; ".join(parent_ops[1:])]
            lines.append(TargetLine(t3, e.backend, "missed", detail, where + _cause(bench, e)))

    # 4. the input path's post-processing against input-legacy's, both measured in this run
    lines += _legacy_lines(bench, t4, size, threads)

    # 5. the fastest artifact against both PyTorch baselines of its merge path, and its parity
    lines.append(_fastest_line(bench, entries, native_n, size, threads, parity))
    return lines


def _fastest_line(bench: BenchResult, entries: list[BenchEntry], n: int, size: int, threads: int | None,
                  parity: Callable[[str, str], str | None] | None) -> TargetLine:  # fmt: skip
    target = (f"fastest artifact >= {TARGET_FASTEST_VS_EAGER:g}x PyTorch eager and >= {TARGET_FASTEST_VS_COMPILE:g}x "
              "torch.compile end to end (same merge path), passing parity")  # fmt: skip
    deployed = [e for e in entries if e.ok and e.graph == "panoptic" and e.proposals == n
                and not e.family.startswith("torch") and e.merge != LEGACY_MERGE]  # fmt: skip
    if not deployed:
        return TargetLine(target, "-", "not measured", "no deployed artifact timed in these results")
    best = min(deployed, key=lambda e: e.median_ms)
    eager = bench.find(REFERENCE, "panoptic", size, n, threads, best.merge)
    compiled = bench.find("torch-compile", "panoptic", size, n, threads, best.merge)
    if eager is None or compiled is None:
        missing = "PyTorch eager" if eager is None else "torch-compile"
        return TargetLine(target, best.backend, "not measured", f"{missing} of the {best.merge} path was not timed in "
                          "the same run", merge=best.merge)  # fmt: skip
    vs_eager, vs_compiled = eager.median_ms / best.median_ms, compiled.median_ms / best.median_ms
    verdict = parity(best.backend, best.merge) if parity is not None else None
    detail = (f"{best.backend} ({best.precision}, {best.merge} path) {best.median_ms:.2f} ms: {vs_eager:.2f}x PyTorch "
              f"eager ({eager.median_ms:.2f} ms), {vs_compiled:.2f}x torch.compile ({compiled.median_ms:.2f} ms); "
              f"parity {verdict or 'not checked in these results'}")  # fmt: skip
    if verdict is None:
        return TargetLine(target, best.backend, "not measured", detail, merge=best.merge)
    short = []
    if vs_eager < TARGET_FASTEST_VS_EAGER:
        short.append(f"needs <= {eager.median_ms / TARGET_FASTEST_VS_EAGER:.2f} ms against eager")
    if vs_compiled < TARGET_FASTEST_VS_COMPILE:
        short.append(f"needs <= {compiled.median_ms / TARGET_FASTEST_VS_COMPILE:.2f} ms against torch.compile")
    if verdict != "pass":
        short.append(f"its parity verdict is {verdict}")
    if short:
        return TargetLine(target, best.backend, "missed", f"{detail}; missed: " + "; ".join(short), merge=best.merge)
    return TargetLine(target, best.backend, "met", detail, merge=best.merge)


def post_ms(bench: BenchResult, backend: str, size: int, proposals: int, threads: int | None, merge: str) -> tuple[float | None, str]:
    """(post-processing ms = end to end - network alone, '' or why it is not measured) of one path."""
    e2e = bench.find(backend, "panoptic", size, proposals, threads, merge)
    raw = bench.find(backend, "raw", size, proposals, threads, merge)
    if e2e is None:
        return None, f"no end-to-end timing of {backend} on the {merge} path"
    if raw is None:
        return None, f"no network-alone timing of {backend} to split against"
    return e2e.median_ms - raw.median_ms, ""


def _legacy_lines(bench: BenchResult, target: str, size: int, threads: int | None) -> list[TargetLine]:
    n = TARGET_POST_PROPOSALS
    names = list(PATH_TARGET_BACKENDS)
    names += [e.backend for e in bench.entries if e.merge == LEGACY_MERGE and not e.family.startswith("torch")
              and e.backend not in names]  # fmt: skip
    lines = []
    for name in names:
        new, why_new = post_ms(bench, name, size, n, threads, "input")
        old, why_old = post_ms(bench, name, size, n, threads, LEGACY_MERGE)
        if new is None or old is None:
            lines.append(TargetLine(target, name, "not measured", why_new or why_old, merge="input"))
            continue
        if old <= 0 or new < 0:
            lines.append(TargetLine(target, name, "not measured", f"not measurable in this run: post-processing "
                                    f"{new:.2f} ms (input) and {old:.2f} ms (input-legacy) from end to end - network "
                                    "alone", merge="input"))  # fmt: skip
            continue
        ratio = new / old
        base = f"{new:.2f} ms vs input-legacy {old:.2f} ms: {ratio:.2f}x ({old / new if new else float('inf'):.1f}x faster)"
        if ratio <= TARGET_LEGACY_RATIO:
            lines.append(TargetLine(target, name, "met", base, merge="input"))
        else:
            detail = f"{base}; missed: must be <= {TARGET_LEGACY_RATIO * old:.2f} ms, {new - TARGET_LEGACY_RATIO * old:.2f} ms over"
            e2e = bench.find(name, "panoptic", size, n, threads, "input")
            lines.append(TargetLine(target, name, "missed", detail, _where(bench, e2e) if e2e else [], merge="input"))
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------
def _machine_section(bench: BenchResult) -> list[Block]:
    m = bench.machine
    versions = m.get("versions") or {}
    peak = ", ".join(f"{_threads(p.get('threads'))} thr: {p['gflops']:.1f} GFLOP/s" for p in bench.peak) or "-"
    rows = [
        ["CPU", str(m.get("cpu", "-"))],
        ["cores (logical / usable by this process)", f"{m.get('cores', '-')} / {m.get('cores_usable', '-')}"],
        ["CPU flags of note", ", ".join(m.get("cpu_flags") or []) or "-"],
        ["memory", f"{m.get('memory_gb', '-')} GB"],
        ["platform", str(m.get("platform", "-"))],
        ["Python", str(m.get("python", "-"))],
        ["libraries", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "-"],
        ["thread settings", str(m.get("thread_settings", "-"))],
        ["load average (1, 5, 15 min) at start / end", f"{_load(m.get('loadavg_start'))} / {_load(m.get('loadavg_end'))}"],
        ["measured float32 matmul peak", f"{peak} ({bench.peak[0].get('method', '') if bench.peak else ''})"],
    ]
    return [Heading(2, "Machine and versions"), Table(["", "value"], rows)]


def _protocol_section(bench: BenchResult) -> list[Block]:
    p = bench.protocol
    items = [
        f"Warm-up {p.get('warmup')} runs per artifact, then {p.get('runs')} timed runs; {p.get('order', '')}.",
        f"Span timed, {SPAN_END_TO_END}.",
        f"Second span, {SPAN_NETWORK}.",
        "Speed-up = median(PyTorch eager) / median(backend), both from this run, same graph, size, proposals and threads.",
        "Floor = the model's multiply-accumulates x 2 / this machine's measured float32 matmul peak at the same "
        "thread count; '% of floor' = floor / median (100% = running at the matmul peak).",
        f"Memory: {p.get('memory_method', '-')}.",
        f"Input: {p.get('image', '-')}. No outlier is removed; median, p90, mean and std are over all timed runs.",
    ]
    if int(p.get("burst") or 1) > 1:
        items.append(f"'after pause ms' = median of the first timed call of each turn (the one after the "
                     f"{p.get('gap_ms', 0):g} ms pause, the other {int(p['burst']) - 1} of the turn run back to back): "
                     "what one frame costs when the runtime's threads have gone idle in between.")
    return [Heading(2, "How it was measured"), Bullets(items)]


def _main_table(bundle: ResultsBundle) -> list[Block]:
    bench = bundle.bench
    assert bench is not None
    native_n = model_proposals(bench)
    params = (bench.model.get("params") or {}).get("total")
    order = _order(bench)
    rows = []
    merge_order = {m: i for i, m in enumerate(bench.merges())}
    entries = [e for e in bench.entries if e.graph == "panoptic" and e.proposals == native_n and e.ok]
    entries.sort(key=lambda e: (e.threads or 0, e.size, merge_order.get(e.merge, 99), order.get(e.backend, 99)))
    for e in entries:
        pq, delta = pq_and_delta(bundle, e)
        run = bundle.eval_for(e.backend, e.size, e.proposals, e.merge)
        native = e.size == model_size(bench)
        parity = bundle.parity_for(e.backend, e.merge) if native else None
        floor = f"{100 * e.floor_ms / e.median_ms:.0f}%" if e.floor_ms and e.median_ms else "-"
        rows.append([
            e.backend, e.path_label, e.precision, f"{e.size}", _threads(e.threads),
            _f(params / 1e6 if params else None, 3), _f(e.macs.get("total", 0) / 1e9 if e.macs else None, 3),
            _f(pq), _f(delta, 2), _f(run.mask_ap if run is not None else None),
            parity.verdict if parity else ("-" if native else "n/a (other size)"),
            _f(e.median_ms), _f(e.latency_ms.p90 if e.latency_ms else None), _f(e.after_pause_ms),
            _f(e.speedup_vs_torch, 2, "x"), _f(e.speedup_vs_torch_compile, 2, "x"), floor, _mb(e.artifact_bytes),
            _f(e.memory.get("peak_delta_mb"), 1),
        ])  # fmt: skip
    columns = ["backend", "merge path", "precision", "size", "threads", "params (M)", "MACs (G)", "PQ", "ΔPQ vs ref",
               "mask AP", "parity", "median ms", "p90 ms", "after pause ms", "speed-up vs PyTorch", "vs torch.compile", "% of floor",
               "artifact MB", "peak mem MB"]  # fmt: skip
    if not any(e.after_pause_ms is not None for e in entries):  # one timed call per turn: nothing apart
        at = columns.index("after pause ms")
        columns.pop(at)
        for row in rows:
            row.pop(at)
    caption = (f"End to end at {native_n} proposals (the model's own setting), measured on this machine; one row per "
               f"(backend, merge path); speed-ups and ΔPQ against PyTorch of the same merge path; mask AP: COCO mask AP "
               f"of the thing classes (pycocotools COCOeval, segm) from the same evaluation pass as PQ")  # fmt: skip
    blocks: list[Block] = [Heading(2, "Results: backend x merge path x precision x size"),
                           Table(columns, rows, caption, status_column="parity")]  # fmt: skip
    skipped = [e for e in bench.entries if not e.ok]
    if skipped:
        seen: set[tuple[str, str, str]] = set()
        srows = []
        for e in skipped:
            key = (e.backend, e.status, e.reason)
            if key in seen:
                continue
            seen.add(key)
            srows.append([e.backend, e.merge, e.graph, e.status, e.reason or "-", e.hint or "-"])
        blocks.append(Table(["backend", "merge path", "graph", "status", "reason", "how to get it"], srows, "Not timed",
                            status_column="status"))  # fmt: skip
    return blocks


def path_pq_rows(bundle: ResultsBundle) -> list[list[str]]:
    """PQ of each merge path per backend evaluated on it (the model's own size and N), with the PQ difference to
    the same backend on the model folder's own path; only what the evaluation files hold."""
    bench = bundle.bench
    assert bench is not None
    native = bundle.native_merge
    size, n = model_size(bench), model_proposals(bench)
    runs = [r for r in bundle.evals if r.size in (None, size) and r.proposals in (None, n)]
    merges = list(dict.fromkeys([native, *bench.merges(), *(r.merge or native for r in runs)]))
    rows = []
    for run in sorted(runs, key=lambda r: (merges.index(r.merge or native), r.backend)):
        merge = run.merge or native
        own = bundle.eval_for(run.backend, size, n, native)
        delta = None if own is None or merge == native else run.pq - own.pq
        timed = bench.find(run.backend, "panoptic", size, n, "any", merge)
        parity = bundle.parity_for(run.backend, merge)
        rows.append([run.backend, f"{merge}/{run.mask_activation or '-'}" if run.mask_activation else merge, _f(run.pq),
                     _f(run.sq), _f(run.rq), _f(delta), _f(run.mask_ap), parity.verdict if parity else "-",
                     _f(timed.median_ms if timed else None), str(run.n_images)])  # fmt: skip
    return rows


def _paths_section(bundle: ResultsBundle) -> list[Block]:
    bench = bundle.bench
    assert bench is not None
    rows = path_pq_rows(bundle)
    if len({row[1].split("/")[0] for row in rows}) < 2 and len(bench.merges()) < 2:
        return []
    columns = ["backend", "merge path", "PQ", "SQ", "RQ", "ΔPQ vs own path", "mask AP", "parity (vs PyTorch, same path)",
               "end to end ms", "images"]  # fmt: skip
    note = ("PQ of each merge path on the same validation images (`eval`); ΔPQ against the same backend on the model "
            "folder's own path; latency from the bench table above (same run). input-legacy is the input path's "
            "earlier formulation (the same answer), timed only.")  # fmt: skip
    blocks: list[Block] = [Heading(3, "By merge path"), Para(note, kind="note")]
    if rows:
        blocks.append(Table(columns, rows, "PQ per merge path", status_column="parity (vs PyTorch, same path)"))
    else:
        blocks.append(Para("No evaluation of any merge path in these results: PQ not measured."))
    return blocks


def parity_rows(bundle: ResultsBundle) -> list[list[str]]:
    """One row per parity candidate that ran: agreement with the PyTorch reference of its merge path, the merge
    check (the reference merge of the artifact's own raw tensors against its fused answer), ΔPQ and verdict."""
    rows = []
    for row in bundle.parity:
        decision = row.extra.get("decision") or {}
        if not decision:
            continue
        pixels = decision.get("pixels")
        same = decision.get("same_segment")
        differ = f"{int(pixels) - int(same):,} / {int(pixels):,}" if pixels is not None and same is not None else "-"
        check = decision.get("merge_check") or {}
        merged = f"{int(check['pixels_differ']):,}" if check.get("available") else "no raw graph"
        rows.append([row.backend, row.merge or bundle.native_merge, row.precision,
                     _f(decision.get("pixel_agreement"), 5), differ, merged, _f(decision.get("topn_match")),
                     _f(row.delta_pq, 4), row.verdict])  # fmt: skip
    return rows


def _parity_section(bundle: ResultsBundle) -> list[Block]:
    rows = parity_rows(bundle)
    if not rows:
        return []
    note = ("Every artifact against the PyTorch reference of its own merge path, on the same images. Pixels that "
            "differ = pixels in another segment than the reference's. Merge check = pixels where the reference merge "
            "run on the artifact's own raw-graph tensors gives another answer than the artifact's fused "
            "post-processing: 0 means the post-processing is exact, and any remaining difference comes from the "
            "network's rounding; fp32 verdicts require 0.")  # fmt: skip
    columns = ["backend", "merge path", "precision", "same segment %", "pixels that differ", "merge check px differ",
               "top-N match %", "ΔPQ", "verdict"]  # fmt: skip
    return [Heading(2, "Parity"), Para(note, kind="note"),
            Table(columns, rows, "Parity against the PyTorch reference", status_column="verdict")]


def _proposals_table(bundle: ResultsBundle) -> list[Block]:
    bench = bundle.bench
    assert bench is not None
    size = model_size(bench)
    order = _order(bench)
    entries = [e for e in bench.entries if e.graph == "panoptic" and e.size == size and e.ok]
    counts = sorted({e.proposals for e in entries}, reverse=True)
    if len(counts) < 2:
        return []
    rows = []
    merge_order = {m: i for i, m in enumerate(bench.merges())}
    for e in sorted(entries, key=lambda e: (e.threads or 0, merge_order.get(e.merge, 99), order.get(e.backend, 99), -e.proposals)):
        raw = bench.find(e.backend, "raw", e.size, e.proposals, e.threads, e.merge)
        run = bundle.eval_for(e.backend, e.size, e.proposals, e.merge)
        rows.append([
            e.backend, e.merge, str(e.proposals), _threads(e.threads), _f(e.median_ms), _f(raw.median_ms if raw else None),
            share_text(e, raw), _f(run.pq if run else None),
        ])  # fmt: skip
    blocks = [
        Heading(3, f"By number of proposals (size {size})"),
        Table(["backend", "merge path", "N", "threads", "end to end ms", "network alone ms", "post-processing share", "PQ"], rows),
    ]
    if any(cell == "n/a" for row in rows for cell in row):
        blocks.append(Para(
            "n/a: the network-alone median came out above the end-to-end median. The two spans are separate runs of "
            "two graphs, interleaved with the other runtimes of the group (PyTorch's worker threads among them), and "
            "where the post-processing costs a few milliseconds that interference is larger than it. The ONNX Runtime profile (per-op share, below) splits one run's time without that noise."
        ))  # fmt: skip
    return blocks


def _targets_section(bundle: ResultsBundle, lines: list[TargetLine]) -> list[Block]:
    bench = bundle.bench
    assert bench is not None
    size, threads, _ = _target_config(bench)
    checkpoint = bundle.pipeline.checkpoint if bundle.pipeline else bench.model.get("checkpoint", "-")
    intro = (f"Checked at {size}x{size}, {threads} threads, model {bench.model.get('preset', '-')} "
             f"(checkpoint {checkpoint}), from the timings above.")  # fmt: skip
    rows = [[t.target, t.subject, t.merge or bench.native_merge, t.status, t.detail] for t in lines]
    blocks: list[Block] = [Heading(2, "Performance targets"), Para(intro),
                           Table(["target", "backend", "merge path", "status", "detail"], rows, status_column="status")]  # fmt: skip
    misses = [t for t in lines if t.status == "missed" and t.where]
    if misses:
        blocks.append(Heading(3, "Where the time goes (missed targets)"))
        for t in misses:
            blocks.append(Para(f"{t.subject} ({t.merge or bench.native_merge} path) — {t.target}:"))
            blocks.append(Bullets(t.where))
    met = sum(t.status == "met" for t in lines)
    missed = sum(t.status == "missed" for t in lines)
    blocks.append(Para(f"{met} met, {missed} missed, {len(lines) - met - missed} not measured.", kind="note"))
    return blocks


def _paper_section() -> list[Block]:
    note = ("The paper's own numbers (MaskConver with MobileNet-MH on COCO panoptic val, Tables 1-3), for reference "
            "only: another model size (133 classes), other data and other hardware. They are never mixed into the "
            "measured tables above. The paper's 'FLOPs' are multiply-accumulates.")  # fmt: skip
    return [
        Heading(2, "Paper reference (not measured here)"),
        Para(note, kind="note"),
        Table(["input", "params", "MACs", "PQ", "latency"], PAPER_TABLE_1, "Paper Table 1"),
        Table(["input", "MACs", "PQ", "V100 ms (output 640)", "V100 ms (same size)", "Pixel 6 CPU ms", "Pixel 6 GPU ms"],
              PAPER_TABLE_2, "Paper Table 2 (with post-processing)"),  # fmt: skip
        Table(["proposals", "MACs", "PQ", "V100 ms (256)", "Pixel 6 CPU ms", "Pixel 6 GPU ms"], PAPER_TABLE_3,
              "Paper Table 3 (256 input)"),  # fmt: skip
    ]


def _pipeline_section(bundle: ResultsBundle) -> list[Block]:
    record = bundle.pipeline
    if record is None:
        return []
    rows = [[s.get("name", ""), s.get("status", ""), _f(s.get("seconds"), 1), s.get("detail", "")] for s in record.steps]
    brows = [[b.get("backend", ""), b.get("merge") or "-", b.get("status", ""), b.get("reason", "") or "-",
              b.get("hint", "") or "-", _f(b.get("compile_s"), 1)] for b in record.backends]  # fmt: skip
    data = record.data
    items = [
        f"checkpoint {record.checkpoint} (sha256 {record.checkpoint_sha256[:12]}...)",
        f"data {data.get('dir', '-')} split {data.get('split', '-')}, {data.get('n_images', '-')} images"
        + (" (generated for this run)" if data.get("generated") else ""),
        f"total {record.seconds:.0f} s",
    ]
    return [
        Heading(2, "Pipeline run"),
        Bullets(items),
        Table(["step", "status", "seconds", "detail"], rows, status_column="status"),
        Table(["backend", "merge path", "status", "reason", "how to get it", "compile s"], brows, "Backends",
              status_column="status"),  # fmt: skip
        *_failures_blocks(record.failures),
    ]


def _failures_blocks(failures: list[str]) -> list[Block]:
    if not failures:
        return [Para("Nothing failed in this run: every build this machine can do, parity verdict, evaluation and "
                     "timing succeeded.", kind="note")]  # fmt: skip
    return [Para(f"{len(failures)} failure(s) in this run (the command exited 1):", kind="note"), Bullets(failures)]


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------
def _plots(bundle: ResultsBundle, folder: Path) -> list[Block]:
    from maskconver_deploy.report import plots

    bench = bundle.bench
    assert bench is not None
    size, native_n = model_size(bench), model_proposals(bench)
    threads = TARGET_THREADS if any(e.ok and e.threads == TARGET_THREADS for e in bench.entries) else None
    if threads is None:
        counted = [e.threads for e in bench.entries if e.ok]
        threads = counted[0] if counted else None
    tlabel = f"{_threads(threads)} threads"
    blocks: list[Block] = [Heading(2, "Plots")]

    points, paths = [], []
    for e in bench.entries:
        if e.ok and e.graph == "panoptic" and (e.size, e.proposals, e.threads) == (size, native_n, threads):
            pq, _ = pq_and_delta(bundle, e)
            if pq is not None:
                label = e.backend if e.merge == bench.native_merge else f"{e.backend} [{e.merge}]"
                points.append((label, e.median_ms, pq))
                paths.append(e.merge)
    if points:
        plots.pq_vs_latency(points, folder / "pq_vs_latency.png", f"PQ vs latency, {size}x{size}, N={native_n}, {tlabel}",
                            paths=paths)  # fmt: skip
        shown = ", ".join(dict.fromkeys(paths))
        blocks.append(Image(f"{PLOTS}/pq_vs_latency.png", "PQ vs latency", "PQ against median end-to-end latency, one "
                            f"marker per merge path ({shown}); the dashed line joins the points no other beats on both."))  # fmt: skip

    series: dict[str, list[tuple[int, float]]] = {}
    raw_series: dict[str, list[tuple[int, float]]] = {}
    for e in bench.entries:
        if e.ok and e.proposals == native_n and e.threads == threads and e.merge == bench.native_merge:
            (series if e.graph == "panoptic" else raw_series).setdefault(e.backend, []).append((e.size, e.median_ms))
    if len({s for values in series.values() for s, _ in values}) > 1:
        plots.latency_vs_size(series, raw_series, folder / "latency_vs_size.png", f"Latency vs input size, N={native_n}, {tlabel}")
        blocks.append(Image(f"{PLOTS}/latency_vs_size.png", "latency vs size", "Median latency by input size "
                            "(the measured counterpart of the paper's Table 2)."))  # fmt: skip

    lat: dict[str, list[tuple[int, float]]] = {}
    for e in bench.entries:
        if e.ok and e.graph == "panoptic" and e.size == size and e.threads == threads and e.merge == bench.native_merge:
            lat.setdefault(e.backend, []).append((e.proposals, e.median_ms))
    lat = {k: v for k, v in lat.items() if len(v) > 1}
    if lat:
        qual: dict[str, list[tuple[int, float]]] = {}
        for run in bundle.evals:
            if run.proposals is not None and run.size in (None, size) and (run.merge or bench.native_merge) == bench.native_merge:
                qual.setdefault(run.backend, []).append((run.proposals, run.pq))
        qual = {k: v for k, v in qual.items() if len(v) > 1}
        plots.by_proposals(lat, qual, folder / "proposals.png", f"By number of proposals, {size}x{size}, {tlabel}")
        blocks.append(Image(f"{PLOTS}/proposals.png", "latency and PQ vs proposals", "Latency and PQ by number of "
                            "proposals (the measured counterpart of the paper's Table 3)."))  # fmt: skip

    bars = []
    n_split = TARGET_POST_PROPOSALS if bench.find(REFERENCE, "raw", size, TARGET_POST_PROPOSALS, threads) else native_n
    for merge in bench.merges():
        for name in bench.backends():
            e2e = bench.find(name, "panoptic", size, n_split, threads, merge)
            raw = bench.find(name, "raw", size, n_split, threads, merge)
            if e2e is not None and raw is not None:
                bars.append((name if merge == bench.native_merge else f"{name} [{merge}]", raw.median_ms, e2e.median_ms))
    if bars:
        plots.postprocess_share(bars, folder / "postprocess_share.png", f"Post-processing share, {size}x{size}, N={n_split}, {tlabel}")
        blocks.append(Image(f"{PLOTS}/postprocess_share.png", "post-processing share", "Network alone vs the rest of "
                            "the end-to-end time (mask upsampling + panoptic merge)."))  # fmt: skip

    if bundle.overlays:
        order = _order(bench)
        named = sorted(bundle.overlays.items(), key=lambda kv: (not kv[0].startswith("0-"), order.get(kv[0], 99), kv[0]))
        images = []
        for name, png in named:
            target = folder / f"overlay-{name}.png"
            shutil.copyfile(png, target)
            label = name[2:].replace("-", " ") if name.startswith("0-") else name
            images.append(Image(f"{PLOTS}/{target.name}", f"{label} overlay", label))
        plots.overlay_grid([(img.caption, folder / Path(img.path).name) for img in images], folder / "overlays.png",
                           "The same validation image through each backend")  # fmt: skip
        blocks.append(Heading(3, "Example overlays, one per backend"))
        blocks.append(ImageRow(images))
    if len(blocks) == 1:
        blocks.append(Para("Not enough timings in these results for any plot."))
    return blocks


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def build_blocks(bundle: ResultsBundle, plot_folder: Path) -> tuple[list[Block], list[TargetLine]]:
    """Every block of the report (drawing the plots into `plot_folder`) and the checked targets."""
    bench = bundle.bench
    assert bench is not None
    def parity_verdict(backend: str, merge: str) -> str | None:
        row = bundle.parity_for(backend, merge)
        return row.verdict if row is not None else None

    targets = check_targets(bench, parity_verdict)
    model = bench.model
    title = f"MaskConver deployment report: {model.get('preset', '?')}"
    intro = (f"Measured {bench.created} from {bundle.root}. Model {model.get('preset', '?')} at "
             f"{'x'.join(str(v) for v in model.get('input_size', []))}, {model.get('num_proposals', '?')} proposals, "
             f"merge path {bench.native_merge}/{model.get('mask_activation', 'hard-sigmoid')} (timed: "
             f"{', '.join(bench.merges()) or '-'}), "
             f"checkpoint sha256 {str(model.get('checkpoint_sha256', ''))[:12] or '-'}.")  # fmt: skip
    blocks: list[Block] = [Heading(1, title), Para(intro)]
    blocks += _machine_section(bench)
    blocks += _protocol_section(bench)
    blocks += _main_table(bundle)
    blocks += _paths_section(bundle)
    blocks += _proposals_table(bundle)
    blocks += _parity_section(bundle)
    blocks += _targets_section(bundle, targets)
    blocks += _plots(bundle, plot_folder)
    blocks += _pipeline_section(bundle)
    blocks += _paper_section()
    blocks.append(Para(f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by `maskconver report`."))
    return blocks, targets


def write_report(results: str | Path, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write OUT/report.md, OUT/report.html and OUT/plots/*.png from a results folder.

    Refuses to overwrite an existing report unless `force`. Returns {"markdown", "html", "plots", "targets"}.
    """
    from maskconver_deploy.report.html import render_html

    bundle = load_results(results)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", out)
    for name in (REPORT_MD, REPORT_HTML, PLOTS):
        if (out / name).exists() and not force:
            raise UserError("already exists; pass --force to overwrite it", out / name)
    with tempfile.TemporaryDirectory(prefix="maskconver-report-") as scratch_name:
        scratch = Path(scratch_name)
        (scratch / PLOTS).mkdir()
        blocks, targets = build_blocks(bundle, scratch / PLOTS)
        title = str(blocks[0].text) if isinstance(blocks[0], Heading) else "MaskConver report"
        markdown = render_markdown(blocks)
        page = render_html(blocks, scratch, title)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / PLOTS, force=force, suffix="") as tmp:
            shutil.copytree(scratch / PLOTS, tmp)
        write_bytes(out / REPORT_MD, markdown.encode(), force=force)
        write_bytes(out / REPORT_HTML, page.encode(), force=force)
    return {
        "markdown": out / REPORT_MD,
        "html": out / REPORT_HTML,
        "plots": sorted((out / PLOTS).glob("*.png")),
        "targets": [t.__dict__ for t in targets],
    }


__all__ = ["TargetLine", "build_blocks", "check_targets", "write_report", "STATUS_OK"]

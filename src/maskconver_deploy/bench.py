"""Latency benchmark of every artifact of a model folder, interleaved, against PyTorch eager in the same run.

Protocol (one `run_bench` call):
* Groups: one per (input size, proposals, threads). Inside a group every requested backend is opened on the fused
  panoptic graph (end to end) of every requested merge path (`--merge`; model/postprocess.py), and once on the raw
  graph (network alone: it has no merge in it, so it is timed once per group, from the group's first merge path),
  where that artifact exists. Each merge path in a group has its own PyTorch eager runner (the same path's
  reference), so speed-ups compare like with like, and the paths are timed interleaved with each other.
* Each runner is opened and warmed up alone (W runs) while its memory is measured, then all runners of the group
  are timed round-robin, one image per runner per round, the starting runner rotated each round, for R rounds:
  drift (thermal, a neighbour's job) hits every backend alike.
* The time of one run is `Runner.last_latency_s`: the backend call only, the same span for every backend.
* Speed-up = median(torch) / median(backend) within the same group. The floor is the model's MACs at this
  machine's float32 matmul peak, measured once per thread count in a clean subprocess.
* Sizes, proposal counts and merge paths other than the folder's own are exported and compiled into
  MODEL_DIR/variants/s<size>-n<proposals>[-<merge>]/ first (reused when present).
Nothing here imports torch at module level; the model is imported only to count MACs and export variants.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.errors import ArtifactMissing, BackendUnavailable, MaskconverError, UserError
from maskconver_deploy.results import (
    SPAN_END_TO_END,
    SPAN_NETWORK,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    DEFAULT_MERGE,
    BenchEntry,
    BenchResult,
    LatencyStats,
    OpShare,
    ProfileResult,
)
from maskconver_deploy.types import Precision

Log = Callable[[str], None]

DEFAULT_WARMUP = 10
DEFAULT_RUNS = 50
DEFAULT_GAP_MS = 20.0
DEFAULT_BURST = 5  # 4 of every 5 timed calls back to back: the median is a stream's call (see time_interleaved)
QUICK_WARMUP = 2
QUICK_RUNS = 5
PEAK_MATRIX = 1536
PEAK_REPEATS = 5
VARIANTS_DIR = "variants"
GRAPHS = ("panoptic", "raw")
LIBRARIES = ("numpy", "torch", "onnx", "onnxruntime", "ai-edge-litert", "tensorflow", "tensorrt", "onnx2tf", "openvino",
             "nncf")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
MEMORY_METHOD = (
    "in-process peak RSS over opening + warming up one runner: VmHWM is reset through /proc/self/clear_refs "
    "('5'), then peak = VmHWM - VmRSS before opening (runtime libraries are imported before measuring, so their "
    "code pages are not counted); 'retained' = VmRSS after warm-up - VmRSS before. Allocator reuse of memory "
    "the process already holds can make a delta smaller than the runtime's true footprint"
)
MEMORY_METHOD_FALLBACK = (
    "in-process RSS growth over opening + warming up one runner (VmRSS after - before; /proc/self/clear_refs "
    "was not writable, so no peak): a lower bound of the runner's footprint"
)


# ---------------------------------------------------------------------------------------------------------------
# Options and planning
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    """What to time. `sizes`/`proposals` None: the model folder's own setting only."""

    backends: list[str]
    # backends timed at a given (size, proposals) other than the folder's own, or at (size, proposals, merge); a
    # config not listed gets them all
    config_backends: dict[tuple[int, ...], list[str]] | None = None
    # merge paths to time (None: the folder's own); merge_configs[merge]: the (size, proposals) it is timed at
    # (a merge not listed: every planned config)
    merges: list[str] | None = None
    merge_configs: dict[str, list[tuple[int, int]]] | None = None
    sizes: list[int] | None = None
    proposals: list[int] | None = None
    threads: list[int | None] = field(default_factory=lambda: [None])
    warmup: int = DEFAULT_WARMUP
    runs: int = DEFAULT_RUNS
    grid: bool = False  # every (size, proposals) pair instead of the two sweeps
    network_alone: bool = True  # also time the raw graphs where they exist
    profile: bool = False  # ONNX Runtime profiler on the ORT artifacts
    calib: Path | None = None  # calibration folder for int8 variants
    seed: int = 0
    peak_matrix: int = PEAK_MATRIX
    gap_ms: float = DEFAULT_GAP_MS  # pause before every turn of timed calls (see time_interleaved)
    burst: int = DEFAULT_BURST  # timed calls per turn, back to back (see time_interleaved)


def usable_cores() -> int:
    """The cores this process may run on (its affinity), the default thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_int_list(text: str | None, what: str, minimum: int = 1) -> list[int] | None:
    """'256,384' -> [256, 384]; None or '' -> None; bad values are a UserError naming the option."""
    if text is None or not text.strip():
        return None
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"{what}: '{part}' is not an integer") from None
        if value < minimum:
            raise UserError(f"{what}: {value} is below the minimum {minimum}")
        if value not in values:
            values.append(value)
    return values or None


def plan_configs(native: tuple[int, int], sizes: list[int] | None, proposals: list[int] | None, grid: bool) -> list[tuple[int, int]]:
    """(size, proposals) pairs to time, in order.

    Sizes are swept at the first proposal count and proposal counts at the first size (the paper's Tables 2 and
    3); `grid` takes every pair. Without a list the model folder's own value is used.
    """
    size_list = sizes or [native[0]]
    prop_list = proposals or [native[1]]
    if grid:
        pairs = [(s, n) for s in size_list for n in prop_list]
    else:
        pairs = [(s, prop_list[0]) for s in size_list] + [(size_list[0], n) for n in prop_list]
    out: list[tuple[int, int]] = []
    for pair in pairs:
        if pair not in out:
            out.append(pair)
    return out


def variant_name(size: int, proposals: int, merge: str | None = None) -> str:
    """Folder name under MODEL_DIR/variants/: 's256-n100', or 's256-n100-feature' for another merge path."""
    return f"s{size}-n{proposals}" + (f"-{merge}" if merge else "")


def parse_merges(text: str | None) -> list[str] | None:
    """'input,feature' -> ['input', 'feature'] (validated against model/postprocess.py MERGES); None/'' -> None."""
    if text is None or not text.strip():
        return None
    from maskconver_deploy.model.postprocess import MERGES, normalize_merge

    out: list[str] = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            name = normalize_merge(part)
        except ValueError:
            raise UserError(f"--merge: unknown merge path '{part.strip()}' (use {', '.join(MERGES)})") from None
        if name not in out:
            out.append(name)
    return out or None


# ---------------------------------------------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def library_versions() -> dict[str, str]:
    """Installed versions of the runtimes (from package metadata: nothing is imported)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_info(threads: Sequence[int | None]) -> dict[str, Any]:
    """CPU model, cores, flags, memory, platform, library versions and thread settings."""
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    mem = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read("/proc/meminfo"), re.M)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ}
    settings = "runtime threads " + ", ".join("runtime default" if t is None else str(t) for t in threads)
    settings += "; ONNX Runtime inter-op 1 (sequential executor), TFLite num_threads, torch.set_num_threads"
    if env:
        settings += "; env " + " ".join(f"{k}={v}" for k, v in env.items())
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or "unknown",
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gb": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "thread_settings": settings,
        "loadavg_start": _read("/proc/loadavg").split(" ")[:3],
    }


PEAK_SCRIPT = r"""
import json, sys, time
n, reps = int(sys.argv[1]), int(sys.argv[2])
threads = None if sys.argv[3] == "none" else int(sys.argv[3])
out = {}
import numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
def best(fn):
    fn(); fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return 2.0 * n ** 3 / min(times) / 1e9
out["numpy"] = best(lambda: a @ b)
try:
    import torch
    if threads is not None:
        torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out["torch"] = best(lambda: torch.mm(ta, tb))
except ImportError:
    pass
print(json.dumps(out))
"""


def measure_peak(threads: int | None, n: int = PEAK_MATRIX, repeats: int = PEAK_REPEATS) -> dict[str, Any]:
    """Float32 matmul GFLOP/s at a thread count: best of numpy (OpenBLAS) and torch, in a clean subprocess."""
    env = dict(os.environ)
    if threads is not None:
        for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(n), str(repeats), "none" if threads is None else str(threads)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise UserError(f"measuring the matmul peak failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    rates = json.loads(proc.stdout.strip().splitlines()[-1])
    lib = max(rates, key=rates.get)
    return {
        "threads": threads,
        "gflops": float(rates[lib]),
        "by_library": {k: round(float(v), 2) for k, v in rates.items()},
        "method": f"float32 {n}x{n} matmul, best of {repeats} after 2 warm-ups, best library ({lib}), fresh process",
    }


# ---------------------------------------------------------------------------------------------------------------
# Memory (Linux /proc)
# ---------------------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    match = re.search(rf"^{key}:\s*(\d+)\s*kB", _read("/proc/self/status"), re.M)
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """RSS before, peak RSS during and RSS after one block (see MEMORY_METHOD)."""

    def __init__(self) -> None:
        self.peak_ok = False
        self.before_kb: int | None = None
        self.result: dict[str, Any] = {}

    def __enter__(self) -> MemoryProbe:
        self.peak_ok = _reset_peak()
        self.before_kb = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        after = _status_kb("VmRSS")
        peak = _status_kb("VmHWM") if self.peak_ok else None
        if self.before_kb is None or after is None:
            self.result = {"method": "unavailable (no /proc/self/status)"}
            return
        self.result = {
            "rss_delta_mb": round((after - self.before_kb) / 1024, 2),
            "peak_delta_mb": round((peak - self.before_kb) / 1024, 2) if peak is not None else None,
            "method": "peak" if peak is not None else "rss-growth",
        }


# ---------------------------------------------------------------------------------------------------------------
# Model folder access (export / compile / runners of the other modules)
# ---------------------------------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _spec_of(meta: Any, size: tuple[int, int], proposals: int) -> Any:
    """The model spec at another input size / proposal count (for counting MACs)."""
    from maskconver_deploy.model.specs import MaskConverSpec, get_preset

    raw = (getattr(meta, "extra", None) or {}).get("spec")
    spec = MaskConverSpec.from_dict(raw) if isinstance(raw, dict) else get_preset(meta.preset)
    return spec.with_changes(input_size=tuple(size), num_proposals=int(proposals))


def count_macs_at(meta: Any, size: tuple[int, int], proposals: int) -> dict[str, int]:
    """{"network", "postprocess", "total"} MACs of one image."""
    from maskconver_deploy.model.counting import count_macs

    macs = count_macs(_spec_of(meta, size, proposals), proposals)
    return {"network": int(macs["network"]["total"]), "postprocess": int(macs["postprocess"]["total"]), "total": int(macs["total"])}


def count_params_of(meta: Any) -> dict[str, int]:
    from maskconver_deploy.model.counting import count_params

    return {k: int(v) for k, v in count_params(_spec_of(meta, tuple(meta.input_size), meta.num_proposals)).items()}


def _bytes_of(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def backend_status(name: str) -> tuple[Any, str, str]:
    """(parsed name, reason, hint): reason is '' when the backend can run here."""
    from maskconver_deploy.backends import backend_module, parse_backend

    parsed = parse_backend(name)
    try:
        module = backend_module(parsed.family)
    except ImportError as exc:
        return parsed, f"the {parsed.family} backend module cannot be imported ({_first_line(exc)})", ""
    if parsed.precision not in module.PRECISIONS.get(parsed.family, ()):
        allowed = ", ".join(p.value for p in module.PRECISIONS.get(parsed.family, ()))
        return parsed, f"precision {parsed.precision.value} is not offered by {parsed.family} (offered: {allowed})", ""
    state = module.availability(parsed.family)
    return parsed, ("" if state.ok else state.reason), state.hint


def needs_calibration(name: str) -> bool:
    return name.endswith("-int8") or name.endswith("-int8-static")


def _sha(folder: Any) -> str:
    return str(getattr(folder.meta, "checkpoint_sha256", ""))


def prepare_variant(model_dir: Path, size: int, proposals: int, backends: Sequence[str], calib: Path | None,
                    log: Log, merge: str | None = None,
                    graphs: Sequence[str] = GRAPHS) -> tuple[Path, dict[str, tuple[str, str]]]:  # fmt: skip
    """Export MODEL_DIR/variants/s<size>-n<proposals>[-<merge>]/ (panoptic + raw graphs) and compile `backends`
    there (the `graphs` of them). `merge`: another merge path than the folder's own (None: the folder's).

    Returns (variant folder, {backend: (status, reason)}) for backends that could not be prepared: skipped when it
    needs what was not given (a calibration set), failed when its build failed. Existing files are reused.
    """
    from maskconver_deploy import export as export_mod
    from maskconver_deploy.modeldir import ModelDir

    source = ModelDir(model_dir)
    other = merge if merge and merge != source.meta.merge else None
    target = model_dir / VARIANTS_DIR / variant_name(size, proposals, other)
    wanted_merge = other or source.meta.merge
    if (target / "model.json").is_file():
        existing = ModelDir(target).meta
        why = ("another checkpoint" if _sha(ModelDir(target)) != _sha(source)
               else f"another merge path ({existing.merge})" if existing.merge != wanted_merge else "")  # fmt: skip
        if why:
            log(f"variant {target.name} was exported from {why}: exporting it again")
            shutil.rmtree(target)  # our own scratch folder under MODEL_DIR/variants/
    if not (target / "model.json").is_file():
        log(f"exporting variant {target.name} (size {size}, {proposals} proposals, merge {wanted_merge})")
        export_mod.export_variant(source, target, input_size=(size, size), num_proposals=proposals, merge=other)
    variant = ModelDir(target)
    problems: dict[str, tuple[str, str]] = {}
    for name in backends:
        if name.startswith("torch"):
            continue
        if needs_calibration(name) and calib is None:
            problems[name] = (STATUS_SKIPPED, "needs a calibration set for this variant (pass --calib)")
            continue
        for graph in graphs:
            try:
                path = variant.artifact_path(name, graph)
                if path.exists():
                    continue
                log(f"compiling {name} ({graph}) for variant {target.name}")
                variant.compile(name, graph=graph, calib=calib)
            except MaskconverError as exc:
                if graph == "panoptic":
                    problems[name] = (STATUS_FAILED, f"compiling the variant failed: {_first_line(exc)}")
                    break
    return target, problems


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    entry: BenchEntry
    runner: Any
    image: np.ndarray
    samples: list[float] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)  # indices into samples: the first call of each turn


def bench_image(size: tuple[int, int], seed: int) -> np.ndarray:
    """A deterministic synthetic scene (shapes on textures) at the input size: realistic proposals and segments."""
    from maskconver_deploy.data.synthetic import generate_scene

    height, width = size
    scene = generate_scene(seed, 0, max(height, width))
    return np.ascontiguousarray(scene.image[:height, :width])


def _preimport(families: set[str]) -> None:
    """Import the runtimes before any memory is measured, so no runner is charged for a library's code pages."""
    modules = {"torch": "torch", "torch-cuda": "torch", "torch-compile": "torch", "ort": "onnxruntime",
               "ort-mobile": "onnxruntime", "tflite": "ai_edge_litert.interpreter", "tensorrt": "tensorrt",
               "openvino": "openvino"}  # fmt: skip
    for family in families:
        name = modules.get(family)
        if name:
            try:
                __import__(name)
            except Exception:  # the runner's own open reports the problem
                pass


def _open_slot(entry: BenchEntry, model_dir: Path, image: np.ndarray, warmup: int) -> _Slot | None:
    """Open and warm up one runner, measuring its memory; on failure fill the entry and return None."""
    from maskconver_deploy import backends

    try:
        runner = backends.open_runner(entry.backend, model_dir=model_dir, threads=entry.threads, graph=entry.graph)
    except BackendUnavailable as exc:  # cannot run on this machine
        entry.status, entry.reason, entry.hint = STATUS_SKIPPED, exc.reason, exc.hint
        return None
    except ArtifactMissing as exc:  # not built in this folder: the reason names the build command
        entry.status, entry.reason = STATUS_SKIPPED, _first_line(exc)
        return None
    except MaskconverError as exc:  # stale (built from another export) or otherwise unusable: a failure
        entry.status, entry.reason = STATUS_FAILED, _first_line(exc)
        return None
    entry.artifact = str(runner.artifact)
    files = getattr(runner, "artifact_files", None) or [runner.artifact]  # OpenVINO: .xml + .bin (+ post part)
    sizes = [_bytes_of(Path(f)) for f in files]
    entry.artifact_bytes = None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)
    try:
        with MemoryProbe() as probe:
            runner.open()
            for _ in range(warmup):
                runner.infer(image)
    except Exception as exc:  # a runtime error in one backend must not stop the others
        entry.status, entry.reason = STATUS_FAILED, f"{type(exc).__name__}: {_first_line(exc)}"
        runner.close()
        return None
    entry.memory = dict(probe.result)
    entry.compile_s = getattr(runner, "compile_s", None)
    return _Slot(entry, runner, image)


def time_interleaved(slots: list[_Slot], runs: int, gap_s: float = 0.0, burst: int = 1) -> None:
    """`runs` timed calls per runner in turns: each turn is `burst` back-to-back calls of one runner, the runners
    taking turns round-robin from a rotating start. Failures drop a runner.

    `gap_s`: a pause before every turn, so the worker threads of the runtime that ran before have parked
    (ONNX Runtime's and OpenMP's pools spin for a while after a call and would steal cores from the next one).
    `burst` 1 times every call after a pause (a frame arriving at a camera's rate); a larger burst times calls of
    a stream, the second and later ones back to back (what a runtime's own benchmark tool reports).
    """
    active = list(slots)
    burst = max(1, int(burst))
    for round_index in range(-(-runs // burst)):
        if not active:
            break
        calls = min(burst, runs - round_index * burst)
        start = round_index % len(active)
        for slot in active[start:] + active[:start]:
            if gap_s > 0:
                time.sleep(gap_s)
            slot.turn_starts.append(len(slot.samples))
            for _ in range(calls):
                try:
                    slot.runner.infer(slot.image)
                except Exception as exc:
                    slot.entry.status = STATUS_FAILED
                    slot.entry.reason = f"failed during timing: {type(exc).__name__}: {_first_line(exc)}"
                    break
                slot.samples.append(float(slot.runner.last_latency_s) * 1e3)
        active = [s for s in active if s.entry.status == STATUS_OK]


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime profile
# ---------------------------------------------------------------------------------------------------------------
def parse_ort_profile(events: list[dict[str, Any]], runs: int) -> tuple[float, float | None, list[OpShare]]:
    """(node ms per run, model_run ms per run, op-type shares) over the last `runs` model_run windows of a trace."""
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e.get("ts", 0))
    windows = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in model_runs[-runs:]] if model_runs else []
    totals: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        ts = event.get("ts", 0)
        if windows and not any(lo <= ts <= hi for lo, hi in windows):
            continue
        op = str((event.get("args") or {}).get("op_name", "?"))
        totals[op] = totals.get(op, 0.0) + float(event.get("dur", 0)) / 1e3
        nodes.setdefault(op, set()).add(str(event.get("name")))
    count = max(len(windows), 1)
    node_total = sum(totals.values())
    shares = [
        OpShare(op, round(ms / count, 4), round(ms / node_total, 4) if node_total else 0.0, len(nodes[op]))
        for op, ms in sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
    ]
    run_ms = sum(hi - lo for lo, hi in windows) / 1e3 / count if windows else None
    return node_total / count, run_ms, shares


def profile_ort(entry: BenchEntry, image: np.ndarray, warmup: int, runs: int) -> ProfileResult:
    """Run one ONNX Runtime artifact with enable_profiling and sum its kernel time per op type."""
    import onnxruntime as ort

    from maskconver_deploy.backends.ort import session_options
    from maskconver_deploy.types import INPUT_NAME

    with tempfile.TemporaryDirectory(prefix="maskconver-profile-") as scratch:
        # the runner's own options (thread counts, optimisation level, int8-dynamic's folding), plus profiling
        options = session_options(Path(entry.artifact), Precision(entry.precision), entry.threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "ort")
        session = ort.InferenceSession(entry.artifact, options, providers=["CPUExecutionProvider"])
        feeds = {INPUT_NAME: np.ascontiguousarray(image[None])}
        for _ in range(warmup + runs):
            session.run(None, feeds)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
    node_ms, run_ms, shares = parse_ort_profile(events, runs)
    return ProfileResult(entry.backend, entry.graph, entry.size, entry.proposals, entry.threads, runs,
                         round(node_ms, 4), None if run_ms is None else round(run_ms, 4), shares, entry.merge)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def _new_entry(parsed: Any, name: str, graph: str, size: int, proposals: int, threads: int | None,
               merge: str = DEFAULT_MERGE, mask_activation: str = "hard-sigmoid") -> BenchEntry:  # fmt: skip
    return BenchEntry(backend=name, family=parsed.family, precision=parsed.precision.value, graph=graph, size=size,
                      proposals=proposals, threads=threads, merge=merge, mask_activation=mask_activation)  # fmt: skip


def plan_merges(native_merge: str, configs: list[tuple[int, int]], options: BenchOptions) -> dict[tuple[int, int], list[str]]:
    """(size, proposals) -> the merge paths timed there, the folder's own first (it gives the group's raw graph)."""
    merges = list(options.merges or [native_merge])
    merges.sort(key=lambda m: m != native_merge)
    out: dict[tuple[int, int], list[str]] = {}
    for config in configs:
        chosen = [m for m in merges if (options.merge_configs or {}).get(m) is None
                  or config in [tuple(c) for c in (options.merge_configs or {})[m]]]  # fmt: skip
        if chosen:
            out[config] = chosen
    return out


def run_bench(model_dir: str | Path, options: BenchOptions, log: Log | None = None) -> BenchResult:
    """Time every requested backend at every planned (size, proposals, merge path) and thread count; see the
    module doc."""
    from maskconver_deploy.modeldir import ModelDir

    say = log or (lambda _message: None)
    started = time.perf_counter()
    model_dir = Path(model_dir)
    folder = ModelDir(model_dir)
    meta = folder.meta
    native = (int(meta.input_size[0]), int(meta.num_proposals))
    native_merge = str(meta.merge)
    if not options.backends:
        raise UserError("no backend to benchmark (--backends)")
    if options.warmup < 0 or options.runs < 1:
        raise UserError("--warmup must be >= 0 and --runs >= 1")
    if (options.sizes and any(s != native[0] for s in options.sizes)) and meta.input_size[0] != meta.input_size[1]:
        raise UserError("other sizes need a square model input", model_dir)
    names: list[str] = []
    for name in options.backends:
        if name not in names:
            names.append(name)
    configs = plan_configs(native, options.sizes, options.proposals, options.grid)
    merges_at = plan_merges(native_merge, configs, options)
    configs = [c for c in configs if c in merges_at]
    if not configs:
        raise UserError("no (size, proposals) left to time: every merge path is limited to other configs")
    machine = machine_info(options.threads)

    statuses = {name: backend_status(name) for name in names}
    _preimport({parsed.family for parsed, reason, _ in statuses.values() if not reason})
    runnable = [n for n in names if not statuses[n][1]]

    folders: dict[tuple[int, int, str], Path] = {}
    activations: dict[tuple[int, int, str], str] = {}
    variant_problems: dict[tuple[int, int, str], dict[str, tuple[str, str]]] = {}
    for size, proposals in configs:
        for index, merge in enumerate(merges_at[(size, proposals)]):
            key = (size, proposals, merge)
            if (size, proposals) == native and merge == native_merge:
                folders[key], activations[key] = model_dir, str(meta.mask_activation)
                continue
            graphs = GRAPHS if index == 0 and options.network_alone else GRAPHS[:1]  # the raw graph: once a group
            label = variant_name(size, proposals, merge if merge != native_merge else None)
            try:
                chosen = [n for n in _for_config(names, key, options, native_merge) if n in runnable]
                path, problems = prepare_variant(model_dir, size, proposals, chosen, options.calib, say, merge, graphs)
            except MaskconverError as exc:
                raise UserError(f"cannot prepare variant {label}: {_first_line(exc)}", model_dir) from None
            folders[key], activations[key] = path, str(ModelDir(path).meta.mask_activation)
            variant_problems[key] = problems

    peaks = []
    for threads in options.threads:
        say(f"measuring the float32 matmul peak ({'default' if threads is None else threads} threads)")
        peaks.append(measure_peak(threads, options.peak_matrix))
    peak_by_threads = {p["threads"]: p["gflops"] for p in peaks}

    macs = {config: count_macs_at(meta, (config[0], config[0]) if config != native else tuple(meta.input_size), config[1])
            for config in configs}  # fmt: skip

    entries: list[BenchEntry] = []
    profiles: list[ProfileResult] = []
    for threads in options.threads:
        for config in configs:
            size, proposals = config
            image = bench_image(tuple(meta.input_size) if config == native else (size, size), options.seed)
            group: list[BenchEntry] = []
            slots: list[_Slot] = []
            for merge in merges_at[config]:
                key = (size, proposals, merge)
                chosen = names if (config, merge) == (native, native_merge) else _for_config(names, key, options, native_merge)
                for name in chosen:
                    parsed, reason, hint = statuses[name]
                    # the raw graph has no merge in it: timed once a group, from the group's first merge path
                    first = merge == merges_at[config][0]
                    graphs = GRAPHS if options.network_alone and first else GRAPHS[:1]
                    for graph in graphs:
                        entry = _new_entry(parsed, name, graph, size, proposals, threads, merge, activations[key])
                        entry.macs = macs[config]
                        floor = 2.0 * entry.macs["total"] / (peak_by_threads[threads] * 1e9) * 1e3
                        entry.floor_ms = round(floor, 4)
                        group.append(entry)
                        problem = variant_problems.get(key, {}).get(name)
                        if reason:
                            entry.status, entry.reason, entry.hint = STATUS_SKIPPED, reason, hint
                            continue
                        if problem:
                            entry.status, entry.reason = problem
                            continue
                        say(f"opening {name} ({graph}, {size}px, N={proposals}, merge {merge}, threads {threads or 'default'})")
                        slot = _open_slot(entry, folders[key], image, options.warmup)
                        if slot is not None:
                            slots.append(slot)
            say(f"timing {len(slots)} runners interleaved, {options.runs} calls each in turns of {options.burst}")
            time_interleaved(slots, options.runs, options.gap_ms / 1e3, options.burst)
            for slot in slots:
                slot.runner.close()
                if slot.entry.status == STATUS_OK and slot.samples:
                    slot.entry.samples_ms = [round(s, 4) for s in slot.samples]
                    slot.entry.latency_ms = LatencyStats.from_ms(slot.entry.samples_ms)  # the stats of what is saved
                    if options.burst > 1:  # what a call after the pause costs, apart from the stream's median
                        firsts = [slot.samples[i] for i in slot.turn_starts if i < len(slot.samples)]
                        slot.entry.after_pause_ms = round(float(np.median(firsts)), 4) if firsts else None
            if options.profile and size == configs[0][0]:  # the profile explains the first size's timings
                for entry in group:
                    if entry.ok and entry.family in ("ort", "ort-mobile"):
                        say(f"profiling {entry.backend} ({entry.graph}, merge {entry.merge})")
                        try:
                            profiles.append(profile_ort(entry, image, min(options.warmup, 3), max(5, min(options.runs, 20))))
                        except Exception as exc:  # the profile is a diagnosis: its failure is reported, not fatal
                            say(f"profiling {entry.backend} failed: {_first_line(exc)}")
            _fill_speedups(group)
            entries.extend(group)

    machine["loadavg_end"] = _read("/proc/loadavg").split(" ")[:3]
    probe_ok = _reset_peak()
    result = BenchResult(
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        model_dir=str(model_dir),
        model={
            "preset": meta.preset,
            "input_size": list(meta.input_size),
            "num_proposals": meta.num_proposals,
            "merge": native_merge,
            "mask_activation": str(meta.mask_activation),
            "checkpoint_sha256": getattr(meta, "checkpoint_sha256", ""),
            "params": count_params_of(meta),
            "macs": macs[native] if native in macs else count_macs_at(meta, tuple(meta.input_size), native[1]),
        },
        machine=machine,
        protocol={
            "warmup": options.warmup,
            "runs": options.runs,
            "order": "runners of one (size, proposals, threads) group, every merge path of it included, interleaved "
                     "round-robin, the starting runner rotated every round, "
                     + (f"each turn {options.burst} back-to-back timed calls of one runner after a " if options.burst > 1
                        else "one timed call per turn, after a ")
                     + f"{options.gap_ms:g} ms pause (so the previous "
                     "runtime's spinning worker threads have parked); warm-up per runner before timing",
            "gap_ms": options.gap_ms,
            "burst": options.burst,
            "span": SPAN_END_TO_END,
            "network_span": SPAN_NETWORK,
            "memory_method": MEMORY_METHOD if probe_ok else MEMORY_METHOD_FALLBACK,
            "image": f"synthetic scene (data.synthetic.generate_scene seed {options.seed}, image 0) at the input size",
            "configs": [list(c) for c in configs],
            "merges": {f"{c[0]}x{c[1]}": merges_at[c] for c in configs},
            "threads": list(options.threads),
        },
        peak=peaks,
        entries=entries,
        profiles=profiles,
        seconds=round(time.perf_counter() - started, 2),
    )
    return result


def _for_config(names: list[str], config: tuple[int, ...], options: BenchOptions, native_merge: str = DEFAULT_MERGE) -> list[str]:
    """The backends timed at a (size, proposals[, merge]) other than the model folder's own (torch always: the
    baseline). A (size, proposals, merge) key of `config_backends` wins over its (size, proposals) key."""
    table = options.config_backends or {}
    chosen = table.get(tuple(config))
    if chosen is None and len(config) == 3:
        chosen = table.get(tuple(config[:2]))
    if chosen is None:
        return list(names)
    return [n for n in names if n in chosen or n == "torch"]


def _fill_speedups(group: list[BenchEntry]) -> None:
    """speed-up = median(torch) / median(entry) (and the same against torch-compile) for entries of the same graph
    and merge path in one interleaved group."""
    for graph in GRAPHS:
        for merge in dict.fromkeys(e.merge for e in group if e.graph == graph):
            same = [e for e in group if e.graph == graph and e.merge == merge]
            ref = next((e for e in same if e.backend == "torch" and e.ok), None)
            compiled = next((e for e in same if e.backend == "torch-compile" and e.ok), None)
            for e in same:
                if e.ok and ref is not None:
                    e.speedup_vs_torch = round(ref.median_ms / e.median_ms, 4)
                if e.ok and compiled is not None:
                    e.speedup_vs_torch_compile = round(compiled.median_ms / e.median_ms, 4)


def summary_rows(result: BenchResult) -> list[dict[str, Any]]:
    """Terminal table rows: one per entry."""
    rows = []
    for e in result.entries:
        row: dict[str, Any] = {
            "backend": e.backend,
            "merge": e.merge if e.graph == "panoptic" else "-",
            "graph": "end to end" if e.graph == "panoptic" else "network",
            "size": e.size,
            "N": e.proposals,
            "threads": "default" if e.threads is None else e.threads,
            "status": e.status,
        }
        if e.ok and e.latency_ms is not None:
            row |= {
                "median ms": e.latency_ms.median,
                "p90 ms": e.latency_ms.p90,
                "min ms": e.latency_ms.min,
                "after pause ms": e.after_pause_ms,
                "vs torch": e.speedup_vs_torch,
                "vs compiled": e.speedup_vs_torch_compile,
                "floor ms": e.floor_ms,
                "MB": (e.artifact_bytes or 0) / 1e6,
                "peak MB": e.memory.get("peak_delta_mb"),
            }
        else:
            row["median ms"] = e.reason
        rows.append(row)
    return rows


def all_backend_names() -> list[str]:
    """Every backend name this toolkit knows (family x offered precision), reference first."""
    from maskconver_deploy.backends import FAMILY_MODULES, BackendName, backend_module

    names = []
    for family in FAMILY_MODULES:
        try:
            module = backend_module(family)
        except ImportError:
            names.append(family)
            continue
        for precision in module.PRECISIONS.get(family, ()):
            names.append(str(BackendName(family, precision)))
    return names


def resolve_backends(text: str) -> list[str]:
    """'all' or a comma list -> backend names (validated); the PyTorch reference is always included first."""
    from maskconver_deploy.backends import parse_backend

    if text.strip().lower() == "all":
        names = all_backend_names()
    else:
        names = [str(parse_backend(part)) for part in text.split(",") if part.strip()]
    if not names:
        raise UserError("--backends is empty")
    if "torch" not in names:
        names.insert(0, "torch")
    out: list[str] = []
    for name in names:
        if name not in out:
            out.append(name)
    return out

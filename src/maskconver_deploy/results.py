"""Result records and their JSON files: what `bench` and `pipeline` write and the only thing `report/` reads.

numpy-free and model-free on purpose: this module imports neither `model/` nor `backends/`.

Files in a results folder (what `maskconver pipeline` writes under OUT/results/):
    bench.json            BenchResult            format "maskconver-bench/1"
    parity.json           the parity module's    {"candidates": [{backend, precision, verdict, reason, metric...}]}
    eval/<key>.json       EvalRun                format "maskconver-eval-run/1" (or a bare evaluate_runner result)
    pipeline.json         PipelineRecord         format "maskconver-pipeline/1"
    overlays/<backend>.png                       one example image with each backend's panoptic answer drawn on it
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import read_json, write_json

BENCH_FORMAT = "maskconver-bench/1"
EVAL_FORMAT = "maskconver-eval-run/1"
PIPELINE_FORMAT = "maskconver-pipeline/1"

# The merge path every result written before the merge paths existed was measured on (model/postprocess.py).
DEFAULT_MERGE = "input"
DEFAULT_ACTIVATION = "hard-sigmoid"
LEGACY_MERGE = "input-legacy"  # the `input` path's earlier formulation: timed only to measure the speed-up

BENCH_FILE = "bench.json"
PARITY_FILE = "parity.json"
PIPELINE_FILE = "pipeline.json"
EVAL_DIR = "eval"
OVERLAY_DIR = "overlays"

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_FAILED = "failed"

# The span each timing covers (written into every bench file, quoted by the report).
SPAN_END_TO_END = (
    "end to end: one Runner.infer backend call on the fused graph, uint8 image [1,H,W,3] in, panoptic id map "
    "+ proposals out (normalisation, network, proposals, mask upsampling and panoptic merge inside); the same "
    "span for every backend, PyTorch eager included; Python-side input checks and batch-dim removal excluded"
)
SPAN_NETWORK = (
    "network alone: the same call on the raw graph (network + peak NMS + top-N + mask logits at feature "
    "resolution; no mask upsampling, no merge)"
)


# ---------------------------------------------------------------------------------------------------------------
# Latency statistics
# ---------------------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default rule) of a non-empty list; q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty list")
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class LatencyStats:
    """Summary of timed runs, in milliseconds. No outlier is removed."""

    n: int
    median: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def from_ms(cls, samples_ms: list[float]) -> LatencyStats:
        if not samples_ms:
            raise ValueError("no samples")
        return cls(
            n=len(samples_ms),
            median=float(statistics.median(samples_ms)),
            p90=float(percentile(samples_ms, 90)),
            p99=float(percentile(samples_ms, 99)),
            mean=float(statistics.fmean(samples_ms)),
            std=float(statistics.pstdev(samples_ms)) if len(samples_ms) > 1 else 0.0,
            min=float(min(samples_ms)),
            max=float(max(samples_ms)),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyStats:
        return cls(**{k: (int(d[k]) if k == "n" else float(d[k])) for k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------------------------
# Bench
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BenchEntry:
    """One backend at one (graph, size, proposals, threads): timed, skipped (with reason and hint) or failed."""

    backend: str  # e.g. "ort-int8-static"
    family: str
    precision: str
    graph: str  # "panoptic" (end to end) or "raw" (network alone)
    size: int  # square input side
    proposals: int
    threads: int | None  # None: the runtime's default
    status: str = STATUS_OK
    reason: str = ""
    hint: str = ""
    artifact: str = ""
    artifact_bytes: int | None = None
    latency_ms: LatencyStats | None = None
    samples_ms: list[float] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)  # {"peak_delta_mb", "rss_delta_mb", "method"}
    macs: dict[str, int] = field(default_factory=dict)  # {"network", "postprocess", "total"}
    floor_ms: float | None = None  # MACs at this machine's measured matmul peak
    speedup_vs_torch: float | None = None  # median(torch) / median(this), same graph/size/proposals/threads
    speedup_vs_torch_compile: float | None = None  # median(torch-compile) / median(this), likewise
    compile_s: float | None = None  # torch-compile: the compiling first call in open(), never in the latency
    merge: str = DEFAULT_MERGE  # merge path of the artifact's post-processing (ModelMeta.merge)
    mask_activation: str = DEFAULT_ACTIVATION  # its mask activation (ModelMeta.mask_activation)
    after_pause_ms: float | None = None  # with bursts: median of each turn's first call (after the pause)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK and self.latency_ms is not None

    @property
    def median_ms(self) -> float | None:
        return self.latency_ms.median if self.latency_ms is not None else None

    def config(self) -> tuple[str, int, int, int | None, str]:
        """(graph, size, proposals, threads, merge): entries with the same config are comparable (every merge path
        of one (size, proposals, threads) is timed in the same interleaved group)."""
        return (self.graph, self.size, self.proposals, self.threads, self.merge)

    @property
    def path_label(self) -> str:
        """'input/hard-sigmoid': the merge path and mask activation in one label."""
        return f"{self.merge}/{self.mask_activation}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_ms"] = asdict(self.latency_ms) if self.latency_ms is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], merge: str = DEFAULT_MERGE, mask_activation: str = DEFAULT_ACTIVATION) -> BenchEntry:
        """`merge` / `mask_activation`: what an entry without them was timed on (files written before the merge
        paths existed: the model folder's own path, `input`/hard-sigmoid)."""
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in d.items() if k in known}
        values["merge"] = str(values.get("merge") or merge)
        values["mask_activation"] = str(values.get("mask_activation") or mask_activation)
        if values.get("latency_ms") is not None:
            values["latency_ms"] = LatencyStats.from_dict(values["latency_ms"])
        return cls(**values)


@dataclass
class OpShare:
    """Time of one ONNX op type in an ONNX Runtime profile."""

    op_type: str
    ms_per_run: float
    share: float  # of the summed node time
    nodes: int


@dataclass
class ProfileResult:
    """ONNX Runtime's profiler on one artifact: node time per op type (enable_profiling, JSON trace parsed)."""

    backend: str
    graph: str
    size: int
    proposals: int
    threads: int | None
    runs: int
    node_ms_per_run: float  # sum of node events per run
    run_ms_per_run: float | None  # model_run events per run (includes the executor's overhead)
    op_types: list[OpShare] = field(default_factory=list)
    merge: str = ""  # merge path of the profiled artifact ("": the model folder's own)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileResult:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in d.items() if k in known}
        values["op_types"] = [OpShare(**o) for o in values.get("op_types", [])]
        return cls(**values)


@dataclass
class BenchResult:
    """Everything one `maskconver bench` run measured on one machine."""

    created: str
    model_dir: str
    model: dict[str, Any]  # preset, input_size, num_proposals, checkpoint_sha256, params
    machine: dict[str, Any]  # cpu, cores, platform, versions, thread settings
    protocol: dict[str, Any]  # warmup, runs, interleaving, spans, memory method, input image
    peak: list[dict[str, Any]] = field(default_factory=list)  # [{"threads", "gflops", "method"}]
    entries: list[BenchEntry] = field(default_factory=list)
    profiles: list[ProfileResult] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BENCH_FORMAT,
            "created": self.created,
            "model_dir": self.model_dir,
            "model": self.model,
            "machine": self.machine,
            "protocol": self.protocol,
            "peak": self.peak,
            "entries": [e.to_dict() for e in self.entries],
            "profiles": [p.to_dict() for p in self.profiles],
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path | None = None) -> BenchResult:
        if d.get("format") != BENCH_FORMAT:
            raise UserError(f"not a bench result (expected format '{BENCH_FORMAT}')", path)
        try:
            model = dict(d.get("model") or {})
            merge = str(model.get("merge") or DEFAULT_MERGE)
            activation = str(model.get("mask_activation") or DEFAULT_ACTIVATION)
            return cls(
                created=str(d.get("created", "")),
                model_dir=str(d.get("model_dir", "")),
                model=model,
                machine=dict(d.get("machine") or {}),
                protocol=dict(d.get("protocol") or {}),
                peak=list(d.get("peak") or []),
                entries=[BenchEntry.from_dict(e, merge, activation) for e in d.get("entries", [])],
                profiles=[ProfileResult.from_dict(p) for p in d.get("profiles", [])],
                seconds=float(d.get("seconds", 0.0)),
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise UserError(f"malformed bench result ({type(exc).__name__}: {exc})", path) from None

    def save(self, path: str | Path, force: bool = False) -> Path:
        return write_json(path, self.to_dict(), force=force)

    @classmethod
    def load(cls, path: str | Path) -> BenchResult:
        data = read_json(path)
        if not isinstance(data, dict):
            raise UserError("not a bench result (not a JSON object)", path)
        return cls.from_dict(data, path)

    # -- look-ups used by the report and the consistency checks ----------------------------------------------
    @property
    def native_merge(self) -> str:
        """The merge path of the benchmarked model folder itself."""
        return str(self.model.get("merge") or DEFAULT_MERGE)

    def merges(self) -> list[str]:
        """Merge paths timed, the model folder's own first, then in first-seen order."""
        seen: dict[str, None] = {self.native_merge: None} if any(e.merge == self.native_merge for e in self.entries) else {}
        for e in self.entries:
            seen.setdefault(e.merge, None)
        return list(seen)

    def find(
        self, backend: str, graph: str = "panoptic", size: int | None = None, proposals: int | None = None,
        threads: int | None | str = "any", merge: str | None = None,
    ) -> BenchEntry | None:
        """The first timed entry matching; `threads="any"` matches any thread setting; `merge` None: the model
        folder's own path. The raw graph (network alone) has no merge in it: for graph "raw" an entry of the
        asked path is preferred and any path's is taken otherwise (bench times it once per group)."""
        wanted = merge or self.native_merge
        found = self._find(backend, graph, size, proposals, threads, wanted)
        if found is None and graph == "raw":
            found = self._find(backend, graph, size, proposals, threads, None)
        return found

    def _find(self, backend: str, graph: str, size: int | None, proposals: int | None, threads: int | None | str,
              merge: str | None) -> BenchEntry | None:  # fmt: skip
        for e in self.entries:
            if e.backend != backend or e.graph != graph or not e.ok:
                continue
            if merge is not None and e.merge != merge:
                continue
            if size is not None and e.size != size:
                continue
            if proposals is not None and e.proposals != proposals:
                continue
            if threads != "any" and e.threads != threads:
                continue
            return e
        return None

    def backends(self) -> list[str]:
        """Backend names in first-seen order."""
        seen: dict[str, None] = {}
        for e in self.entries:
            seen.setdefault(e.backend, None)
        return list(seen)

    def profile_for(self, backend: str, size: int, proposals: int, threads: int | None, graph: str = "panoptic",
                    merge: str | None = None) -> ProfileResult | None:  # fmt: skip
        wanted = merge or self.native_merge
        for p in self.profiles:
            if (p.backend, p.graph, p.size, p.proposals, p.threads) == (backend, graph, size, proposals, threads) \
                    and (p.merge or self.native_merge) == wanted:
                return p
        return None


# ---------------------------------------------------------------------------------------------------------------
# Parity (written by parity.py; read tolerantly)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ParityRow:
    """One candidate of a parity run: verdict and the PQ it reached against the reference."""

    backend: str
    precision: str
    verdict: str
    reason: str = ""
    pq: float | None = None
    pq_reference: float | None = None
    delta_pq: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # tensor / decision sections as written
    merge: str | None = None  # merge path of the candidate and its reference (None: the model folder's own)


def load_parity(path: str | Path) -> list[ParityRow]:
    """The candidates of a parity JSON file ({"candidates": [...]}); unknown keys are kept in `extra`."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
        raise UserError("not a parity result (no 'candidates' list)", path)
    rows = []
    for c in data["candidates"]:
        if not isinstance(c, dict) or "backend" not in c:
            raise UserError("a parity candidate has no 'backend'", path)
        metric = c.get("metric") or {}
        rows.append(
            ParityRow(
                backend=str(c["backend"]),
                precision=str(c.get("precision", "")),
                verdict=str(c.get("verdict", "")),
                reason=str(c.get("reason") or ""),
                pq=_num(metric.get("pq")),
                pq_reference=_num(metric.get("pq_reference")),
                delta_pq=_num(metric.get("delta_pq")),
                extra={k: c[k] for k in ("tensor", "decision") if k in c},
                merge=str(c["merge"]) if c.get("merge") else None,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Evaluation runs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    """PQ of one backend at one (size, proposals) on a data split: the evaluate module's result, tagged."""

    backend: str
    size: int | None
    proposals: int | None
    pq: float
    sq: float
    rq: float
    pq_things: float | None
    pq_stuff: float | None
    miou: float | None
    n_images: int
    data: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    mask_ap: float | None = None  # COCO mask AP of the thing classes (percent); None in results without it
    mask_ap50: float | None = None
    mask_ap75: float | None = None
    merge: str | None = None  # merge path evaluated (None: the model folder's own; files before merge paths)
    mask_activation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": EVAL_FORMAT,
            "backend": self.backend,
            "size": self.size,
            "proposals": self.proposals,
            "merge": self.merge,
            "mask_activation": self.mask_activation,
            "data": self.data,
            "result": self.result,
        }

    @classmethod
    def from_result(cls, backend: str, size: int | None, proposals: int | None, result: dict[str, Any], data: str = "",
                    merge: str | None = None, mask_activation: str | None = None) -> EvalRun:  # fmt: skip
        """From `evaluate.evaluate_runner`'s dict ({"pq": {"all", "things", "stuff"...}, "miou", "n_images"})."""
        groups = result.get("pq", result)
        if not isinstance(groups, dict) or "all" not in groups:
            raise ValueError("an evaluation result has no PQ 'all' group")
        miou = result.get("miou")
        if isinstance(miou, dict):
            miou = miou.get("miou")
        ap = result.get("mask_ap") if isinstance(result.get("mask_ap"), dict) else {}
        return cls(
            backend=backend,
            size=size,
            proposals=proposals,
            pq=float(groups["all"]["pq"]),
            sq=float(groups["all"]["sq"]),
            rq=float(groups["all"]["rq"]),
            pq_things=_num((groups.get("things") or {}).get("pq")),
            pq_stuff=_num((groups.get("stuff") or {}).get("pq")),
            miou=_num(miou),
            n_images=int(result.get("n_images", groups.get("n_images", 0)) or 0),
            data=data,
            result=result,
            mask_ap=_num(ap.get("ap")),
            mask_ap50=_num(ap.get("ap50")),
            mask_ap75=_num(ap.get("ap75")),
            merge=merge,
            mask_activation=mask_activation,
        )

    def save(self, path: str | Path, force: bool = False) -> Path:
        return write_json(path, self.to_dict(), force=force)

    @classmethod
    def load(cls, path: str | Path) -> EvalRun:
        data = read_json(path)
        if not isinstance(data, dict):
            raise UserError("not an evaluation result", path)
        try:
            if data.get("format") == EVAL_FORMAT:
                return cls.from_result(str(data["backend"]), _int(data.get("size")), _int(data.get("proposals")),
                                       data["result"], str(data.get("data", "")), _str(data.get("merge")),
                                       _str(data.get("mask_activation")))  # fmt: skip
            return cls.from_result(str(data.get("backend", Path(path).stem)), None, None, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"not an evaluation result ({exc})", path) from None


# ---------------------------------------------------------------------------------------------------------------
# Pipeline record
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PipelineRecord:
    """What one `maskconver pipeline` run did: inputs, steps with their times, backends built or skipped."""

    created: str
    checkpoint: str
    checkpoint_sha256: str
    data: dict[str, Any]  # {"dir", "split", "n_images", "generated"}
    model: dict[str, Any]  # preset, input_size, num_proposals, params, macs
    steps: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "seconds", "status", "detail"}]
    backends: list[dict[str, Any]] = field(default_factory=list)  # [{"backend", "status", "reason", "hint", ...}]
    overlays: dict[str, str] = field(default_factory=dict)  # backend -> path relative to the results folder
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # what failed (builds, parity, eval, timings, steps)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PIPELINE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path | None = None) -> PipelineRecord:
        if d.get("format") != PIPELINE_FORMAT:
            raise UserError(f"not a pipeline record (expected format '{PIPELINE_FORMAT}')", path)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path, force: bool = False) -> Path:
        return write_json(path, self.to_dict(), force=force)

    @classmethod
    def load(cls, path: str | Path) -> PipelineRecord:
        data = read_json(path)
        if not isinstance(data, dict):
            raise UserError("not a pipeline record", path)
        return cls.from_dict(data, path)


# ---------------------------------------------------------------------------------------------------------------
# A results folder
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ResultsBundle:
    """Every result file of one folder, loaded."""

    root: Path
    bench: BenchResult | None = None
    parity: list[ParityRow] = field(default_factory=list)
    evals: list[EvalRun] = field(default_factory=list)
    pipeline: PipelineRecord | None = None
    overlays: dict[str, Path] = field(default_factory=dict)

    @property
    def native_merge(self) -> str:
        return self.bench.native_merge if self.bench is not None else DEFAULT_MERGE

    def _merge_matches(self, have: str | None, merge: str | None) -> bool:
        """A run's / row's merge against the one asked for (None: the model folder's own; a run without a merge
        is of the folder's own path)."""
        native = self.native_merge
        return (have or native) == (merge or native)

    def eval_for(self, backend: str, size: int | None = None, proposals: int | None = None,
                 merge: str | None = None) -> EvalRun | None:  # fmt: skip
        """The evaluation of `backend` at (size, proposals) on merge path `merge`; None in a run matches the
        model's own setting."""
        for run in self.evals:
            if run.backend != backend or not self._merge_matches(run.merge, merge):
                continue
            if size is not None and run.size not in (None, size):
                continue
            if proposals is not None and run.proposals not in (None, proposals):
                continue
            return run
        return None

    def parity_for(self, backend: str, merge: str | None = None) -> ParityRow | None:
        for row in self.parity:
            if row.backend == backend and self._merge_matches(row.merge, merge):
                return row
        return None


def results_root(path: str | Path) -> Path:
    """Accept a results folder or a pipeline output folder that holds `results/`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError("no such results folder", path)
    if (path / "results").is_dir() and not (path / BENCH_FILE).exists():
        return path / "results"
    return path


def load_results(path: str | Path) -> ResultsBundle:
    """Load a results folder; it must hold at least a bench.json (the report's backbone)."""
    root = results_root(path)
    bundle = ResultsBundle(root=root)
    bench_file = root / BENCH_FILE
    if not bench_file.is_file():
        raise UserError(f"no {BENCH_FILE} here (run `maskconver bench --json-out {root}/{BENCH_FILE}` or `maskconver pipeline`)", root)
    bundle.bench = BenchResult.load(bench_file)
    if (root / PARITY_FILE).is_file():
        bundle.parity = load_parity(root / PARITY_FILE)
    if (root / EVAL_DIR).is_dir():
        bundle.evals = [EvalRun.load(p) for p in sorted((root / EVAL_DIR).glob("*.json"))]
    if (root / PIPELINE_FILE).is_file():
        bundle.pipeline = PipelineRecord.load(root / PIPELINE_FILE)
    if (root / OVERLAY_DIR).is_dir():
        bundle.overlays = {p.stem: p for p in sorted((root / OVERLAY_DIR).glob("*.png"))}
    return bundle


def eval_key(backend: str, size: int | None, proposals: int | None, merge: str | None = None) -> str:
    """File stem of an evaluation run: 'ort-int8-static', 'ort@s256-n100', 'ort@feature' or 'ort@s256-n100@feature'
    (`merge` given for a path other than the model folder's own)."""
    key = backend if size is None and proposals is None else f"{backend}@s{size}-n{proposals}"
    return f"{key}@{merge}" if merge else key


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)

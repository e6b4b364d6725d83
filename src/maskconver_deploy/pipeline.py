"""`maskconver pipeline`: checkpoint -> data -> export -> compile everything -> parity -> eval -> bench -> overlays -> report.

Layout of one run named NAME (`--out reports/NAME`):
    reports/NAME/results/{bench.json, parity.json, eval/*.json, overlays/*.png, pipeline.json}   small, reportable
    reports/NAME/{report.md, report.html, plots/}                                                 the report
    artifacts/pipeline/NAME/{model/, data/}     the exported graphs, compiled artifacts, generated data (not kept)
Merge paths (model/postprocess.py): the checkpoint's own path goes through every step; each other path of
`--merges` (default input, feature and input-legacy) is exported into the model folder's variants/
(s<size>-n<N>-<merge>/) and built for the fp32 ONNX Runtime and TFLite backends and every OpenVINO precision (and
torch-compile runs it); it gets parity against the PyTorch reference of the same path, PQ with ONNX Runtime on the same images (eval/<backend>@<merge>.json) and
timings at the model's N and at 100 proposals, interleaved with the own path's. `input-legacy` (the `input` path's
earlier formulation, the same answer) is only timed, at 100 proposals: the report compares the post-processing
times of the two formulations measured in the same run.
Backends that cannot run here are listed as skipped with their reason and install hint; a backend whose build
fails is listed as failed and the run goes on, and so does a step that fails after the export (its error is
recorded). The run ends with the report written and `failures()` listing every build, parity verdict, evaluation,
timing and step that failed: the command exits 1 when that list is not empty.
`maskconver report --results reports/NAME` rebuilds the report.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.errors import CheckFailed, MaskconverError, UserError
from maskconver_deploy.fileio import sha256_file, write_json
from maskconver_deploy.results import (
    BENCH_FILE,
    EVAL_DIR,
    OVERLAY_DIR,
    PARITY_FILE,
    PIPELINE_FILE,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    LEGACY_MERGE,
    BenchResult,
    EvalRun,
    PipelineRecord,
    eval_key,
)
from maskconver_deploy.types import LABEL_DIVISOR

Log = Callable[[str], None]

DEFAULT_CHECKPOINT = Path("models/shapes-256.pt")
DEFAULT_CALIBRATION = Path("calibration/shapes-64")
DEFAULT_OUT = Path("reports/pipeline")
WORK_ROOT = Path("artifacts/pipeline")
DATA_SEED = 1  # the shipped model is trained on seed 0 scenes: evaluation scenes come from another seed
DEFAULT_IMAGES = 50
QUICK_IMAGES = 4
BENCH_THREADS = 2
BENCH_SIZES = (256, 384, 640)
BENCH_PROPOSALS = (100, 50, 20, 15, 10)
SWEEP_BACKENDS = ("torch", "ort")  # timed at the other sizes / proposal counts (compiling TFLite there costs minutes)
TARGET_PROPOSALS = 100  # the post-processing target is checked at 100 proposals: every fp32 runtime is timed there
MERGES = ("input", "feature", LEGACY_MERGE)  # merge paths built and measured (the checkpoint's own first)
PATH_FAMILIES = ("ort", "tflite")  # the backends another merge path is built for (fp32 only) ...
PATH_ALL_PRECISIONS = ("openvino", "torch-compile")  # ... and these in every precision built here (the fastest
# runtimes on the cheap merge path, and the compiled PyTorch baseline of that path)
TIMED_ONLY_MERGES = (LEGACY_MERGE,)  # timed for the post-processing comparison, neither checked nor evaluated
STEPS = ("data", "export", "compile", "parity", "eval", "bench", "overlays", "report")
ESSENTIAL_STEPS = ("data", "export")  # nothing after them can run without them: their failure ends the run


@dataclass
class PipelineOptions:
    checkpoint: Path = DEFAULT_CHECKPOINT
    data: Path | None = None
    split: str = "val"
    backends: str = "all"
    out: Path = DEFAULT_OUT
    n_images: int | None = None
    quick: bool = False
    force: bool = False
    calib: Path | None = DEFAULT_CALIBRATION
    threads: int = BENCH_THREADS
    sizes: Sequence[int] | None = None
    proposals: Sequence[int] | None = None
    work: Path | None = None
    merges: Sequence[str] | None = None  # None: MERGES


@dataclass
class BackendState:
    """One backend through the run: built (or why not), artifacts, compile time."""

    name: str
    status: str = STATUS_OK
    reason: str = ""
    hint: str = ""
    compile_s: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)
    merge: str = ""  # merge path of the artifacts

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.name, "merge": self.merge, "status": self.status, "reason": self.reason,
                "hint": self.hint, "compile_s": round(self.compile_s, 2), "artifacts": self.artifacts}  # fmt: skip


class Steps:
    """Times each step, keeps its status line, drives the one progress display.

    A step that raises is recorded as failed with its error. The essential steps (data, export) re-raise: nothing
    after them could run. Any later step's failure, an import error included, is recorded and the run goes on, so
    the report still shows what did run; `Pipeline.failures()` then makes the command exit 1.
    """

    def __init__(self, log: Log, bar: Any | None = None) -> None:
        self.log = log
        self.bar = bar
        self.records: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], str]) -> None:
        self.log(f"[{len(self.records) + 1}/{len(STEPS)}] {name}")
        start = time.perf_counter()
        status, detail = STATUS_OK, ""
        try:
            detail = fn() or ""
        except Exception as exc:  # noqa: BLE001 - recorded; essential steps re-raise
            status, detail = STATUS_FAILED, f"{type(exc).__name__}: {_first_line(exc)}"
            if name in ESSENTIAL_STEPS:
                self.records.append({"name": name, "status": status, "seconds": round(time.perf_counter() - start, 2),
                                     "detail": detail})  # fmt: skip
                if isinstance(exc, MaskconverError):
                    raise
                raise CheckFailed(f"pipeline step {name} failed: {detail}") from exc
            self.log(f"    {name} failed: {detail}")
        seconds = time.perf_counter() - start
        self.records.append({"name": name, "status": status, "seconds": round(seconds, 2), "detail": detail})
        self.log(f"    {name}: {detail} ({seconds:.1f} s)")
        if self.bar is not None:
            self.bar.update(1, status=f"{name} done")


# ---------------------------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------------------------
def overlay(image: np.ndarray, panoptic: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.55) -> np.ndarray:
    """uint8 RGB: each segment tinted with its class colour (instances shaded apart), boundaries white, VOID dimmed."""
    palette = np.asarray(colors, dtype=np.float32).reshape(-1, 3)
    classes = panoptic // LABEL_DIVISOR - 1
    instance = panoptic % LABEL_DIVISOR
    valid = (panoptic > 0) & (classes < len(palette))
    tint = palette[np.clip(classes, 0, len(palette) - 1)]
    shade = 0.7 + 0.3 * ((instance * 7) % 5)[..., None] / 4.0
    tint = np.clip(tint * np.where(instance[..., None] > 0, shade, 1.0), 0, 255)
    base = image.astype(np.float32)
    out = np.where(valid[..., None], (1 - alpha) * base + alpha * tint, 0.5 * base)
    edge = np.zeros(panoptic.shape, dtype=bool)
    edge[:, 1:] |= panoptic[:, 1:] != panoptic[:, :-1]
    edge[1:, :] |= panoptic[1:, :] != panoptic[:-1, :]
    out[edge] = 255.0
    return out.astype(np.uint8)


def _save_png(path: Path, array: np.ndarray, force: bool) -> Path:
    from PIL import Image

    from maskconver_deploy.fileio import atomic_path

    with atomic_path(path, force=force) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class Pipeline:
    """One pipeline run; each step is a method, called in order by `run`."""

    def __init__(self, options: PipelineOptions, log: Log) -> None:
        self.o = options
        self.log = log
        self.out = Path(options.out)
        self.results = self.out / "results"
        self.work = Path(options.work) if options.work else WORK_ROOT / self.out.name
        self.model_dir = self.work / "model"
        self.states: dict[str, BackendState] = {}
        self.data_info: dict[str, Any] = {}
        self.records: list[Any] = []
        self.meta: Any = None
        self.dataset_meta: Any = None
        self.bench: BenchResult | None = None
        self.parity: dict[str, Any] | None = None
        self.evals: dict[str, EvalRun] = {}
        self.overlays: dict[str, str] = {}
        self.calib: Path | None = None
        self.eval_failures: dict[str, str] = {}
        self.calib_problem = ""
        self.step_records: list[dict[str, Any]] = []
        self.path_states: dict[str, dict[str, BackendState]] = {}  # other merge path -> backend -> its build
        self.path_dirs: dict[str, Path] = {}  # other merge path -> its variant folder at the model's own setting
        self.path_failures: list[str] = []  # builds, parity runs, evaluations of the other paths that failed

    # -- helpers ------------------------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        if self.o.n_images is not None:
            return self.o.n_images
        return QUICK_IMAGES if self.o.quick else DEFAULT_IMAGES

    @staticmethod
    def precision_of(name: str) -> str:
        from maskconver_deploy.backends import parse_backend

        return parse_backend(name).precision.value

    def ok_backends(self) -> list[str]:
        return [name for name, state in self.states.items() if state.status == STATUS_OK]

    @property
    def native_merge(self) -> str:
        return str(self.meta.merge) if self.meta is not None else MERGES[0]

    def other_merges(self) -> list[str]:
        """Merge paths besides the checkpoint's own, in the order asked for."""
        return [m for m in dict.fromkeys(self.o.merges or MERGES) if m != self.native_merge]

    def checked_merges(self) -> list[str]:
        """Other merge paths that get parity and evaluation (not only timings)."""
        return [m for m in self.other_merges() if m not in TIMED_ONLY_MERGES]

    def path_backends(self) -> list[str]:
        """What the other merge paths are built for: the fp32 ONNX Runtime / TFLite backends built here, every
        OpenVINO precision built here, and torch-compile (PATH_FAMILIES, PATH_ALL_PRECISIONS)."""
        from maskconver_deploy.backends import parse_backend

        return [n for n in self.ok_backends()
                if (parse_backend(n).family in PATH_FAMILIES and self.precision_of(n) == "fp32")
                or parse_backend(n).family in PATH_ALL_PRECISIONS]  # fmt: skip

    def path_ok(self, merge: str) -> list[str]:
        return [n for n, s in self.path_states.get(merge, {}).items() if s.status == STATUS_OK]

    def check_inputs(self) -> None:
        if not self.o.checkpoint.is_file():
            raise UserError("no such checkpoint (train one with `make model`, or pass --checkpoint)", self.o.checkpoint)
        if self.n_images < 1:
            raise UserError(f"--n must be at least 1, got {self.n_images}")
        for path in (self.out / "report.md", self.out / "report.html", self.results):
            if path.exists() and not self.o.force:
                raise UserError("already exists; pass --force to overwrite it", path)
        if self.o.data is not None and not Path(self.o.data).is_dir():
            raise UserError("no such data folder", self.o.data)

    # -- steps --------------------------------------------------------------------------------------------------
    def step_data(self) -> str:
        from maskconver_deploy.data import load_split
        from maskconver_deploy.model.checkpoint import load_checkpoint

        model, categories, _ = load_checkpoint(self.o.checkpoint)
        size = int(model.spec.input_size[0])
        if self.o.data is None:
            from maskconver_deploy.data.synthetic import write_dataset

            target = self.work / "data"
            write_dataset(target, n=2 * self.n_images, size=size, seed=DATA_SEED, val_fraction=0.5, force=True)
            data_dir, split, generated = target, "val", True
        else:
            data_dir, split, generated = Path(self.o.data), self.o.split, False
        self.dataset_meta, records = load_split(data_dir, split)
        self.records = list(records[: self.n_images])
        if not self.records:
            raise UserError(f"split '{split}' has no images", data_dir)
        self.data_info = {"dir": str(data_dir), "split": split, "n_images": len(self.records), "generated": generated,
                          "seed": DATA_SEED if generated else None}  # fmt: skip
        what = f"generated {len(self.records)} synthetic scenes (seed {DATA_SEED})" if generated else f"{len(self.records)} images"
        return f"{what} from {data_dir} ({split})"

    def step_export(self) -> str:
        from maskconver_deploy import export as export_mod
        from maskconver_deploy.modeldir import ModelDir

        export_mod.export(self.o.checkpoint, self.model_dir, force=True)
        folder = ModelDir(self.model_dir)
        self.meta = folder.meta
        graphs = [g for g in ("panoptic", "raw") if folder.onnx_path(g).is_file()]
        return f"{self.model_dir} ({', '.join(graphs)} graphs)"

    def step_compile(self) -> str:
        from maskconver_deploy.backends import backend_module, parse_backend
        from maskconver_deploy.bench import backend_status, needs_calibration, resolve_backends
        from maskconver_deploy.modeldir import ModelDir

        folder = ModelDir(self.model_dir)
        names = resolve_backends(self.o.backends)
        if self.o.calib is not None and Path(self.o.calib).is_dir():
            self.calib = Path(self.o.calib)
            try:  # a broken set fails each int8 build that reads it (below); parity then checks no hashes against it
                from maskconver_deploy.calibration import load_calibration

                load_calibration(self.calib)
            except MaskconverError as exc:
                self.calib_problem = _first_line(exc)
        for name in names:
            state = self.states[name] = BackendState(name)
            try:  # the toolkit's own backend module failing to import is a defect, not "cannot run here"
                backend_module(parse_backend(name).family)
            except ImportError as exc:
                state.status, state.reason = STATUS_FAILED, f"the backend module cannot be imported: {_first_line(exc)}"
                continue
            _, reason, hint = backend_status(name)
            if reason:
                state.status, state.reason, state.hint = STATUS_SKIPPED, reason, hint
                self.log(f"    skipped {name}: {reason}" + (f" ({hint})" if hint else ""))
                continue
            if name.startswith("torch"):
                continue
            if needs_calibration(name) and self.calib is None:
                state.status = STATUS_SKIPPED
                state.reason = f"needs a calibration set; {self.o.calib or 'none'} is not a folder"
                state.hint = "maskconver calib ... (see README), or pass --calib"
                continue
            start = time.perf_counter()
            for graph in ("panoptic", "raw"):
                try:
                    path = folder.compile(name, graph=graph, calib=self.calib, force=True)
                    state.artifacts[graph] = str(path)
                except MaskconverError as exc:
                    if graph == "panoptic":
                        state.status, state.reason = STATUS_FAILED, _first_line(exc)
                        break
                    state.artifacts["raw_error"] = _first_line(exc)
                except Exception as exc:  # a converter crash is this backend's failure, not the run's
                    if graph == "panoptic":
                        state.status, state.reason = STATUS_FAILED, f"{type(exc).__name__}: {_first_line(exc)}"
                        break
                    state.artifacts["raw_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
            state.compile_s = time.perf_counter() - start
            self.log(f"    {name}: {state.status} ({state.compile_s:.1f} s){' ' + state.reason if state.reason else ''}")
        for state in self.states.values():
            state.merge = self.native_merge
        built = [n for n in self.ok_backends() if not n.startswith("torch")]
        paths = self._compile_paths()
        return f"{len(built)} built, {sum(s.status == STATUS_SKIPPED for s in self.states.values())} skipped, " \
               f"{sum(s.status == STATUS_FAILED for s in self.states.values())} failed" + paths

    def _compile_paths(self) -> str:
        """Export and build the other checked merge paths at the model's own size and N (fp32 ORT / TFLite)."""
        from maskconver_deploy.bench import prepare_variant
        from maskconver_deploy.modeldir import ModelDir

        size, n = int(self.meta.input_size[0]), int(self.meta.num_proposals)
        names = self.path_backends()
        parts = []
        for merge in self.checked_merges():
            start = time.perf_counter()
            states = self.path_states[merge] = {name: BackendState(name, merge=merge) for name in names}
            try:
                calib = None if self.calib_problem else self.calib  # the int8 OpenVINO build reads it
                folder, problems = prepare_variant(self.model_dir, size, n, names, calib, lambda m: self.log("    " + m),
                                                   merge=merge, graphs=("panoptic",))  # fmt: skip
                # the raw graphs of the fp32 builds: parity's merge check runs the reference merge on their tensors
                fp32 = [name for name in names if name not in problems and self.precision_of(name) == "fp32"]
                prepare_variant(self.model_dir, size, n, fp32, calib, lambda m: self.log("    " + m), merge=merge,
                                graphs=("raw",))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - this path's failure; the own path goes on
                for state in states.values():
                    state.status, state.reason = STATUS_FAILED, f"export of the {merge} path failed: {_first_line(exc)}"
                self.path_failures.append(f"export {merge} path: {_first_line(exc)}")
                continue
            self.path_dirs[merge] = folder
            variant = ModelDir(folder)
            for name, state in states.items():
                if name in problems:
                    state.status, state.reason = problems[name]
                else:
                    state.artifacts["panoptic"] = str(variant.artifact_path(name, "panoptic"))
            seconds = time.perf_counter() - start
            for state in states.values():
                state.compile_s = seconds / max(len(states), 1)
            parts.append(f"{merge} path: {len(self.path_ok(merge))}/{len(names)} built")
        return ("; " + ", ".join(parts)) if parts else ""

    def step_parity(self) -> str:
        from maskconver_deploy import parity as parity_mod

        candidates = [n for n in self.ok_backends() if n != "torch"]
        calib = None if self.calib_problem else self.calib
        result = parity_mod.run_parity(self.model_dir, candidates, records=self.records, meta=self.dataset_meta,
                                       calib=calib, threads=self.o.threads)  # fmt: skip
        for c in result.get("candidates", []):
            c["merge"] = self.native_merge
        result["merge"] = self.native_merge
        result["paths"] = {}
        self.parity = result
        write_json(self.results / PARITY_FILE, result, force=True)
        for merge in self.checked_merges():
            names = self.path_ok(merge)
            if not names or merge not in self.path_dirs:
                continue
            try:  # fp32 parity of the path's artifacts against the PyTorch reference of the same path
                other = parity_mod.run_parity(self.path_dirs[merge], names, records=self.records,
                                              meta=self.dataset_meta, threads=self.o.threads)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - recorded; the own path's verdicts stand
                self.path_failures.append(f"parity {merge} path: {type(exc).__name__}: {_first_line(exc)}")
                continue
            for c in other.get("candidates", []):
                c["merge"] = merge
                result["candidates"].append(c)
            result["paths"][merge] = {"model_dir": other.get("model_dir"), "reference_pq": other.get("reference_pq"),
                                      "n_images": other.get("n_images")}  # fmt: skip
        write_json(self.results / PARITY_FILE, result, force=True)
        verdicts = [c.get("verdict", "?") for c in result.get("candidates", [])]
        return ", ".join(f"{v} x{verdicts.count(v)}" for v in sorted(set(verdicts))) or "no candidates"

    def step_eval(self) -> str:
        from maskconver_deploy import backends
        from maskconver_deploy.evaluate import evaluate_runner

        done = []
        for name in self.ok_backends():
            try:
                runner = backends.open_runner(name, model_dir=self.model_dir, threads=self.o.threads)
                with runner:
                    result = evaluate_runner(runner, self.records, self.dataset_meta)
            except Exception as exc:  # noqa: BLE001 - this backend's failure; the others are evaluated
                self.eval_failures[name] = f"{type(exc).__name__}: {_first_line(exc)}"
                self.log(f"    eval {name} failed: {self.eval_failures[name]}")
                continue
            run = EvalRun.from_result(name, int(self.meta.input_size[0]), int(self.meta.num_proposals), result,
                                      self.data_info.get("dir", ""), self.native_merge,
                                      str(self.meta.mask_activation))  # fmt: skip
            self.evals[name] = run
            run.save(self.results / EVAL_DIR / f"{eval_key(name, None, None)}.json", force=True)
            done.append(f"{name} {run.pq:.1f}")
        done += self._eval_paths()
        failed = f"; {len(self.eval_failures)} failed" if self.eval_failures else ""
        return "PQ " + ", ".join(done) + failed

    def _eval_paths(self) -> list[str]:
        """PQ of each other checked merge path with ONNX Runtime (fp32), on the same images."""
        from maskconver_deploy import backends
        from maskconver_deploy.evaluate import evaluate_runner

        done = []
        for merge in self.checked_merges():
            if "ort" not in self.path_ok(merge):
                continue
            key = eval_key("ort", None, None, merge)
            try:
                with backends.open_runner("ort", model_dir=self.path_dirs[merge], threads=self.o.threads) as runner:
                    result = evaluate_runner(runner, self.records, self.dataset_meta)
                    activation = str(runner.meta.mask_activation)
            except Exception as exc:  # noqa: BLE001 - this path's failure; the others are evaluated
                self.eval_failures[key] = f"{type(exc).__name__}: {_first_line(exc)}"
                continue
            run = EvalRun.from_result("ort", int(self.meta.input_size[0]), int(self.meta.num_proposals), result,
                                      self.data_info.get("dir", ""), merge, activation)  # fmt: skip
            self.evals[key] = run
            run.save(self.results / EVAL_DIR / f"{key}.json", force=True)
            done.append(f"ort [{merge}] {run.pq:.1f}")
        return done

    def _bench_plan(self) -> tuple[list[int] | None, list[int] | None]:
        native_size, native_n = int(self.meta.input_size[0]), int(self.meta.num_proposals)
        if self.o.quick:
            return list(self.o.sizes) if self.o.sizes else None, list(self.o.proposals) if self.o.proposals else None
        sizes = list(self.o.sizes or BENCH_SIZES)
        proposals = list(self.o.proposals or BENCH_PROPOSALS)
        sizes = [native_size] + [s for s in sizes if s != native_size]
        proposals = [native_n] + [n for n in proposals if n != native_n]
        return sizes, proposals

    def step_bench(self) -> str:
        from maskconver_deploy.bench import QUICK_RUNS, QUICK_WARMUP, BenchOptions, run_bench

        from maskconver_deploy.bench import plan_configs

        sizes, proposals = self._bench_plan()
        names = self.ok_backends()
        native = (int(self.meta.input_size[0]), int(self.meta.num_proposals))
        per_config: dict[tuple[int, int], list[str]] = {}
        for config in plan_configs(native, sizes, proposals, grid=False):
            if config == (native[0], TARGET_PROPOSALS):  # the post-processing target: every fp32 runtime
                per_config[config] = [n for n in names if self.precision_of(n) == "fp32"]
            elif config != native:
                per_config[config] = [n for n in names if n in SWEEP_BACKENDS]
        merges, merge_configs = self._bench_merges(native, sizes, proposals)
        path_names = self.path_backends()
        for merge, where in merge_configs.items():
            for config in where:
                per_config[(config[0], config[1], merge)] = path_names
        options = BenchOptions(
            backends=names,
            config_backends=per_config,
            sizes=sizes,
            proposals=proposals,
            threads=[self.o.threads],
            warmup=QUICK_WARMUP if self.o.quick else 10,
            runs=QUICK_RUNS if self.o.quick else 50,
            profile=True,
            calib=self.calib,
            peak_matrix=512 if self.o.quick else 1536,
            merges=merges,
            merge_configs=merge_configs,
        )
        self.bench = run_bench(self.model_dir, options, log=lambda m: self.log("    " + m))
        self.bench.save(self.results / BENCH_FILE, force=True)
        self._eval_variants()
        timed = sum(e.ok for e in self.bench.entries)
        return f"{timed} timings, {len(self.bench.profiles)} profiles, {self.bench.seconds:.0f} s"

    def _bench_merges(self, native: tuple[int, int], sizes: list[int] | None,
                      proposals: list[int] | None) -> tuple[list[str], dict[str, list[tuple[int, int]]]]:  # fmt: skip
        """Merge paths to time and where: a checked path at the model's N (its PQ's latency) and at 100 proposals
        (the post-processing target), input-legacy at 100 proposals; --quick: at the model's own setting only."""
        from maskconver_deploy.bench import plan_configs

        planned = plan_configs(native, sizes, proposals, grid=False)
        target = (native[0], TARGET_PROPOSALS)
        merges = [self.native_merge]
        where: dict[str, list[tuple[int, int]]] = {}
        for merge in self.other_merges():
            if merge in TIMED_ONLY_MERGES:
                chosen = [target] if target in planned else [native]
            else:
                if merge not in self.path_dirs or not self.path_ok(merge):
                    continue  # not built (its failure is recorded): not timed
                chosen = [c for c in dict.fromkeys([native, target]) if c in planned]
            merges.append(merge)
            where[merge] = chosen
        return merges, where

    def _eval_variants(self) -> None:
        """PQ at the other proposal counts (paper Table 3), with the fastest exact fp32 runtime there."""
        from maskconver_deploy import backends
        from maskconver_deploy.bench import VARIANTS_DIR, variant_name
        from maskconver_deploy.evaluate import evaluate_runner

        assert self.bench is not None
        size = int(self.meta.input_size[0])
        counts = sorted({e.proposals for e in self.bench.entries if e.size == size and e.proposals != self.meta.num_proposals
                         and e.merge == self.native_merge})
        evaluator = "ort" if "ort" in self.ok_backends() else "torch"
        for n in counts:
            folder = self.model_dir / VARIANTS_DIR / variant_name(size, n)
            if not folder.is_dir():
                continue
            runner = backends.open_runner(evaluator, model_dir=folder, threads=self.o.threads)
            with runner:
                result = evaluate_runner(runner, self.records, self.dataset_meta)
            run = EvalRun.from_result(evaluator, size, n, result, self.data_info.get("dir", ""), self.native_merge,
                                      str(self.meta.mask_activation))  # fmt: skip
            run.save(self.results / EVAL_DIR / f"{eval_key(evaluator, size, n)}.json", force=True)
            self.log(f"    PQ at {n} proposals ({evaluator}): {run.pq:.2f}")

    def step_overlays(self) -> str:
        from maskconver_deploy import backends
        from maskconver_deploy.data import load_example

        record = self.records[0]
        image, gt_ids = load_example(record)
        colors = [c.color for c in self.meta.categories]
        gt = self._gt_panoptic(gt_ids, record)
        folder = self.results / OVERLAY_DIR
        _save_png(folder / "0-ground-truth.png", overlay(image, gt, colors), force=True)
        self.overlays["ground truth"] = f"{OVERLAY_DIR}/0-ground-truth.png"
        for name in self.ok_backends():
            try:
                runner = backends.open_runner(name, model_dir=self.model_dir, threads=self.o.threads)
                with runner:
                    out = runner.predict(image)
            except Exception as exc:  # noqa: BLE001 - the evaluation of the same backend names it as failed
                self.log(f"    overlay {name} failed: {type(exc).__name__}: {_first_line(exc)}")
                continue
            _save_png(folder / f"{name}.png", overlay(image, out.panoptic, colors), force=True)
            self.overlays[name] = f"{OVERLAY_DIR}/{name}.png"
        return f"{len(self.overlays)} overlays of {Path(str(record.image_path)).name}"

    def _gt_panoptic(self, ids: np.ndarray, record: Any) -> np.ndarray:
        """Ground truth in the model's encoding ((class + 1) * divisor + instance), for drawing."""
        out = np.zeros(ids.shape, dtype=np.int64)
        for index, seg in enumerate(record.segments, start=1):
            cls = self.dataset_meta.class_index(seg.category_id)
            isthing = self.dataset_meta.categories[cls].isthing
            out[ids == seg.id] = (cls + 1) * LABEL_DIVISOR + (index if isthing else 0)
        return out

    def step_report(self) -> str:
        from maskconver_deploy.report import write_report

        written = write_report(self.results, self.out, force=True)
        return f"{written['markdown']}, {written['html']}"

    def failures(self) -> list[str]:
        """Everything that failed in this run (a build this machine can do, a parity verdict, an evaluation, a
        timing of an artifact that exists, a step), one line each; empty when the run is sound."""
        lines = [f"step {r['name']}: {r.get('detail', '')}" for r in self.step_records if r.get("status") == STATUS_FAILED]
        lines += [f"build {s.name}: {s.reason}" for s in self.states.values() if s.status == STATUS_FAILED]
        for c in (self.parity or {}).get("candidates", []):
            if c.get("verdict") in ("fail", "error"):
                lines.append(f"parity {c.get('backend')}: {c.get('verdict')}: {c.get('reason', '')}")
        lines += [f"eval {name}: {reason}" for name, reason in self.eval_failures.items()]
        lines += list(self.path_failures)
        lines += [f"build {s.name} [{m}]: {s.reason}" for m, states in self.path_states.items()
                  for s in states.values() if s.status == STATUS_FAILED]  # fmt: skip
        if self.bench is not None:
            seen = set()
            for e in self.bench.entries:
                if e.status == STATUS_FAILED and (e.backend, e.graph, e.merge) not in seen:
                    seen.add((e.backend, e.graph, e.merge))
                    lines.append(f"bench {e.backend} ({e.graph}, {e.size}px, N={e.proposals}, merge {e.merge}): {e.reason}")
        return lines

    # -- driver -------------------------------------------------------------------------------------------------
    def record(self, steps: list[dict[str, Any]], seconds: float) -> PipelineRecord:
        model = {}
        if self.meta is not None:
            model = {"preset": self.meta.preset, "input_size": list(self.meta.input_size), "num_proposals": self.meta.num_proposals,
                     "merge": self.native_merge, "mask_activation": str(self.meta.mask_activation)}
        if self.bench is not None:
            model |= {"params": self.bench.model.get("params"), "macs": self.bench.model.get("macs")}
        return PipelineRecord(
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            checkpoint=str(self.o.checkpoint),
            checkpoint_sha256=sha256_file(self.o.checkpoint),
            data=self.data_info,
            model=model,
            steps=steps,
            backends=[s.to_dict() for s in self.states.values()]
            + [s.to_dict() for states in self.path_states.values() for s in states.values()],
            overlays=self.overlays,
            options={"backends": self.o.backends, "quick": self.o.quick, "threads": self.o.threads,
                     "merges": [self.native_merge, *self.other_merges()] if self.meta is not None else list(self.o.merges or MERGES),
                     "calibration": str(self.calib) if self.calib else None, "work": str(self.work)},  # fmt: skip
            seconds=round(seconds, 2),
            failures=self.failures(),
        )

    def run(self, bar: Any | None = None) -> PipelineRecord:
        self.check_inputs()
        started = time.perf_counter()
        if self.results.exists():
            shutil.rmtree(self.results)
        self.results.mkdir(parents=True)
        steps = Steps(self.log, bar)
        self.step_records = steps.records
        steps.run("data", self.step_data)
        steps.run("export", self.step_export)
        steps.run("compile", self.step_compile)
        steps.run("parity", self.step_parity)
        steps.run("eval", self.step_eval)
        steps.run("bench", self.step_bench)
        steps.run("overlays", self.step_overlays)
        # the record goes in before the report so the report can show the steps; rewritten once the report is done
        self.record(steps.records, time.perf_counter() - started).save(self.results / PIPELINE_FILE, force=True)
        steps.run("report", self.step_report)
        record = self.record(steps.records, time.perf_counter() - started)
        record.save(self.results / PIPELINE_FILE, force=True)
        return record


def summary_rows(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The terminal's final table: one row per (backend, merge path) built or skipped."""
    from maskconver_deploy.report import model_proposals, model_size

    rows = []
    bench = pipeline.bench
    parity = {(c.get("backend"), c.get("merge") or pipeline.native_merge): c
              for c in (pipeline.parity or {}).get("candidates", [])}  # fmt: skip
    ref = pipeline.evals.get("torch")
    states = [(pipeline.native_merge, s) for s in pipeline.states.values()]
    states += [(m, s) for m, by_name in pipeline.path_states.items() for s in by_name.values()]
    for merge, state in states:
        name = state.name
        row: dict[str, Any] = {"backend": name, "merge": merge, "status": state.status}
        if state.status != STATUS_OK:
            row["note"] = state.reason + (f" ({state.hint})" if state.hint else "")
            rows.append(row)
            continue
        native = merge == pipeline.native_merge
        run = pipeline.evals.get(name if native else eval_key(name, None, None, merge))
        row["PQ"] = run.pq if run else None
        row["ΔPQ"] = (run.pq - ref.pq) if run and ref else None
        row["parity"] = parity.get((name, merge), {}).get("verdict", "reference" if name == "torch" else "-")
        if bench is not None:
            e = bench.find(name, "panoptic", model_size(bench), model_proposals(bench), pipeline.o.threads, merge)
            if e is not None:
                row["median ms"] = e.median_ms
                row["vs torch"] = e.speedup_vs_torch
                row["vs torch-compile"] = e.speedup_vs_torch_compile
                row["MB"] = (e.artifact_bytes or 0) / 1e6
        rows.append(row)
    return rows

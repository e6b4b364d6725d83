"""The toolkit as a Python library: what the `maskconver` commands do, as functions with the same options.

    import maskconver_deploy
    from maskconver_deploy import api

    with maskconver_deploy.load("models/NAME", backend="ort") as model:   # or a checkpoint .pt, backend="torch"
        answer = model.predict("photo.jpg")                                 # a path or a uint8 RGB array
    api.export(checkpoint, out, size=None, proposals=None, output=None, merge=None, mask_activation=None, force=False)
    api.compile(model_dir, backend, precision=None, calib=None, graph="all", workspace_gb=None, force=False)
    api.parity(model_dir, reference="torch", candidates="all", data=None, split="val", n=None, threads=None, ...)
    api.evaluate(model_dir=None, backend=None, data=None, ... | gt_json=..., gt_dir=..., pred_json=..., pred_dir=...)
    api.bench(model_dir, backends="torch,ort", sizes=None, proposals=None, merge=None, threads=None, runs=50, ...)

The functions live here, not at the package's top level, because `maskconver_deploy.export`, `.parity`,
`.evaluate` and `.bench` are the library modules of those names. Every import is inside a function, so
`import maskconver_deploy` stays light. Bad input raises `errors.UserError` (the commands' exit code 2); a check
that ran is returned as data (parity verdicts, eval numbers), never raised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.errors import UserError

__all__ = ["Prediction", "Predictor", "load", "export", "compile", "parity", "evaluate", "bench", "segments_of"]

PathLike = str | Path
GRAPH_CHOICES = ("panoptic", "raw", "semantic", "all")


def backend_name(backend: str, precision: str | None) -> str:
    """--backend ort --precision int8-static -> 'ort-int8-static'; a precision in both places must agree."""
    from maskconver_deploy.backends import BackendName, parse_backend
    from maskconver_deploy.types import Precision

    parsed = parse_backend(backend)
    if precision is None:
        return str(parsed)
    try:
        wanted = Precision(precision.strip().lower())
    except ValueError:
        choices = ", ".join(p.value for p in Precision)
        raise UserError(f"unknown --precision '{precision}'; use one of {choices}") from None
    if parsed.precision is not Precision.FP32 and parsed.precision is not wanted:
        raise UserError(f"--backend {backend} already says {parsed.precision.value}, "
                        f"but --precision says {wanted.value}")  # fmt: skip
    return str(BackendName(parsed.family, wanted))


# ---------------------------------------------------------------------------------------------------------------
# load / predict
# ---------------------------------------------------------------------------------------------------------------
def segments_of(answer: Any, categories: Sequence[Any], label_divisor: int = 1000) -> list[dict[str, Any]]:
    """The segments of a panoptic answer (`types.PanopticOutput`): id, category_id (the data set's), category
    name, isthing, iscrowd 0, area, bbox [x, y, w, h] and score (the proposal's; stuff: its class's best)."""
    from maskconver_deploy.data.coco_panoptic import segment_stats

    scores = {seg.id: seg.score for seg in answer.segments([c.isthing for c in categories])}
    out = []
    for seg_id, (area, bbox) in segment_stats(answer.panoptic).items():
        category = categories[seg_id // label_divisor - 1]
        out.append({
            "id": int(seg_id), "category_id": int(category.id), "category_name": category.name,
            "isthing": int(category.isthing), "iscrowd": 0, "area": int(area), "bbox": [int(v) for v in bbox],
            "score": round(float(scores.get(seg_id, 0.0)), 6),
        })  # fmt: skip
    return out


@dataclass
class Prediction:
    """The panoptic answer for one image, at the image's size.

    `panoptic`: int32 [H, W] segment ids, (class index + 1) * 1000 + instance, 0 = VOID; `segments`: one dict
    per segment in the map (`segments_of`); `scores`, `classes`, `centers`: the N proposals behind it.
    """

    panoptic: np.ndarray
    segments: list[dict[str, Any]]
    scores: np.ndarray
    classes: np.ndarray
    centers: np.ndarray
    categories: list[Any] = field(repr=False, default_factory=list)

    def category_map(self) -> np.ndarray:
        """int32 [H, W]: the class index of each pixel, -1 for VOID."""
        return np.where(self.panoptic > 0, self.panoptic // 1000 - 1, -1).astype(np.int32)

    def category_names(self) -> list[str]:
        """The names of the categories present, sorted."""
        return sorted({s["category_name"] for s in self.segments})


class Predictor:
    """A model on one backend, opened once, predicting image after image. Use `with`, or call `close()`."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._open = False

    @property
    def backend(self) -> str:
        return str(self._runner.name)

    @property
    def meta(self) -> Any:
        """The model's metadata (`types.ModelMeta`): preset, categories, input size, thresholds."""
        return self._runner.meta

    @property
    def last_latency_ms(self) -> float:
        """The backend call of the last prediction, in milliseconds."""
        return float(self._runner.last_latency_s) * 1000.0

    def open(self) -> Predictor:
        if not self._open:
            self._runner.open()
            self._open = True
        return self

    def close(self) -> None:
        if self._open:
            self._runner.close()
            self._open = False

    def __enter__(self) -> Predictor:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def predict(self, image: np.ndarray | PathLike) -> Prediction:
        """The panoptic answer for `image`: a uint8 RGB array [H, W, 3] or an image file (the toolkit's input
        policy: EXIF rotation, grayscale / alpha / 16-bit converted, large files decoded reduced)."""
        import dataclasses

        from maskconver_deploy.data.preprocess import load_image_fitted, resize_nearest

        self.open()
        meta = self.meta
        if isinstance(image, (str, Path)):
            array, shown = load_image_fitted(image, tuple(meta.input_size))
        else:
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
                raise UserError(f"predict takes a uint8 RGB image [H, W, 3] or a path, got {array.dtype} {array.shape}")
            shown = array.shape[:2]
        answer = self._runner.predict(array)
        if tuple(answer.panoptic.shape) != tuple(shown):
            answer = dataclasses.replace(answer, panoptic=resize_nearest(answer.panoptic, shown))
        categories = list(meta.categories)
        return Prediction(panoptic=answer.panoptic, segments=segments_of(answer, categories, meta.label_divisor),
                          scores=answer.scores, classes=answer.classes, centers=answer.centers,
                          categories=categories)  # fmt: skip


def load(model_dir_or_checkpoint: PathLike, backend: str = "ort", threads: int | None = None) -> Predictor:
    """A `Predictor` for a model folder (written by `export`; any backend compiled into it) or a checkpoint `.pt`
    (the PyTorch reference: backend "torch" or "torch-cuda"). The runner opens on first use or `with`."""
    from maskconver_deploy.backends import open_runner, parse_backend

    source = Path(model_dir_or_checkpoint)
    name = str(parse_backend(backend))
    if source.is_dir():
        return Predictor(open_runner(name, model_dir=source, threads=threads))
    if source.is_file():
        if not name.startswith("torch"):
            raise UserError(f"a checkpoint runs on the PyTorch reference (backend 'torch' or 'torch-cuda'), not "
                            f"'{name}'; export it to a model folder for other backends", source)  # fmt: skip
        return Predictor(open_runner(name, checkpoint=source, threads=threads))
    raise UserError("no such model folder or checkpoint", source)


# ---------------------------------------------------------------------------------------------------------------
# The commands as functions
# ---------------------------------------------------------------------------------------------------------------
def export(checkpoint: PathLike, out: PathLike, *, size: int | None = None, proposals: int | None = None,
           output: Sequence[str] | str | None = None, merge: str | None = None, mask_activation: str | None = None,
           force: bool = False, on_step: Callable[[str], None] | None = None) -> Any:  # fmt: skip
    """`maskconver export`: a checkpoint -> model folder `out` (graphs verified against PyTorch); returns its
    `ModelDir`. `output` is the graphs (panoptic, raw, semantic; default panoptic and raw); `merge` the merge
    path (input, feature, official, input-legacy) and `mask_activation` its activation (default: the path's)."""
    from maskconver_deploy import export as export_mod

    return export_mod.export(Path(checkpoint), Path(out), size=size, proposals=proposals,
                             graphs=export_mod.parse_graphs(output), force=force, merge=merge,
                             mask_activation=mask_activation, on_step=on_step)  # fmt: skip


def compile(model_dir: PathLike, backend: str, *, precision: str | None = None, calib: PathLike | None = None,
            graph: str = "all", workspace_gb: float | None = None, force: bool = False,
            on_step: Callable[[str], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """`maskconver compile`: build `backend` (a family or a full name, e.g. "ort" + precision "int8-static", or
    "tflite-fp16") for the folder's graphs (`graph`: all, panoptic, raw, semantic). Returns one dict per graph:
    backend, graph, path, file, bytes, seconds and the build record."""
    import time

    from maskconver_deploy.backends import require_backend
    from maskconver_deploy.fileio import read_json
    from maskconver_deploy.modeldir import ModelDir, record_path

    if graph not in GRAPH_CHOICES:
        raise UserError(f"unknown --graph '{graph}'; use one of {', '.join(GRAPH_CHOICES)}")
    name = backend_name(backend, precision)
    parsed, _ = require_backend(name)  # an unavailable backend is explained before anything else
    if workspace_gb is not None and parsed.family != "tensorrt":
        raise UserError("--workspace-gb applies to --backend tensorrt only")
    if parsed.precision.value in ("int8-static", "int8") and calib is None:
        raise UserError(f"{name} needs a calibration set: pass --calib calibration/NAME (see `maskconver calib make`)")
    folder = ModelDir(Path(model_dir))
    graphs = folder.graphs() if graph == "all" else [graph]
    if not graphs:
        raise UserError("the model folder has no exported graph; export again with --force", folder.path)
    rows = []
    for one in graphs:
        started = time.perf_counter()
        path = folder.compile(name, graph=one, calib=Path(calib) if calib is not None else None, force=force,
                              workspace_gb=workspace_gb)  # fmt: skip
        record = read_json(record_path(path)) if record_path(path).is_file() else {}
        rows.append({"backend": name, "graph": one, "path": path, "file": path.name, "bytes": path.stat().st_size,
                     "seconds": time.perf_counter() - started, "record": record})  # fmt: skip
        if on_step is not None:
            on_step(one)
    return rows


def parity(model_dir: PathLike, *, reference: str = "torch", candidates: str = "all", data: PathLike | None = None,
           split: str = "val", n: int | None = None, threads: int | None = None, bisect: bool = False,
           calib: PathLike | None = None, json_out: PathLike | None = None, force: bool = False,
           log: Callable[[str], None] | None = None, progress: Any = None) -> dict[str, Any]:  # fmt: skip
    """`maskconver parity`: every candidate against the reference on the same images (a data folder, or
    generated scenes without `data`). Returns the result; each candidate has a "verdict" (pass / fail / error /
    skipped) and its reason: nothing is raised for a failing candidate."""
    import tempfile

    from maskconver_deploy.data.coco_panoptic import load_split
    from maskconver_deploy.fileio import refuse_overwrite, write_json
    from maskconver_deploy.modeldir import ModelDir
    from maskconver_deploy.parity import SYNTHETIC_IMAGES, SYNTHETIC_SEED, resolve_candidates, run_parity, synthetic_val

    if json_out is not None:
        refuse_overwrite(Path(json_out), force)
    if data is not None and not Path(data).is_dir():
        raise UserError("no such data folder", Path(data))
    folder = ModelDir(Path(model_dir))
    names, _ = resolve_candidates(candidates, reference)
    with tempfile.TemporaryDirectory(prefix="maskconver-parity-") as tmp:
        if data is None:
            count = n or SYNTHETIC_IMAGES
            data_dir = synthetic_val(Path(tmp) / "data", count, max(folder.meta.input_size))
            split = "val"
            if log is not None:
                log(f"generated {count} synthetic validation scenes (seed {SYNTHETIC_SEED}) in a temporary folder")
        else:
            data_dir = Path(data)
        meta, records = load_split(data_dir, split)
        result = run_parity(Path(model_dir), names, reference=reference, records=records, meta=meta, n=n,
                            threads=threads, calib=calib, bisect=bisect, log=log, progress=progress)  # fmt: skip
    result["data"] = {"dir": str(data) if data is not None else None, "split": split, "generated": data is None,
                      "seed": SYNTHETIC_SEED if data is None else None}  # fmt: skip
    if json_out is not None:
        write_json(Path(json_out), result, force=force)
    return result


def evaluate(*, checkpoint: PathLike | None = None, model_dir: PathLike | None = None, backend: str | None = None,
             data: PathLike | None = None, split: str = "val", n: int | None = None, threads: int | None = None,
             save_predictions: PathLike | None = None, gt_json: PathLike | None = None,
             gt_dir: PathLike | None = None, pred_json: PathLike | None = None, pred_dir: PathLike | None = None,
             oracle_centers: bool = False, json_out: PathLike | None = None, force: bool = False,
             progress: Any = None) -> dict[str, Any]:  # fmt: skip
    """`maskconver eval`: PQ / SQ / RQ, mIoU and (for a model on a data set) COCO mask AP of the thing classes.

    Either a model on a data folder (`checkpoint`, or `model_dir` with `backend`, default ort; and `data`), or
    prediction folders against ground truth (`gt_json`, `gt_dir`, `pred_json`, `pred_dir`). `oracle_centers`
    (a checkpoint only): also decode at the ground-truth centers and report PQ both ways and center recall /
    precision. Returns the result dict ("pq", "miou", "mask_ap", "merge", ...), also written to `json_out`."""
    from maskconver_deploy.fileio import refuse_overwrite, write_json

    p = {name: Path(value) if value is not None else None for name, value in
         {"checkpoint": checkpoint, "model_dir": model_dir, "data": data, "save_predictions": save_predictions,
          "gt_json": gt_json, "gt_dir": gt_dir, "pred_json": pred_json, "pred_dir": pred_dir,
          "json_out": json_out}.items()}  # fmt: skip
    if p["json_out"] is not None:
        refuse_overwrite(p["json_out"], force)
    folders = {"--gt-json": p["gt_json"], "--gt-dir": p["gt_dir"], "--pred-json": p["pred_json"],
               "--pred-dir": p["pred_dir"]}  # fmt: skip
    model_given = p["checkpoint"] is not None or p["model_dir"] is not None
    if oracle_centers:
        from maskconver_deploy.training.diagnose import diagnose_checkpoint

        if p["checkpoint"] is None or p["model_dir"] is not None or (backend or "torch") != "torch" \
                or p["save_predictions"] is not None:  # fmt: skip
            raise UserError("--oracle-centers needs --checkpoint (backend torch) and no --save-predictions")
        if p["data"] is None:
            raise UserError("--data is required to evaluate a model")
        if not p["checkpoint"].is_file():
            raise UserError("no such checkpoint", p["checkpoint"])
        result = diagnose_checkpoint(p["checkpoint"], p["data"], split, limit=n, threads=threads, progress=progress)
        result["data"] = {"dir": str(p["data"]), "split": split}
        result["checkpoint"] = str(p["checkpoint"])
    elif any(v is not None for v in folders.values()):
        missing = [k for k, v in folders.items() if v is None]
        if missing:
            raise UserError(f"folder evaluation needs {', '.join(folders)}; missing {', '.join(missing)}")
        if model_given or p["data"] is not None:
            raise UserError("use either the folder options (--gt-json ...) or a model (--checkpoint/--model-dir "
                            "with --data), not both")  # fmt: skip
        from maskconver_deploy.evaluate import evaluate_folders

        result = evaluate_folders(*folders.values(), limit=n, progress=progress)
    else:
        if p["checkpoint"] is not None and p["model_dir"] is not None:
            raise UserError("give --checkpoint or --model-dir, not both")
        if not model_given:
            raise UserError("nothing to evaluate: give --gt-json/--gt-dir/--pred-json/--pred-dir, "
                            "or --checkpoint or --model-dir with --data")  # fmt: skip
        if p["data"] is None:
            raise UserError("--data is required to evaluate a model")
        if p["checkpoint"] is not None and not p["checkpoint"].is_file():
            raise UserError("no such checkpoint", p["checkpoint"])
        if p["model_dir"] is not None and not p["model_dir"].is_dir():
            raise UserError("no such model folder", p["model_dir"])
        name = backend or ("torch" if p["checkpoint"] is not None else "ort")
        if p["checkpoint"] is not None and not name.startswith("torch"):
            raise UserError(f"--checkpoint runs the PyTorch reference (backend torch or torch-cuda), not '{name}'; "
                            "use --model-dir for other backends")  # fmt: skip
        from maskconver_deploy.backends import open_runner
        from maskconver_deploy.data.coco_panoptic import load_split
        from maskconver_deploy.evaluate import evaluate_runner

        meta, records = load_split(p["data"], split)
        with open_runner(name, model_dir=p["model_dir"], checkpoint=p["checkpoint"], threads=threads) as runner:
            result = evaluate_runner(runner, records, meta, limit=n, pred_dir=p["save_predictions"], force=force,
                                     progress=progress)  # fmt: skip
        result["data"] = {"dir": str(p["data"]), "split": split}
        if p["checkpoint"] is not None:
            result["checkpoint"] = str(p["checkpoint"])
        if p["model_dir"] is not None:
            result["model_dir"] = str(p["model_dir"])
    _tag_merge(result, p["model_dir"], p["checkpoint"])
    if p["json_out"] is not None:
        write_json(p["json_out"], result, force=force)
    return result


def _tag_merge(result: dict[str, Any], model_dir: Path | None, checkpoint: Path | None) -> bool:
    """Add the evaluated model's merge path and mask activation to the result (printed and in --json);
    predictions read from folders have none. Returns whether it added them."""
    if "merge" in result:
        return False
    if model_dir is not None:
        from maskconver_deploy.modeldir import ModelDir

        meta = ModelDir(model_dir).meta
        result.setdefault("merge", meta.merge)
        result.setdefault("mask_activation", meta.mask_activation)
    elif checkpoint is not None:
        from maskconver_deploy.model.checkpoint import load_checkpoint

        spec = load_checkpoint(checkpoint)[0].spec
        result.setdefault("merge", spec.merge)
        result.setdefault("mask_activation", spec.mask_activation)
    else:
        return False
    return True



def bench(model_dir: PathLike, *, backends: str = "torch,ort", sizes: str | None = None, proposals: str | None = None,
          merge: str | None = None, threads: str | None = None, warmup: int = 10, runs: int = 50, gap_ms: float = 20.0, burst: int = 5, quick: bool = False,
          grid: bool = False, network: bool = True, profile: bool = False, calib: PathLike | None = None,
          json_out: PathLike | None = None, force: bool = False,
          log: Callable[[str], None] | None = None) -> Any:  # fmt: skip
    """`maskconver bench`: time each artifact end to end and the network alone, interleaved. `sizes`,
    `proposals`, `merge` (merge paths) and `threads` are comma lists as on the command line. Returns the
    `results.BenchResult`."""
    from maskconver_deploy.bench import (
        QUICK_RUNS,
        QUICK_WARMUP,
        BenchOptions,
        parse_int_list,
        parse_merges,
        resolve_backends,
        run_bench,
        usable_cores,
    )
    from maskconver_deploy.fileio import refuse_overwrite

    if json_out is not None:
        refuse_overwrite(Path(json_out), force)
    thread_list = parse_int_list(threads, "--threads") or [usable_cores()]
    options = BenchOptions(
        backends=resolve_backends(backends), sizes=parse_int_list(sizes, "--sizes", minimum=32),
        proposals=parse_int_list(proposals, "--proposals"), merges=parse_merges(merge), threads=list(thread_list),
        warmup=QUICK_WARMUP if quick else warmup, runs=QUICK_RUNS if quick else runs, grid=grid,
        network_alone=network, profile=profile, calib=Path(calib) if calib is not None else None,
        peak_matrix=512 if quick else 1536, gap_ms=gap_ms, burst=burst,
    )  # fmt: skip
    result = run_bench(Path(model_dir), options, log=log)
    if json_out is not None:
        result.save(Path(json_out), force=force)
    return result

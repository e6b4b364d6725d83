"""Parity: does each compiled artifact give the reference's answer? Three levels on the same images.

For every image (streamed: one in memory at a time, every runner open at once) the reference (default: the
PyTorch checkpoint of the model folder) and each candidate backend run on the identical input:

* tensor level, from the `raw` graphs: heatmap logits and mask logits (proposals paired by (center, class),
  since ties may reorder them), max abs / relative error, cosine similarity, and Polygraphy's elementwise check
  at atol = rtol = 1e-4. A diagnosis, not a verdict: fp16 and int8 leave such tolerances by design. A candidate
  without a raw artifact reports the tensor level as unavailable, with the reason.
* decision level, from the panoptic graphs (`metrics.agreement`): the same top-N (center, class) set, % of
  pixels with the same category, % with the same segment (segments matched as PQ does), matched-segment IoU.
* metric level: PQ of the candidate and of the reference against the ground truth (metrics.pq, the reference
  evaluator's rules), their difference, and the candidate's PQ with the reference's answers as ground truth.

Verdict per candidate (`TOLERANCES`), on three numbers that must all hold:
* pixel agreement (% of pixels in the same segment as the reference's answer) >= a floor;
* top-N match (% of the reference's kept proposals, (center, class), that the candidate also keeps) >= a floor;
* PQ: on labelled data |ΔPQ| (candidate's PQ minus the reference's, both against the ground truth) within the
  budget; on data without labels in the model's classes (noise, photos: PQ is 0 for both, which says nothing)
  the candidate's PQ with the reference's answers as ground truth instead, >= 100 minus a floor.
Per precision:
* fp32: >= 99.9% of pixels, and PQ unchanged: |ΔPQ| < 0.005 PQ points (0-100 scale), i.e. the difference shows
  as 0.00 at two decimals (unlabelled: PQ vs the reference > 99.995). An exact runtime gives ΔPQ = 0 exactly;
  anything that moves a whole segment's IoU moves PQ by far more than 0.005 on a few dozen images.
* fp32, with a raw graph: the merge check passes too. The PyTorch reference merge (`merge_raw_tensors`) runs on
  the candidate's own raw-graph tensors, and its panoptic map must equal the candidate's on every pixel. The
  network's fp32 rounding differs between runtimes (the tensor level measures by how much), and it can move a
  near-tie between two proposals on a pixel or two. The merge check separates that from the post-processing: it
  is exact, or the fused merge computes something else. Other precisions report the check without judging it.
* fp16: |ΔPQ| <= 0.5. Half precision keeps ~3 decimal digits: masks flip only at near-ties of two
  proposals' weights and at the score threshold, which costs PQ in the first decimal; 0.5 is MMDeploy's PQ
  regression tolerance and half the int8 budget, so a real fp16 bug (a wrong cast, an overflow) cannot hide.
* bf16: |ΔPQ| <= 0.5, as fp16 (bfloat16 keeps 8 significant bits, fewer than fp16, but only the network runs in
  it: the post-processing that orders and merges proposals stays float32).
* int8-dynamic, int8-static, int8: |ΔPQ| <= 1.0 (the project's int8 budget).
The agreement floors of fp16, bf16 and int8 are set from measurements on the shipped model (README "Parity": the
measured values and the margin); they catch a broken artifact whose errors happen to cancel in PQ.
* "skipped": not built here (runtime unavailable, artifact missing: the reason says which `maskconver compile`
  makes it). An artifact that exists but cannot be loaded ("error"), is stale ("fail": built from another export)
  or raises while running ("error") fails.

`bisect=True` on a failing fp32 ONNX Runtime candidate finds the first ONNX node whose output leaves tolerance:
see `bisect_onnx`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from maskconver_deploy.errors import ArtifactMissing, ArtifactStale, BackendUnavailable, UserError
from maskconver_deploy.metrics.agreement import (
    DecisionStats,
    TensorStats,
    align_proposals,
    elementwise_failures,
    proposal_keys,
)
from maskconver_deploy.types import INPUT_NAME, PanopticOutput

__all__ = ["TOLERANCES", "TENSOR_ATOL", "TENSOR_RTOL", "run_parity", "judge", "bisect_onnx", "bisect_support"]

T = TypeVar("T")
Log = Callable[[str], None]
Progress = Callable[[Iterable[T], str, int], Iterator[T]]

TENSOR_ATOL = 1e-4  # fp32 ORT vs PyTorch (Polygraphy-style elementwise: both must be exceeded to fail)
TENSOR_RTOL = 1e-4
FP32_PIXEL_AGREEMENT = 99.9
FP32_DELTA_PQ = 0.005  # strict: |ΔPQ| < 0.005, "0.00 at two decimals"


def _tolerance(pixel: float, topn: float | None, delta_pq: float, strict: bool, pq_gap: float) -> dict[str, Any]:
    """One precision's floors; `pq_gap`: how far below 100 the PQ against the reference's answers may fall on
    data without labels."""
    op = "<" if strict else "<="
    rule = f"pixel agreement >= {pixel:g}%" + (f", top-N match >= {topn:g}%" if topn is not None else "")
    rule += f", |ΔPQ| {op} {delta_pq:g} (unlabelled data: PQ vs the reference {'>' if strict else '>='} {100 - pq_gap:g})"
    return {"min_pixel_agreement": pixel, "min_topn_match": topn, "max_abs_delta_pq": delta_pq, "strict": strict,
            "max_pq_gap_unlabelled": pq_gap, "rule": rule}  # fmt: skip


# Floors of the reduced precisions, from the shipped model on 100 generated val scenes (seed 1), 2026-12-03, as
# pixel agreement / top-N match / PQ against the reference's answers:
#   tflite-fp16 99.85 / 99.5 / 99.61;
#   ort-int8-dynamic 99.21 / 95.6 / 98.40, ort-int8-static 96.35 / 80.8 / 93.44,
#   tflite-int8-dynamic 98.82 / 93.7 / 98.15, tflite-int8 96.01 / 73.0 / 91.42.
# Each floor sits below the lowest measurement of its precision with a margin for other images and versions, and
# far above what a broken artifact gives (a wrong cast or a mis-calibrated tensor drops pixels by tens of percent).
FP16_FLOORS = {"pixel": 99.5, "topn": 98.0, "pq_gap": 2.0}
INT8_FLOORS = {"pixel": 94.0, "topn": 65.0, "pq_gap": 15.0}
# bf16 keeps 8 significant bits (fp16: 11): openvino-bf16 agreed on 99.06% of pixels (worst image 96.4%) in a
# first measurement on 12 scenes; its floors are looser than fp16's, its PQ budget the same
BF16_FLOORS = {"pixel": 98.0, "topn": 90.0, "pq_gap": 5.0}
TOLERANCES: dict[str, dict[str, Any]] = {
    "fp32": _tolerance(FP32_PIXEL_AGREEMENT, 100.0, FP32_DELTA_PQ, True, FP32_DELTA_PQ) | {
        "merge_exact": True, "rule": _tolerance(FP32_PIXEL_AGREEMENT, 100.0, FP32_DELTA_PQ, True,
                                                FP32_DELTA_PQ)["rule"] + ", merge check 0 pixels differ"},
    "fp16": _tolerance(FP16_FLOORS["pixel"], FP16_FLOORS["topn"], 0.5, False, FP16_FLOORS["pq_gap"]),
    "bf16": _tolerance(BF16_FLOORS["pixel"], BF16_FLOORS["topn"], 0.5, False, BF16_FLOORS["pq_gap"]),
    **{p: _tolerance(INT8_FLOORS["pixel"], INT8_FLOORS["topn"], 1.0, False, INT8_FLOORS["pq_gap"])
       for p in ("int8-dynamic", "int8-static", "int8")},
}  # fmt: skip
# bisection: looser than the tensor level, because summation-order errors accumulate along the graph (mask logits
# of magnitude ~100 feed a hard-sigmoid of magnitude 1) while a real fault moves a tensor by orders of magnitude more
BISECT_ATOL = 1e-3
BISECT_RTOL = 1e-3
BISECT_BATCH = 96  # tensors marked as outputs per bisection run (bounds the memory of one run)
TENSOR_TOLERANCE = {"atol": TENSOR_ATOL, "rtol": TENSOR_RTOL, "rule": "elementwise, both exceeded fails; diagnosis only"}

VERDICT_PASS, VERDICT_FAIL, VERDICT_SKIPPED, VERDICT_ERROR = "pass", "fail", "skipped", "error"


def _plain(items: Iterable[T], description: str, total: int) -> Iterator[T]:
    return iter(items)


def _quiet(message: str) -> None:
    pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


# ---------------------------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------------------------
def judge(precision: str, decision: dict[str, Any], metric: dict[str, Any]) -> tuple[str, str]:
    """(verdict, reason) of one candidate by the tolerances of its precision (module docstring).

    `metric["labelled"]` False (the ground truth has no segments) judges PQ against the reference's answers."""
    tol = TOLERANCES.get(precision)
    if tol is None:
        return VERDICT_ERROR, f"no tolerance is defined for precision '{precision}'"
    problems, good = [], []
    strict = bool(tol.get("strict"))
    for key, floor_key, label in (("pixel_agreement", "min_pixel_agreement", "pixel agreement"),
                                  ("topn_match", "min_topn_match", "top-N match")):  # fmt: skip
        floor, value = tol.get(floor_key), decision.get(key)
        if floor is None:
            continue
        if value is None or value < floor:
            problems.append(f"{label} {_pct(value)} < {floor:g}%")
        else:
            good.append(f"{label} {_pct(value)} >= {floor:g}%")
    if metric.get("labelled", True):
        delta, limit = metric.get("delta_pq"), float(tol["max_abs_delta_pq"])
        if delta is None:
            problems.append("no ΔPQ")
        else:
            inside = abs(delta) < limit if strict else abs(delta) <= limit
            sign = ("<" if inside else ">=") if strict else ("<=" if inside else ">")
            (good if inside else problems).append(f"|ΔPQ| {abs(delta):.3f} {sign} {limit:g}")
    else:
        value, floor = metric.get("pq_vs_reference"), 100.0 - float(tol["max_pq_gap_unlabelled"])
        if value is None:
            problems.append("no PQ against the reference's answers")
        else:
            inside = value > floor if strict else value >= floor
            sign = (">" if inside else "<=") if strict else (">=" if inside else "<")
            (good if inside else problems).append(f"PQ vs the reference's answers {value:.3f} {sign} {floor:g} "
                                                  "(no labelled segments: judged against the reference)")  # fmt: skip
    check = decision.get("merge_check") or {}
    if tol.get("merge_exact") and check.get("available"):
        differ, pixels = int(check["pixels_differ"]), int(check["pixels"])
        if differ:
            problems.append(f"merge check: {differ} of {pixels:,} pixels differ from the reference merge of its own "
                            "raw tensors (expected 0)")  # fmt: skip
        else:
            good.append(f"merge check: 0 of {pixels:,} pixels differ")
    if problems:
        return VERDICT_FAIL, "; ".join(problems)
    return VERDICT_PASS, "; ".join(good)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}%"


# ---------------------------------------------------------------------------------------------------------------
# One backend under comparison
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Side:
    """A candidate's runners and running counts."""

    name: str
    precision: str
    runner: Any = None
    raw: Any = None
    verdict: str = ""
    reason: str = ""
    hint: str = ""
    tensor_reason: str = ""
    decision: DecisionStats | None = None
    pq: Any = None
    pq_vs_reference: Any = None
    instances: Any = None  # the shared metrics.coco_instances.InstanceEval (run_parity sets it)
    heatmap: TensorStats = field(default_factory=lambda: TensorStats(TENSOR_ATOL, TENSOR_RTOL))
    mask_logits: TensorStats = field(default_factory=lambda: TensorStats(TENSOR_ATOL, TENSOR_RTOL))
    scores: TensorStats = field(default_factory=lambda: TensorStats(TENSOR_ATOL, TENSOR_RTOL))
    aligned: int = 0
    proposals: int = 0
    worst_record: Any = None
    worst_agreement: float = 101.0
    merge_pixels: int = 0  # merge check: pixels compared, and those where the reference merge of the candidate's
    merge_differ: int = 0  # own raw tensors gives another panoptic id than the candidate's fused post-processing
    merge_images_differ: int = 0
    seconds: float = 0.0
    artifact: str = ""

    @property
    def active(self) -> bool:
        return self.runner is not None and not self.verdict

    def close(self) -> None:
        for runner in (self.runner, self.raw):
            if runner is not None:
                try:
                    runner.close()
                except Exception:
                    pass
        self.raw = None

    def stop(self, verdict: str, reason: str) -> None:
        self.verdict, self.reason = verdict, reason
        self.close()
        self.runner = None


def _open(name: str, model_dir: Path, threads: int | None, graph: str) -> Any:
    from maskconver_deploy import backends

    runner = backends.open_runner(name, model_dir=model_dir, threads=threads, graph=graph)
    runner.open()
    return runner


def _open_side(name: str, model_dir: Path, threads: int | None, threshold: float, categories: Any, log: Log) -> _Side:
    from maskconver_deploy.backends import parse_backend
    from maskconver_deploy.metrics.pq import PQAccumulator

    precision = parse_backend(name).precision.value
    side = _Side(name, precision)
    try:
        side.runner = _open(name, model_dir, threads, "panoptic")
    except BackendUnavailable as exc:  # cannot run on this machine: not built here
        side.verdict, side.reason, side.hint = VERDICT_SKIPPED, exc.reason, exc.hint
    except ArtifactMissing as exc:  # not built in this folder: the reason names the command that builds it
        side.verdict, side.reason = VERDICT_SKIPPED, _first_line(exc)
    except ArtifactStale as exc:  # built from another export: it would be judged against the wrong graph
        side.verdict, side.reason = VERDICT_FAIL, f"stale artifact: {_first_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - it exists but cannot be loaded: this candidate fails, the run goes on
        side.verdict, side.reason = VERDICT_ERROR, f"cannot be loaded: {_first_line(exc)}"
    if side.verdict:
        log(f"{name}: {side.verdict}: {side.reason}" + (f" ({side.hint})" if side.hint else ""))
        return side
    side.artifact = str(side.runner.artifact)
    try:
        side.raw = _open(name, model_dir, threads, "raw")
    except (BackendUnavailable, ArtifactMissing) as exc:
        side.tensor_reason = f"no raw graph to compare: {_first_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - a raw artifact that exists but is stale or broken fails its candidate
        stale = isinstance(exc, ArtifactStale)
        side.stop(VERDICT_FAIL if stale else VERDICT_ERROR,
                  f"{'stale' if stale else 'the'} raw artifact{'' if stale else ' cannot be loaded'}: {_first_line(exc)}")
        log(f"{name}: {side.verdict}: {side.reason}")
        return side
    side.decision = DecisionStats(threshold=threshold)
    side.pq = PQAccumulator(categories)
    side.pq_vs_reference = PQAccumulator(categories)
    return side


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def run_parity(
    model_dir: str | Path,
    candidates: Sequence[str],
    *,
    reference: str = "torch",
    records: Sequence[Any],
    meta: Any,
    n: int | None = None,
    threads: int | None = None,
    calib: str | Path | None = None,
    bisect: bool = False,
    log: Log | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compare every candidate with the reference on the first `n` records (COCO-panoptic, `meta` their
    DatasetMeta). Returns the JSON-able result (module docstring); never raises for a candidate's failure.

    `calib`, when given, is the calibration set the int8 artifacts should have been built from: its manifest
    hash is compared with each artifact's build record. `progress` wraps the image loop (cli/console.progress).
    """
    from maskconver_deploy.data.coco_panoptic import load_example, panoptic_to_coco
    from maskconver_deploy.data.preprocess import letterbox
    from maskconver_deploy.evaluate import check_categories
    from maskconver_deploy.metrics.coco_instances import InstanceEval
    from maskconver_deploy.metrics.pq import PQAccumulator
    from maskconver_deploy.modeldir import ModelDir

    log = log or _quiet
    progress = progress or _plain
    started = time.perf_counter()
    model_dir = Path(model_dir)
    folder = ModelDir(model_dir)
    model_meta = folder.meta
    check_categories(model_meta.categories, meta)
    chosen = list(records[: n if n else None])
    if not chosen:
        raise UserError("no images to compare on")
    names = _candidate_names(candidates, reference)
    threshold = float(model_meta.object_mask_threshold)
    calib_hash = _calibration_hash(calib)

    log(f"reference {reference}: opening")
    ref_runner = _open(reference, model_dir, threads, "panoptic")
    ref_raw, ref_raw_reason = None, ""
    try:
        ref_raw = _open(reference, model_dir, threads, "raw")
    except MaskconverError as exc:
        ref_raw_reason = f"the reference has no raw graph: {_first_line(exc)}"
    sides = [_open_side(name, model_dir, threads, threshold, meta.categories, log) for name in names]
    pq_reference = PQAccumulator(meta.categories)
    instances = InstanceEval(meta.categories, meta.label_divisor)  # mask AP: ground truth converted once
    for side in sides:
        side.instances = instances
    size = tuple(model_meta.input_size)
    try:
        for record in progress(chosen, "parity", len(chosen)):
            image, gt_ids = load_example(record)
            boxed, box = letterbox(image, size)
            ref_out = ref_runner.predict(image)
            ref_ids, ref_segments = panoptic_to_coco(ref_out, meta)
            pq_reference.add(gt_ids, record.segments, ref_ids, ref_segments, image=str(record.image_path))
            instances.add_gt(record.image_id, gt_ids, record.segments)
            instances.add_pred(record.image_id, ref_out.panoptic, ref_out.scores, key=AP_REFERENCE_KEY)
            wanted = ref_raw is not None and any(s.raw is not None for s in sides if s.active)
            ref_tensors = ref_raw.infer(boxed) if wanted else None
            for side in sides:
                if side.active:
                    _compare_one(side, record, image, boxed, box, gt_ids, ref_out, ref_ids, ref_segments,
                                 ref_tensors, threshold, meta, model_meta)  # fmt: skip
    finally:
        for side in sides:
            side.close()
        ref_runner.close()
        if ref_raw is not None:
            ref_raw.close()

    reference_pq = pq_reference.result()
    results = []
    for side in sides:
        entry = _summarise(side, reference_pq, ref_raw_reason, folder, calib_hash)
        if "metric" in entry:  # mask AP of the thing classes, same images: a report, not part of the verdict
            entry["metric"].update(_mask_ap_delta(instances, side.name))
        if bisect:
            entry["bisect"] = _maybe_bisect(side, entry, folder, threads, size, log)
        results.append(entry)
    return {
        "reference": reference,
        "model_dir": str(model_dir),
        "model": {"preset": model_meta.preset, "input_size": list(size), "num_proposals": model_meta.num_proposals,
                  "merge": model_meta.merge, "mask_activation": model_meta.mask_activation},
        "n_images": len(chosen),
        "tolerances": {**TOLERANCES, "tensor": TENSOR_TOLERANCE},
        "reference_pq": _groups(reference_pq),
        "calibration": {"path": str(calib), "manifest_hash": calib_hash} if calib_hash else None,
        "candidates": results,
        "seconds": round(time.perf_counter() - started, 2),
    }


SYNTHETIC_SEED = 1  # the shipped model trains on seed-0 scenes: compare on scenes it has not seen
SYNTHETIC_IMAGES = 50


def resolve_candidates(text: str, reference: str) -> tuple[list[str], bool]:
    """(names, explicit): 'all' -> every backend the toolkit knows except the reference; else the comma list."""
    from maskconver_deploy.backends import parse_backend
    from maskconver_deploy.bench import all_backend_names

    ref = str(parse_backend(reference))
    if text.strip().lower() == "all":
        return [n for n in all_backend_names() if n != ref], False
    names = [str(parse_backend(part)) for part in text.split(",") if part.strip()]
    if not names:
        raise UserError("--candidates is empty")
    return names, True


def synthetic_val(target: Path, n: int, size: int) -> Path:
    """n generated validation scenes (seed SYNTHETIC_SEED) at the model's size: n + 1 scenes, a val share of n / (n + 1)."""
    from maskconver_deploy.data.synthetic import write_dataset

    write_dataset(target, n=n + 1, size=int(size), seed=SYNTHETIC_SEED, val_fraction=n / (n + 1), force=True)
    return target


def _candidate_names(candidates: Sequence[str], reference: str) -> list[str]:
    from maskconver_deploy.backends import parse_backend

    ref = str(parse_backend(reference))
    names: list[str] = []
    for text in candidates:
        name = str(parse_backend(text))
        if name != ref and name not in names:
            names.append(name)
    if not names:
        raise UserError(f"no candidates to compare with the reference '{ref}'")
    return names


def _compare_one(side: _Side, record: Any, image: np.ndarray, boxed: np.ndarray, box: Any, gt_ids: np.ndarray,
                 ref_out: PanopticOutput, ref_ids: np.ndarray, ref_segments: list[dict[str, Any]],
                 ref_tensors: dict[str, np.ndarray] | None, threshold: float, meta: Any,
                 meta_model: Any) -> None:  # fmt: skip
    """One image through one candidate; a candidate that raises is stopped with verdict "error"."""
    from maskconver_deploy.data.coco_panoptic import panoptic_to_coco
    from maskconver_deploy.data.preprocess import unletterbox

    start = time.perf_counter()
    try:
        out = side.runner.predict(image)
        if out.panoptic.shape != ref_out.panoptic.shape:
            raise UserError(f"answer of shape {out.panoptic.shape} for an image of shape {ref_out.panoptic.shape}")
        one = side.decision.add(out, ref_out, image=record.image_id)
        if one.pixel_agreement < side.worst_agreement:
            side.worst_agreement, side.worst_record = one.pixel_agreement, record
        cand_ids, cand_segments = panoptic_to_coco(out, meta)
        where = str(record.image_path)
        side.pq.add(gt_ids, record.segments, cand_ids, cand_segments, image=where)
        side.pq_vs_reference.add(ref_ids, ref_segments, cand_ids, cand_segments, image=where)
        side.instances.add_pred(record.image_id, out.panoptic, out.scores, key=side.name)
        if side.raw is not None:
            cand_tensors = side.raw.infer(boxed)
            if ref_tensors is not None:
                _compare_tensors(side, cand_tensors, ref_tensors, threshold)
            merged = unletterbox(merge_raw_tensors(cand_tensors, meta_model), box)
            differ = int(np.count_nonzero(merged != out.panoptic))
            side.merge_pixels += int(merged.size)
            side.merge_differ += differ
            side.merge_images_differ += int(differ > 0)
    except Exception as exc:  # noqa: BLE001 - any failure of one runtime is reported, the others go on
        side.stop(VERDICT_ERROR, f"{type(exc).__name__} on image {record.image_id}: {_first_line(exc)}")
    side.seconds += time.perf_counter() - start


def merge_raw_tensors(tensors: dict[str, np.ndarray], meta: Any) -> np.ndarray:
    """The PyTorch reference merge (model/postprocess.merge_logits, the model folder's merge path and activation)
    of one image's raw-graph tensors -> panoptic int32 [H, W] at the network input size. Fed a candidate's own
    tensors, it says whether the candidate's fused post-processing computes the reference's: any pixel it
    changes is the post-processing's doing, not the network's (the merge check)."""
    import torch

    from maskconver_deploy.model.postprocess import merge_logits

    extra = meta.extra or {}
    logits = np.asarray(tensors["mask_logits"], dtype=np.float32)
    logits = np.ascontiguousarray(logits.reshape(-1, *logits.shape[-2:]))  # [N, h, w], batch of one dropped
    with torch.no_grad():
        panoptic, _ = merge_logits(
            torch.from_numpy(logits),
            torch.from_numpy(np.asarray(tensors["scores"], dtype=np.float32).reshape(-1).copy()),
            torch.from_numpy(np.asarray(tensors["classes"]).astype(np.int64).reshape(-1)),
            merge=meta.merge,
            activation=meta.mask_activation,
            stride=int(meta.feature_stride),
            num_things=int(extra["num_things"]),
            object_mask_threshold=float(meta.object_mask_threshold),
            overlap_threshold=float(meta.overlap_threshold),
            small_area=float(meta.small_area_threshold),
            feature_small_area_px=float(extra.get("feature_small_area", 0.0)),
        )
    return panoptic.numpy()


def _compare_tensors(side: _Side, cand: dict[str, np.ndarray], ref: dict[str, np.ndarray], threshold: float) -> None:
    side.heatmap.add(cand["heatmap"], ref["heatmap"])
    ref_keys = proposal_keys(ref["scores"], ref["classes"], ref["centers"], threshold)
    cand_keys = proposal_keys(cand["scores"], cand["classes"], cand["centers"], threshold)
    ref_ranks, cand_ranks = align_proposals(ref_keys, cand_keys)
    side.proposals += len(ref_keys)
    side.aligned += len(ref_ranks)
    if ref_ranks:  # proposal keys are listed in rank order of the valid ones, which are the leading ranks
        side.mask_logits.add(np.asarray(cand["mask_logits"])[cand_ranks], np.asarray(ref["mask_logits"])[ref_ranks])
        side.scores.add(np.asarray(cand["scores"])[cand_ranks], np.asarray(ref["scores"])[ref_ranks])


def _merge_check(side: _Side) -> dict[str, Any]:
    """The merge check's counts (`merge_raw_tensors`), or why there are none."""
    if not side.merge_pixels:
        return {"available": False, "reason": side.tensor_reason or "no raw graph ran"}
    same = side.merge_pixels - side.merge_differ
    return {"available": True, "pixels": side.merge_pixels, "pixels_differ": side.merge_differ,
            "images_differ": side.merge_images_differ, "agreement": 100.0 * same / side.merge_pixels}  # fmt: skip


def _has_segments(pq: dict[str, Any]) -> bool:
    """Did the ground truth hold any segment (TP + FN > 0 in some category)?"""
    return any(c["tp"] + c["fn"] > 0 for c in pq["per_class"].values())


AP_REFERENCE_KEY = "\0reference"  # the reference's answers in the shared InstanceEval (no backend is named so)


def _mask_ap_delta(instances: Any, name: str) -> dict[str, Any]:
    """COCO mask AP (things) of candidate `name` and of the reference on the same images, and their difference."""
    ours, ref = instances.result(name), instances.result(AP_REFERENCE_KEY)
    delta = None if ours["ap"] is None or ref["ap"] is None else ours["ap"] - ref["ap"]
    return {"mask_ap": ours["ap"], "mask_ap_reference": ref["ap"], "delta_mask_ap": delta,
            "mask_ap50": ours["ap50"], "mask_ap50_reference": ref["ap50"]}  # fmt: skip


def _groups(pq: dict[str, Any]) -> dict[str, Any]:
    return {group: dict(pq[group]) for group in ("all", "things", "stuff")}


def _summarise(side: _Side, reference_pq: dict[str, Any], ref_raw_reason: str, folder: Any,
               calib_hash: str | None) -> dict[str, Any]:  # fmt: skip
    entry: dict[str, Any] = {"backend": side.name, "precision": side.precision, "verdict": side.verdict,
                             "reason": side.reason, "artifact": side.artifact}  # fmt: skip
    if side.hint:
        entry["hint"] = side.hint
    if side.decision is None or side.decision.images == 0:
        entry["verdict"] = entry["verdict"] or VERDICT_ERROR
        return entry
    tensor: dict[str, Any]
    if side.heatmap.images:
        tensor = {
            "available": True,
            "heatmap": side.heatmap.result(),
            "mask_logits": side.mask_logits.result(),
            "scores": side.scores.result(),
            "aligned_proposals": side.aligned,
            "reference_proposals": side.proposals,
        }
    else:
        tensor = {"available": False, "reason": side.tensor_reason or ref_raw_reason or "no raw outputs were compared"}
    entry["tensor"] = tensor
    entry["decision"] = side.decision.result()
    entry["decision"]["merge_check"] = _merge_check(side)
    cand_pq = side.pq.result()
    vs_ref = side.pq_vs_reference.result()
    pq, pq_ref = cand_pq["all"]["pq"], reference_pq["all"]["pq"]
    metric = {
        "pq": pq,
        "pq_reference": pq_ref,
        "delta_pq": pq - pq_ref,
        "pq_vs_reference": vs_ref["all"]["pq"],
        "candidate": _groups(cand_pq),
        "reference": _groups(reference_pq),
        "vs_reference": _groups(vs_ref),
    }
    metric["labelled"] = _has_segments(reference_pq)
    if not metric["labelled"]:
        metric["note"] = ("the ground truth has no segments here: PQ against it is 0 for everyone, so the verdict "
                          "takes the PQ against the reference's answers and the agreement floors")  # fmt: skip
    entry["metric"] = metric
    entry["build"] = _build_record(side, folder, calib_hash)
    if not side.verdict:  # it ran on every image
        entry["verdict"], entry["reason"] = judge(side.precision, entry["decision"], metric)
    entry["seconds"] = round(side.seconds, 2)
    return entry


def _calibration_hash(calib: str | Path | None) -> str | None:
    if calib is None:
        return None
    from maskconver_deploy.calibration import load_calibration

    return load_calibration(Path(calib)).manifest_hash


def _build_record(side: _Side, folder: Any, calib_hash: str | None) -> dict[str, Any] | None:
    """What the artifact's build record says (precision, calibration), and whether the calibration is the given one."""
    from maskconver_deploy.fileio import read_json

    if not side.artifact:
        return None
    path = Path(side.artifact)
    record_file = path.with_name(path.name + ".json")
    if not record_file.is_file():
        return None
    try:
        record = read_json(record_file)
    except UserError:
        return {"record": str(record_file), "problem": "not valid JSON"}
    if not isinstance(record, dict):
        return None
    out: dict[str, Any] = {"record": str(record_file)}
    for key in ("precision", "source_onnx_sha256", "built_at"):
        if key in record:
            out[key] = record[key]
    found = _find_key(record, "manifest_hash")
    if found is not None:
        out["calibration_manifest_hash"] = found
        if calib_hash is not None:
            out["calibration_matches"] = found == calib_hash
    return out


def _find_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for value in obj.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------------------------
# Bisection
# ---------------------------------------------------------------------------------------------------------------
def bisect_support(name: str) -> tuple[bool, str]:
    """(supported, why not) for a backend name."""
    from maskconver_deploy.backends import parse_backend

    parsed = parse_backend(name)
    if parsed.family == "ort":
        if parsed.precision.value != "fp32":
            return False, (
                f"bisection judges nodes by the fp32 tensor tolerance; a {parsed.precision.value} graph leaves it at "
                "its first quantised node by design, so the answer would say nothing: use the PQ-level result"
            )
        return True, ""
    reasons = {
        "ort-mobile": "an ORT-format file is a serialised, already optimised session graph: no intermediate tensor "
        "can be added as an output. Bisect the `ort` candidate, which runs the same ONNX graph",
        "tflite": "onnx2tf renames, fuses and re-lays out the tensors, and no name map back to the ONNX nodes is "
        "kept, so a TFLite tensor cannot be paired with an ONNX node output",
        "tensorrt": "TensorRT fuses layers while building, and marking every tensor as an output rebuilds a "
        "different engine (it can hide the fault), besides needing the GPU",
        "torch": "the PyTorch reference runs no ONNX graph",
        "torch-cuda": "the PyTorch reference runs no ONNX graph",
    }
    return False, f"bisection is not supported for {name}: {reasons.get(parsed.family, 'not an ONNX Runtime graph')}"


def _maybe_bisect(side: _Side, entry: dict[str, Any], folder: Any, threads: int | None, size: tuple[int, ...],
                  log: Log) -> dict[str, Any]:  # fmt: skip
    if entry["verdict"] != VERDICT_FAIL:
        return {"ran": False, "reason": f"not run: the candidate's verdict is {entry['verdict']}"}
    supported, why = bisect_support(side.name)
    if not supported:
        return {"ran": False, "reason": why}
    from maskconver_deploy.data.coco_panoptic import load_example
    from maskconver_deploy.data.preprocess import letterbox

    record = side.worst_record
    image, _ = load_example(record)
    boxed, _ = letterbox(image, size)
    candidate = folder.artifact_path(side.name, "panoptic")
    log(f"{side.name}: bisecting {candidate.name} on image {record.image_id} "
        f"(pixel agreement {side.worst_agreement:.2f}%)")
    with _bisect_source(folder, log) as (source, note):
        result = bisect_onnx(candidate, source, {INPUT_NAME: boxed[None]}, threads=threads)
    result["image"] = record.image_id
    result["source_note"] = note
    return result


class _bisect_source:
    """The source graph of a bisection: the folder's model.onnx when it is still what the export wrote (sha256 in
    model.json), otherwise a fresh export of the folder's reference checkpoint into a temporary folder."""

    def __init__(self, folder: Any, log: Log) -> None:
        self.folder = folder
        self.log = log
        self.tmp: Path | None = None

    def __enter__(self) -> tuple[Path, str]:
        from maskconver_deploy.fileio import sha256_file

        source = self.folder.onnx_path("panoptic")
        expected = self.folder.source_sha256("panoptic")
        if expected and source.is_file() and sha256_file(source) == expected:
            return source, f"{source} (its sha256 matches the export record), run with graph optimisations off"
        from maskconver_deploy import export as export_mod
        checkpoint = self.folder.reference_path()
        if not checkpoint.is_file():
            raise UserError("cannot bisect: model.onnx differs from its export record and there is no checkpoint to "
                            "export it again", checkpoint)  # fmt: skip
        meta = self.folder.meta
        self.tmp = Path(tempfile.mkdtemp(prefix="maskconver-bisect-"))
        self.log(f"{source.name} differs from its export record: exporting {checkpoint} again as the source")
        fresh = export_mod.export(checkpoint, self.tmp / "model", size=tuple(meta.input_size),
                                  proposals=meta.num_proposals, graphs=("panoptic",), force=True)  # fmt: skip
        return fresh.onnx_path("panoptic"), (
            f"a fresh export of {checkpoint} ({source.name} differs from the sha256 in model.json), run with graph "
            "optimisations off"
        )

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def bisect_onnx(candidate: str | Path, source: str | Path, feeds: dict[str, np.ndarray], *,
                atol: float = BISECT_ATOL, rtol: float = BISECT_RTOL, threads: int | None = None,
                batch: int = BISECT_BATCH) -> dict[str, Any]:  # fmt: skip
    """The first node of `candidate` (topological order) whose output differs from the same tensor of `source`.

    Both graphs run in ONNX Runtime on the same feeds: the candidate with every graph optimisation on (as its
    runner runs it), the source with optimisations off. Tensors are paired by name; floats are judged by the
    elementwise rule with atol scaled by the tensor's magnitude (`elementwise_failures(scale_atol=True)`: summing
    in another order errs in proportion to it), integers and booleans must be equal. Intermediate tensors are added
    as graph outputs `batch` at a time, in order, until one fails, so memory stays bounded. Initializers of the same
    name that differ between the two files are listed too (a changed weight is the usual cause).
    Caveat (as Polygraphy warns): a tensor marked as an output cannot be fused away, so a fault inside a fusion
    of the optimised graph may not show here.
    """
    candidate, source = Path(candidate), Path(source)
    cand_model = _load_onnx(candidate)
    src_model = _load_onnx(source)
    src_tensors = {name for node in src_model.graph.node for name in node.output if name}
    cand_outputs = {o.name for o in cand_model.graph.output}
    src_outputs = {o.name for o in src_model.graph.output}
    order: list[tuple[int, str]] = []  # (node index, tensor name) in topological order
    missing = 0
    for index, node in enumerate(cand_model.graph.node):
        for name in node.output:
            if not name:
                continue
            if name in src_tensors:
                order.append((index, name))
            else:
                missing += 1
    changed = _changed_initializers(cand_model, src_model)
    result: dict[str, Any] = {
        "ran": True,
        "candidate": str(candidate),
        "source": str(source),
        "tolerance": {"atol": atol, "rtol": rtol, "atol_scaled_by": "max(1, max |source tensor|)"},
        "nodes": len(cand_model.graph.node),
        "tensors_paired": len(order),
        "tensors_unpaired": missing,
        "changed_initializers": changed,
        "first_node": None,
    }
    if not order:
        result["reason"] = "the two graphs share no tensor names: nothing to pair"
        return result
    compared = 0
    last_good: str | None = None
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        names = [name for _, name in chunk]
        cand_values = _run_with_outputs(cand_model, names, cand_outputs, feeds, threads, optimise=True)
        src_values = _run_with_outputs(src_model, names, src_outputs, feeds, threads, optimise=False)
        for (index, name) in chunk:
            failure = _tensor_failure(cand_values[name], src_values[name], atol, rtol)
            compared += 1
            if failure is None:
                last_good = cand_model.graph.node[index].name or name
                continue
            node = cand_model.graph.node[index]
            initializers = {init.name for init in cand_model.graph.initializer}
            result["first_node"] = {
                "name": node.name,
                "op_type": node.op_type,
                "output": name,
                "inputs": list(node.input),
                "initializer_inputs": [i for i in node.input if i in initializers],
                "changed_inputs": [c["name"] for c in changed if c["name"] in node.input],
                **failure,
            }
            result["last_good_node"] = last_good
            result["tensors_compared"] = compared
            return result
        del cand_values, src_values
    result["tensors_compared"] = compared
    result["reason"] = "every paired tensor is within tolerance on this image"
    return result


def _load_onnx(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise UserError("no such ONNX file", path)
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt file is bad input
        raise UserError(f"not a readable ONNX model ({_first_line(exc)})", path) from None


def _changed_initializers(cand_model: Any, src_model: Any) -> list[dict[str, Any]]:
    from onnx import numpy_helper

    src = {init.name: init for init in src_model.graph.initializer}
    out = []
    for init in cand_model.graph.initializer:
        other = src.get(init.name)
        if other is None:
            continue
        a, b = numpy_helper.to_array(init), numpy_helper.to_array(other)
        if a.shape != b.shape:
            out.append({"name": init.name, "shape": list(a.shape), "source_shape": list(b.shape)})
        elif not np.array_equal(a, b):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            out.append({"name": init.name, "shape": list(a.shape), "max_abs_diff": float(diff.max()),
                        "changed_elements": int((diff > 0).sum())})  # fmt: skip
    return out


def _run_with_outputs(model: Any, names: list[str], existing: set[str], feeds: dict[str, np.ndarray],
                      threads: int | None, optimise: bool) -> dict[str, np.ndarray]:  # fmt: skip
    """Run `model` with the tensors `names` added as outputs (no type needed: ONNX Runtime infers it)."""
    import onnx
    import onnxruntime as ort

    marked = onnx.ModelProto()
    marked.CopyFrom(model)
    for name in names:
        if name not in existing:
            marked.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(marked.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(names, feeds)
    return dict(zip(names, values))


def _tensor_failure(cand: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict[str, Any] | None:
    """None when `cand` matches `ref`; otherwise what differs."""
    cand, ref = np.asarray(cand), np.asarray(ref)
    if cand.shape != ref.shape:
        return {"problem": f"shape {list(cand.shape)} vs the source's {list(ref.shape)}"}
    if cand.dtype.kind in "fc" or ref.dtype.kind in "fc":
        failed = elementwise_failures(cand, ref, atol, rtol, scale_atol=True)
        if not failed.any():
            return None
        diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
        finite = np.isfinite(diff)
        return {"problem": "outside tolerance", "failed_elements": int(failed.sum()), "elements": int(cand.size),
                "max_abs_err": float(diff[finite].max()) if finite.any() else None}  # fmt: skip
    unequal = cand != ref
    if not unequal.any():
        return None
    return {"problem": "integer values differ", "failed_elements": int(unequal.sum()), "elements": int(cand.size)}

"""PyTorch reference -> ONNX graphs with the post-processing fused in, written as a model folder (modeldir.py).

For each requested graph (panoptic and raw by default, semantic on request) `DeployModel` is traced with fixed
shapes, uint8 image [1, H, W, 3] in, the outputs of `types.OUTPUT_NAMES` out, then:
1. exported by the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) at opset 17. Why not the
   dynamo exporter: it cannot emit opset 17 (only 18+), and 17 is the opset onnx2tf 1.29 and TensorRT 10 were
   checked with; the TorchScript exporter names nodes by module scope (`/model/heatmap/predict/Conv`), which the
   int8 paths' reports and `parity --bisect` print; and its output matched PyTorch exactly (toolchain-facts.md).
2. simplified with onnxsim (constant folding, shape inference, BN folding, the onnx optimizer's fusions; onnxslim
   was the previous simplifier and is kept for comparison, see README); every node gets a unique name.
3. checked: the ONNX checker (full check, with shape inference), static shapes on every input and output, and the
   op list against what onnx2tf and TensorRT take (no NonZero / Loop / If / Unique / NMS, TopK with a constant
   K <= 3840). The op types and counts go into model.json.
4. tagged: ModelMeta JSON (with `output` set) in metadata_props key `maskconver`, so every later step reads the
   model's classes, thresholds, input size and normalisation from the artifact itself.
5. verified: ONNX Runtime runs the saved graph on two deterministic images (a synthetic scene and noise) and
   is compared with PyTorch's DeployModel: classes and centers equal in every proposal slot (slots whose scores
   tie within 1e-5 excepted: TopK orders ties as the runtime likes), scores within 1e-4, raw tensors within 1e-4
   of their scale, panoptic / semantic maps equal on >= 99.9% of pixels (a pixel whose mask probability sits at
   the hard-sigmoid's 0 can flip with the last bit of a float; in practice the maps are identical). The numbers
   go into model.json; a disagreement is a CheckFailed.
Files are staged in a temporary folder beside the target and moved in at the end (model.json last), so an
interrupted export leaves the folder as it was, and an existing export is replaced only with `force`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskconver_deploy.errors import CheckFailed, UserError
from maskconver_deploy.fileio import sha256_file, write_json
from maskconver_deploy.modeldir import (
    GRAPH_FILES,
    GRAPH_ORDER,
    MODEL_FORMAT,
    MODEL_JSON,
    REFERENCE_NAME,
    ModelDir,
)
from maskconver_deploy.types import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, ModelMeta

OPSET = 17
EXPORTER = "torch.onnx.export (TorchScript exporter, dynamo=False)"
DEFAULT_GRAPHS = ("panoptic", "raw")
# Ops that onnx2tf or TensorRT cannot take, or that give data-dependent shapes
FORBIDDEN_OPS = frozenset({
    "NonZero", "Loop", "If", "Scan", "Unique", "NonMaxSuppression", "Compress", "SequenceConstruct",
    "SequenceAt", "SequenceInsert", "SplitToSequence", "ConcatFromSequence", "RandomNormal", "RandomUniform",
})  # fmt: skip
MAX_TOPK = 3840  # TensorRT
SCORE_ATOL = 1e-4
TIE_ATOL = 1e-5  # scores this close are ties: TopK may order them either way
MAP_AGREEMENT = 0.999  # panoptic / semantic pixels: a pixel on a numeric boundary (hard-sigmoid at 0) may flip
TENSOR_RTOL = 1e-4  # raw tensors: max |ort - torch| <= TENSOR_RTOL * max(1, max |torch|)
CHECK_IMAGES = 2
SIMPLIFIERS = ("onnxsim", "onnxslim")
SIMPLIFIER = "onnxsim"  # see README, Export: onnxsim against onnxslim on our graphs


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------
def parse_graphs(values: Sequence[str] | str | None) -> list[str]:
    """'panoptic,raw' or ['panoptic', 'semantic'] -> ordered unique graph names; unknown names are a UserError."""
    if values is None:
        return list(DEFAULT_GRAPHS)
    items = [values] if isinstance(values, str) else list(values)
    names = [part.strip().lower() for item in items for part in str(item).split(",") if part.strip()]
    unknown = [n for n in names if n not in GRAPH_FILES]
    if unknown:
        raise UserError(f"unknown graph {unknown[0]!r}; use panoptic, raw or semantic (comma list or repeated)")
    if not names:
        return list(DEFAULT_GRAPHS)
    return [g for g in GRAPH_ORDER if g in names]


def export(
    checkpoint: Path,
    model_dir: Path,
    *,
    size: int | tuple[int, int] | None = None,
    proposals: int | None = None,
    graphs: Sequence[str] = DEFAULT_GRAPHS,
    force: bool = False,
    on_step: Callable[[str], None] | None = None,
    merge: str | None = None,
    mask_activation: str | None = None,
) -> ModelDir:
    """Export `checkpoint` into the model folder `model_dir` (see the module docstring).

    `merge` picks the post-processing path (model/postprocess.py MERGES; default: the checkpoint's, `input`),
    `mask_activation` the mask activation (default: the checkpoint's, or the merge path's own when `merge` is
    given: sigmoid for `official`, hard-sigmoid otherwise). Both go into the spec of reference.pt and model.json.

    `size` re-targets the input size (an int for square, or (H, W); multiples of the output stride), `proposals`
    the top-N. The weights are the checkpoint's; reference.pt is the checkpoint itself when nothing changes,
    otherwise the same weights saved with the changed spec (the torch backend checks its spec's input size).
    `on_step(graph)` is called after each graph is exported and verified (a progress display).
    """
    return _export(Path(checkpoint), Path(model_dir), size=size, proposals=proposals, graphs=graphs, force=force,
                   on_step=on_step, merge=merge, mask_activation=mask_activation)  # fmt: skip


def export_variant(
    source: ModelDir,
    target: Path,
    *,
    input_size: tuple[int, int],
    num_proposals: int,
    force: bool = False,
    merge: str | None = None,
    mask_activation: str | None = None,
) -> ModelDir:
    """The same weights (source/reference.pt) exported at another input size / proposal count into `target`.

    The variant keeps the source's checkpoint_sha256 and, unless `merge` is given, its merge path and mask
    activation, so both name the same trained weights and compute the same post-processing. With `merge` (another
    path, e.g. for `bench --merge`) the activation is `mask_activation`, or that path's own default.
    """
    if merge is None:
        merge, mask_activation = source.meta.merge, source.meta.mask_activation
    return _export(
        source.reference_path(),
        Path(target),
        size=tuple(input_size),
        proposals=int(num_proposals),
        graphs=DEFAULT_GRAPHS,
        force=force,
        checkpoint_sha256=source.meta.checkpoint_sha256 or None,
        variant_of=str(source.path),
        merge=merge,
        mask_activation=mask_activation,
    )


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------
def _size_pair(size: int | Sequence[int] | None, current: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return current
    if isinstance(size, int):
        return (size, size)
    values = tuple(int(v) for v in size)
    if len(values) != 2:
        raise UserError(f"--size takes one side (square) or (H, W), got {size!r}")
    return values  # type: ignore[return-value]


def merge_options(spec: Any, merge: str | None, mask_activation: str | None) -> tuple[str, str]:
    """(merge, activation) for an export: given values (UserError if unknown) or the spec's; see `export`."""
    from maskconver_deploy.model.postprocess import default_activation, normalize_activation, normalize_merge

    try:
        chosen = normalize_merge(spec.merge if merge is None else merge)
        if mask_activation is not None:
            activation = normalize_activation(mask_activation)
        elif merge is not None:
            activation = default_activation(chosen)
        else:
            activation = normalize_activation(spec.mask_activation)
    except ValueError as exc:
        raise UserError(f"--merge / --mask-activation: {exc}") from None
    return chosen, activation


def retarget(model: Any, size: tuple[int, int], proposals: int, merge: str | None = None,
             mask_activation: str | None = None) -> Any:
    """The same weights in a model whose spec has another input size / proposal count / merge path / mask
    activation (UserError if invalid); the model itself when nothing changes."""
    from maskconver_deploy.model.maskconver import MaskConver
    from maskconver_deploy.model.postprocess import normalize_activation

    spec = model.spec
    stride = spec.output_stride
    if any(side < 2 * stride or side % stride for side in size):
        good = max(2, round(size[0] / stride)) * stride
        raise UserError(f"--size {size[0]}x{size[1]}: each side must be a multiple of the output stride {stride} "
                        f"and at least {2 * stride} (e.g. {good})")  # fmt: skip
    feature = (size[0] // spec.feature_stride, size[1] // spec.feature_stride)
    limit = min(MAX_TOPK, spec.num_classes * feature[0] * feature[1])
    if not 1 <= proposals <= limit:
        raise UserError(f"--proposals {proposals}: must be in 1..{limit} at input size {size[0]}x{size[1]}")
    merge, activation = merge_options(spec, merge, mask_activation)
    if (tuple(spec.input_size) == size and spec.num_proposals == proposals and spec.merge == merge
            and normalize_activation(spec.mask_activation) == activation):
        return model
    changed = MaskConver(spec.with_changes(input_size=size, num_proposals=proposals, merge=merge,
                                           mask_activation=activation))
    changed.load_state_dict(model.state_dict(), strict=True)
    return changed.eval()


def _export_onnx(deploy: torch.nn.Module, graph: str, size: tuple[int, int], path: Path) -> None:
    example = torch.zeros((1, size[0], size[1], 3), dtype=torch.uint8)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            deploy, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES[graph]),
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )  # fmt: skip


def _simplify(model: Any, simplifier: str | None = None) -> tuple[Any, str]:
    """The graph simplified by `simplifier` (default SIMPLIFIER) and "name version" for the record.

    onnxsim: constant folding on ONNX Runtime, shape inference, BN folding and the onnx optimizer passes, without
    its random-input check (verify_graph compares with PyTorch instead) and without its optional Z3 proof.
    onnxslim: the previous default, kept for comparison (README, Export).
    """
    name = simplifier or SIMPLIFIER
    if name == "onnxsim":
        import onnxsim

        simplified, ok = onnxsim.simplify(model, check_n=0, certify=False, initializers_as_constants=False)
        if not ok:  # only the random-input check can say False, and it is off; kept as a guard
            raise CheckFailed("onnxsim could not simplify the exported graph")
        _constants_to_initializers(simplified)
        return simplified, f"onnxsim {metadata.version('onnxsim')}"
    if name == "onnxslim":
        import onnxslim

        return onnxslim.slim(model), f"onnxslim {metadata.version('onnxslim')}"
    raise UserError(f"unknown simplifier {name!r}; use one of {', '.join(SIMPLIFIERS)}")


def _constants_to_initializers(model: Any) -> int:
    """Move the tensor-valued Constant nodes onnxsim leaves (thresholds, resize scales, the merge's index tables)
    into initializers, where onnxslim put them and where the TFLite post-processing converter and TensorRT's
    pre-flight look for constants; returns how many moved."""
    from onnx import numpy_helper

    keep, moved = [], 0
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None and len(node.attribute) == 1:
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value.t), node.output[0]))
            moved += 1
        else:
            keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def name_nodes(model: Any) -> int:
    """Give every unnamed (or duplicate-named) node a unique name; returns how many were renamed."""
    used: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in used:
            base = f"/mcv/{node.op_type}_{index}"
            name = base
            while name in used:
                name += "_"
            node.name = name
            renamed += 1
        used.add(node.name)
    return renamed


def op_counts(model: Any) -> dict[str, int]:
    """Op type -> count (domain-qualified for non-standard domains), sorted by count then name."""
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _constant(model: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def graph_problems(model: Any) -> list[str]:
    """What onnx2tf / TensorRT would refuse or what makes shapes data-dependent (empty: nothing)."""
    problems = []
    for node in model.graph.node:
        if node.op_type in FORBIDDEN_OPS:
            problems.append(f"op {node.op_type} ({node.name})")
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"op {node.domain}.{node.op_type} from a non-standard domain ({node.name})")
        if node.op_type == "TopK":
            k = _constant(model, node.input[1]) if len(node.input) > 1 else None
            if k is None:
                problems.append(f"TopK {node.name} has a K computed at run time")
            elif int(np.asarray(k).reshape(-1)[0]) > MAX_TOPK:
                problems.append(f"TopK {node.name} has K > {MAX_TOPK}")
    initializers = {t.name for t in model.graph.initializer}
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") or d.dim_value < 1 for d in dims):
            problems.append(f"{value.name} has a dynamic shape")
    return problems


def _finish_graph(path: Path, meta: ModelMeta) -> dict[str, Any]:
    """Simplify, name, check and tag one exported file in place; returns its record entry (without sha256)."""
    import onnx

    raw = onnx.load(str(path))
    slim, simplifier = _simplify(raw)
    renamed = name_nodes(slim)
    del slim.metadata_props[:]
    onnx.helper.set_model_props(slim, {METADATA_KEY: meta.to_json()})
    slim.doc_string = f"MaskConver {meta.preset} ({meta.output} graph), exported by maskconver-deploy"
    problems = graph_problems(slim)
    if problems:
        listed = "; ".join(problems)
        raise CheckFailed(f"{path.name}: the exported graph uses what onnx2tf/TensorRT cannot take: {listed}")
    try:
        onnx.checker.check_model(slim, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise CheckFailed(f"{path.name}: the ONNX checker rejects the exported graph ({first})") from None
    onnx.save(slim, str(path))
    return {
        "file": path.name,
        "output": meta.output,
        "outputs": list(OUTPUT_NAMES[meta.output]),
        "nodes": len(slim.graph.node),
        "nodes_before_simplify": len(raw.graph.node),
        "renamed_nodes": renamed,
        "ops": op_counts(slim),
        "simplifier": simplifier,
    }


def check_images(size: tuple[int, int], count: int = CHECK_IMAGES) -> list[np.ndarray]:
    """Deterministic uint8 images at `size`: synthetic scenes (seed 0) alternating with uniform noise (seed 1)."""
    from maskconver_deploy.data.synthetic import generate_scene

    height, width = size
    rng = np.random.default_rng(1)
    images = []
    for index in range(count):
        if index % 2 == 0:
            scene = generate_scene(0, index, max(height, width)).image
            images.append(np.ascontiguousarray(scene[:height, :width]))
        else:
            images.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return images


def _torch_outputs(deploy: torch.nn.Module, graph: str, image: np.ndarray) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        values = deploy(torch.from_numpy(np.ascontiguousarray(image[None])))
    return {name: value.float().numpy() if value.is_floating_point() else value.numpy()
            for name, value in zip(OUTPUT_NAMES[graph], values, strict=True)}  # fmt: skip


def _tied_slots(scores: np.ndarray | None) -> np.ndarray | None:
    """bool [N]: proposals whose score is within TIE_ATOL of a neighbour's (their order is the runtime's choice)."""
    if scores is None:
        return None
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    close = np.abs(np.diff(values)) <= TIE_ATOL
    tied = np.zeros(values.shape, dtype=bool)
    tied[:-1] |= close
    tied[1:] |= close
    return tied


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per output, with the rules of the module docstring (step 5):
    panoptic / semantic maps: share of equal pixels, at least MAP_AGREEMENT; classes / centers: equal in every
    proposal slot, except slots whose scores tie; float outputs: max abs difference within its bound."""
    tied = _tied_slots(reference.get("scores"))
    out: dict[str, Any] = {}
    for name, want in reference.items():
        got = np.asarray(candidate[name])
        if got.shape != want.shape or got.dtype != want.dtype:
            out[name] = {"shape_ok": False, "shape": [*got.shape, str(got.dtype)],
                         "expected": [*want.shape, str(want.dtype)], "ok": False}
            continue
        if np.issubdtype(want.dtype, np.integer):
            same = got == want
            equal = float(same.mean()) if want.size else 1.0
            entry: dict[str, Any] = {"equal": equal}
            if name in ("panoptic", "semantic"):
                entry["ok"] = equal >= MAP_AGREEMENT
            elif tied is not None and name in ("classes", "centers"):
                slots = ~same.reshape(tied.size, -1).all(axis=1)
                entry["differing_slots"] = int(slots.sum())
                entry["ok"] = bool(np.all(tied[slots]))
            else:
                entry["ok"] = equal == 1.0
            out[name] = entry
        else:
            diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
            bound = SCORE_ATOL if name == "scores" else TENSOR_RTOL * max(1.0, float(np.max(np.abs(want))))
            out[name] = {"max_abs_diff": diff, "bound": bound, "ok": bool(diff <= bound)}
    return out


def verify_graph(path: Path, deploy: torch.nn.Module, graph: str, size: tuple[int, int]) -> dict[str, Any]:
    """ONNX Runtime (CPU, one thread) vs PyTorch on `check_images`; CheckFailed on any disagreement."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = list(OUTPUT_NAMES[graph])
    per_image = []
    for index, image in enumerate(check_images(size)):
        want = _torch_outputs(deploy, graph, image)
        got = dict(zip(names, session.run(names, {INPUT_NAME: image[None]}), strict=True))
        result = compare_outputs(want, got)
        per_image.append(result)
        bad = {k: v for k, v in result.items() if not v["ok"]}
        if bad:
            parts = []
            for key, value in bad.items():
                if "equal" in value:
                    parts.append(f"{key} equal on {100 * value['equal']:.3f}%")
                elif "max_abs_diff" in value:
                    parts.append(f"{key} differs by {value['max_abs_diff']:.3g} (> {value['bound']:.3g})")
                else:
                    parts.append(f"{key} has shape {value['shape']}, expected {value['expected']}")
            listed = ", ".join(parts)
            raise CheckFailed(f"{path.name}: ONNX Runtime disagrees with PyTorch on check image {index}: {listed}")
    summary: dict[str, Any] = {"images": len(per_image), "runtime": f"onnxruntime {ort.__version__} (CPU)"}
    for name in names:
        values = [r[name] for r in per_image]
        if "equal" in values[0]:
            summary[f"{name}_equal"] = min(v["equal"] for v in values)
        else:
            summary[f"{name}_max_abs_diff"] = max(v["max_abs_diff"] for v in values)
    return summary


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "maskconver-deploy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _check_target(model_dir: Path, force: bool) -> None:
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError("exists and is not a folder", model_dir)
    if model_dir.is_dir() and not force:
        present = [name for name in (MODEL_JSON, *GRAPH_FILES.values(), REFERENCE_NAME) if (model_dir / name).exists()]
        if present:
            raise UserError(f"already holds an exported model ({', '.join(present)}); pass --force to replace it",
                            model_dir)  # fmt: skip


def _publish(staging: Path, model_dir: Path) -> None:
    """Move the staged files into `model_dir`: model.json is removed first and written last."""
    if not model_dir.exists():
        os.replace(staging, model_dir)
        return
    sidecar = model_dir / MODEL_JSON
    if sidecar.exists():
        sidecar.unlink()  # until the new one lands, the folder is not a model folder
    for name in (*GRAPH_FILES.values(), REFERENCE_NAME):
        if (model_dir / name).exists() and not (staging / name).exists():
            (model_dir / name).unlink()  # a graph of the old export that this export does not have
    for item in sorted(staging.iterdir(), key=lambda p: p.name == MODEL_JSON):
        os.replace(item, model_dir / item.name)


def _export(
    checkpoint: Path,
    model_dir: Path,
    *,
    size: int | Sequence[int] | None,
    proposals: int | None,
    graphs: Sequence[str],
    force: bool,
    checkpoint_sha256: str | None = None,
    variant_of: str | None = None,
    on_step: Callable[[str], None] | None = None,
    merge: str | None = None,
    mask_activation: str | None = None,
) -> ModelDir:
    from maskconver_deploy.model.checkpoint import load_checkpoint, model_meta, save_checkpoint
    from maskconver_deploy.model.postprocess import DeployModel

    started = time.perf_counter()
    graphs = parse_graphs(graphs)
    _check_target(model_dir, force)
    model, categories, provenance = load_checkpoint(checkpoint)
    target_size = _size_pair(size, tuple(model.spec.input_size))
    num = int(proposals) if proposals is not None else int(model.spec.num_proposals)
    deploy_model = retarget(model, target_size, num, merge, mask_activation)
    changed = deploy_model is not model
    sha = checkpoint_sha256 or sha256_file(checkpoint)
    meta = model_meta(deploy_model, categories, output="panoptic", num_proposals=num, checkpoint_sha256=sha)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".maskconver-tmp-{model_dir.name}-", dir=model_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would become the model folder's mode
    try:
        graph_records: dict[str, Any] = {}
        verification: dict[str, Any] = {}
        for graph in graphs:
            deploy = DeployModel(deploy_model, output=graph, num_proposals=num)
            path = staging / GRAPH_FILES[graph]
            _export_onnx(deploy, graph, target_size, path)
            graph_meta = model_meta(deploy_model, categories, output=graph, num_proposals=num, checkpoint_sha256=sha)
            graph_records[graph] = _finish_graph(path, graph_meta)
            verification[graph] = verify_graph(path, deploy, graph, target_size)
            graph_records[graph]["sha256"] = sha256_file(path)
            graph_records[graph]["bytes"] = path.stat().st_size
            if on_step is not None:
                on_step(graph)
        reference = staging / REFERENCE_NAME
        if changed:
            derived = {**provenance, "derived_from_sha256": sha, "derived_from": str(checkpoint),
                       "changes": {"input_size": list(target_size), "num_proposals": num,
                                   "merge": deploy_model.spec.merge,
                                   "mask_activation": deploy_model.spec.mask_activation}}  # fmt: skip
            save_checkpoint(reference, deploy_model, categories, _plain(derived))
        else:
            shutil.copyfile(checkpoint, reference)
        record = {
            "graphs": graph_records,
            "opset": OPSET,
            "exporter": EXPORTER,
            "simplifier": next(iter(graph_records.values()))["simplifier"] if graph_records else None,
            "versions": _versions(),
            "checkpoint": {"path": str(checkpoint), "sha256": sha},
            "reference": {"file": REFERENCE_NAME, "sha256": sha256_file(reference),
                          "same_as_checkpoint": not changed},  # fmt: skip
            "input": {"name": INPUT_NAME, "shape": [1, target_size[0], target_size[1], 3], "dtype": "uint8",
                      "layout": "NHWC", "color": "RGB"},  # fmt: skip
            "verification": verification,
            "variant_of": variant_of,
            "merge": {"path": meta.merge, "mask_activation": meta.mask_activation,
                      "small_area_px": meta.extra.get("feature_small_area") if meta.merge == "feature"
                      else meta.small_area_threshold,
                      "resolution": list(deploy_model.spec.feature_size) if meta.merge == "feature"
                      else list(target_size)},
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(staging / MODEL_JSON, {"format": MODEL_FORMAT, **meta.to_dict(), "export": record})
        _publish(staging, model_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ModelDir(model_dir)


def _plain(value: Any) -> Any:
    """Provenance as plain JSON-like values (checkpoints refuse anything else)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

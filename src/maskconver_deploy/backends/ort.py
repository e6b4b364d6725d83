"""ONNX Runtime on the CPU execution provider: `ort` (desktop, .onnx) and `ort-mobile` (ORT format, .ort).

Artifacts in a model folder (`.raw` / `.semantic` before the extension for the other graphs):
    ort                  model.onnx itself: nothing to compile
    ort-int8-dynamic     ort-int8-dynamic.onnx   weight-only int8 (see below)
    ort-int8-static      ort-int8-static.onnx    QDQ, per-channel int8 weights, uint8 activations, calibrated
    ort-mobile           ort-mobile.ort + ort-mobile.required_operators.config
    ort-mobile-int8-static   the int8-static graph in ORT format (+ its operators config)
Each compiled artifact has a build record `<artifact>.json` (source ONNX sha256, versions, calibration hash,
quantisation settings, and a check against the source graph on two images).

Choices, and why:
- int8-dynamic is weight-only. `quantize_dynamic` on our convolutions emits ConvInteger, which the CPU EP runs
  8-9x slower than fp32 here (tiny 64x64: 15.7 ms vs 1.4 ms; shapes-256 at 256x256: 177 ms vs 19 ms, 2 threads);
  limited to MatMul/Gemm it changes nothing (the network is convolutions: 13.0 of 13.4 MB stay float). So every
  Conv/Gemm/MatMul weight outside the float set below is stored as int8 (symmetric, per output channel) with a
  DequantizeLinear in front; activations stay float. The file is ~3.4x smaller. The runner opens it with
  `session.disable_quant_qdq=1`, so ONNX Runtime folds the DequantizeLinear nodes at load and runs the fp32
  kernels: fp32 speed (1.33 vs 1.35 ms, 19.7 vs 20.2 ms); left as QDQ it ran 2x slower (41 ms). The mobile format
  bakes the graph in at conversion, where that folding would give back an fp32-sized file, so int8-dynamic is not
  offered for `ort-mobile`.
- int8-static: `quantize_static`, QDQ format, per-channel, MinMax calibration over our calibration set
  (letterboxed to the model's input size). `quant_pre_process` is not run: the exported graph is already
  simplified with full static shapes, and pre-processing it gave a bit-identical quantised model.
- Float set (both int8 paths): the post-processing, found by graph structure and not by names: every node that
  is not an ancestor of a convolution (sigmoid, peak NMS, TopK, gathers, class embedding, MLP, mask matmul,
  resize, hard-sigmoid, merge), plus the heads' last convolutions (those whose outputs the post-processing reads),
  so heatmap logits and scores keep float resolution: quantised scores reorder the top-N.
- ort-mobile: `python -m onnxruntime.tools.convert_onnx_models_to_ort --optimization_style Fixed
  --target_platform arm`. Fixed, because the CPU EP of a mobile build runs the graph as saved (Runtime style
  only pays off with NNAPI/CoreML). arm, because a Fixed file bakes in the converting machine's layout
  optimisations: converted for amd64 it holds NCHWc (AVX) kernels that do not exist on a phone, converted for arm
  it holds only portable ops. The price shows on this x86 desktop: without NCHWc, ONNX Runtime's depthwise
  convolutions are slow, so `ort-mobile` fp32 is timed far above `ort` here (about 15 vs 1.6 ms at 64x64); that
  number says nothing about a phone. The runner opens `.ort` files with graph optimisations off: it runs exactly
  the graph in the file, as a minimal mobile build does.
- Runner: CPU EP, `threads` -> intra_op_num_threads, inter_op_num_threads 1, sequential execution, ONNX Runtime's
  default graph optimisation (ENABLE_ALL: the NCHWc layout), intra-op spinning during a Run and
  `session.force_spinning_stop` after it. Measured against the other settings on this CPU (README "Backends"):
  ENABLE_EXTENDED or BASIC (no NCHWc) ran the shipped model 2.9x slower, spinning off 1.4x slower,
  denormals-as-zero the same; without the spinning stop, three sessions timed in turn ran 2-3x slower each than
  alone, with it as fast as alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.backends.base import Availability, Runner
from maskconver_deploy.errors import BackendUnavailable, CheckFailed, UserError
from maskconver_deploy.fileio import atomic_path, refuse_overwrite, sha256_file
from maskconver_deploy.modeldir import GRAPH_FILES, graph_suffix, read_onnx, record_path
from maskconver_deploy.types import INPUT_NAME, LABEL_DIVISOR, METADATA_KEY, ModelMeta, Precision

FAMILY = "ort"
MOBILE = "ort-mobile"
FAMILIES = (FAMILY, MOBILE)
PRECISIONS: dict[str, tuple[Precision, ...]] = {
    FAMILY: (Precision.FP32, Precision.INT8_DYNAMIC, Precision.INT8_STATIC),
    MOBILE: (Precision.FP32, Precision.INT8_STATIC),
}
HINT = 'pip install "onnxruntime==1.32.0" (pinned in pyproject.toml: pip install -e .)'
RECORD_FORMAT = "maskconver-ort/1"
OPERATORS_CONFIG_SUFFIX = ".required_operators.config"
MOBILE_STYLE = "Fixed"
MOBILE_TARGET = "arm"
CONVERTER = "onnxruntime.tools.convert_onnx_models_to_ort"
CONVERTER_TIMEOUT_S = 1800
# Session settings an artifact needs: weight-only int8 is folded back to float at load (see the module doc)
SESSION_CONFIG: dict[Precision, dict[str, str]] = {Precision.INT8_DYNAMIC: {"session.disable_quant_qdq": "1"}}
# Every session: worker threads stop spinning when a Run returns. Without it, an idle session's spinning workers
# slowed every other session in the process 2-3x (README "Backends"); alone, a session is as fast either way.
COMMON_SESSION_CONFIG = {"session.force_spinning_stop": "1"}
FP32_AGREEMENT_FLOOR = 0.999  # ort-mobile fp32 vs the source graph, panoptic pixels
CHECK_IMAGES = 2
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


# ---------------------------------------------------------------------------------------------------------------
# Names, paths, availability
# ---------------------------------------------------------------------------------------------------------------
def _parse(name: Any) -> Any:
    """A BackendName of this module (UserError for other families or precisions it does not offer)."""
    from maskconver_deploy.backends import BackendName, parse_backend

    parsed = name if isinstance(name, BackendName) else parse_backend(str(name))
    if parsed.family not in FAMILIES or parsed.precision not in PRECISIONS[parsed.family]:
        allowed = ", ".join(str(BackendName(f, p)) for f in FAMILIES for p in PRECISIONS[f])
        raise UserError(f"'{name}' is not an ONNX Runtime backend; use one of {allowed}")
    return parsed


def artifact_path(model_dir: str | Path, name: Any, graph: str = "panoptic") -> Path:
    """The artifact of backend `name` for `graph` in a model folder (module docstring)."""
    parsed = _parse(name)
    suffix = graph_suffix(graph)
    if parsed.family == FAMILY and parsed.precision is Precision.FP32:
        return Path(model_dir) / GRAPH_FILES[graph]
    ext = ".ort" if parsed.family == MOBILE else ".onnx"
    return Path(model_dir) / f"{parsed}{suffix}{ext}"


def operators_config_path(artifact: str | Path) -> Path:
    """ort-mobile.ort -> ort-mobile.required_operators.config (input of a reduced build's --include_ops_by_config)."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.stem + OPERATORS_CONFIG_SUFFIX)


def availability(family: str = FAMILY) -> Availability:
    """The onnxruntime package (and, for ort-mobile, its ORT-format converter). Never raises; imports nothing."""
    if family not in FAMILIES:
        return Availability(False, f"'{family}' is not served by the ONNX Runtime backend")
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError) as exc:
        return Availability(False, f"onnxruntime cannot be found ({exc})", HINT)
    if spec is None or spec.origin is None:
        return Availability(False, "onnxruntime is not installed", HINT)
    if family == MOBILE:
        tool = Path(spec.origin).parent / "tools" / "convert_onnx_models_to_ort.py"
        if not tool.is_file():
            return Availability(False, f"this onnxruntime has no ORT-format converter ({CONVERTER})", HINT)
    return Availability(True)


def _require(family: str) -> None:
    status = availability(family)
    if not status.ok:
        raise BackendUnavailable(family, status.reason, status.hint)


def _first_line(exc: BaseException | str) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


# ---------------------------------------------------------------------------------------------------------------
# The graph: input spec, float set
# ---------------------------------------------------------------------------------------------------------------
def input_size(model: Any, path: Path) -> tuple[int, int]:
    """(H, W) of the one input `image`, uint8 [1, H, W, 3] with static sizes (UserError otherwise)."""
    from onnx import TensorProto

    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise UserError(f"expected one input named '{INPUT_NAME}', the graph has {[i.name for i in inputs]}", path)
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if tensor.elem_type != TensorProto.UINT8 or len(dims) != 4 or dims[0] != 1 or dims[3] != 3 or min(dims) < 1:
        kind = TensorProto.DataType.Name(tensor.elem_type)
        raise UserError(f"input '{INPUT_NAME}' must be uint8 [1, H, W, 3] with static sizes, got {kind} {dims}", path)
    return dims[1], dims[2]


def float_nodes(model: Any) -> set[str]:
    """Names of the nodes kept in float by the int8 paths (module docstring): the post-processing, i.e. every node
    that is no ancestor of a Conv, plus the Convs whose outputs the post-processing or a graph output reads."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    network: set[str] = set()
    stack = [node for node in graph.node if node.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name in network:
            continue
        network.add(node.name)
        stack.extend(producer[name] for name in node.input if name in producer)
    post = {node.name for node in graph.node if node.name not in network}
    read_by_post = {name for node in graph.node if node.name in post for name in node.input}
    read_by_post |= {output.name for output in graph.output}
    heads = {node.name for node in graph.node
             if node.op_type == "Conv" and any(out in read_by_post for out in node.output)}  # fmt: skip
    return post | heads


def _name_nodes(model: Any) -> None:
    used: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in used:
            node.name = f"/mcv/{node.op_type}_{index}"
        used.add(node.name)


def _weight_axis(node: Any, weight: np.ndarray) -> int | None:
    """Output-channel axis of a weight: Conv W[M, C, k, k] -> 0; Gemm B -> 0 if transB else 1; MatMul B[K, N] -> 1."""
    if node.op_type == "Conv":
        return 0
    if weight.ndim != 2:
        return None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1


def weight_only_int8(model: Any, keep_float: set[str]) -> dict[str, Any]:
    """In place: int8 per-channel symmetric weights + DequantizeLinear for Conv/Gemm/MatMul outside `keep_float`."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes, new_inits = [], []
    quantized, float_bytes, int8_bytes = 0, 0, 0
    for node in model.graph.node:
        name = node.input[1] if len(node.input) > 1 else ""
        init = initializers.get(name)
        if node.op_type in QUANTIZED_OPS and node.name not in keep_float and init is not None \
                and init.data_type == TensorProto.FLOAT and users.get(name) == 1:  # fmt: skip
            weight = numpy_helper.to_array(init).astype(np.float32)
            axis = _weight_axis(node, weight)
            if axis is not None and weight.ndim >= 2:
                reduce = tuple(i for i in range(weight.ndim) if i != axis)
                scale = np.maximum(np.abs(weight).max(axis=reduce), np.float32(1e-12)) / np.float32(127.0)
                shape = [1] * weight.ndim
                shape[axis] = -1
                q = np.clip(np.rint(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
                base = f"{name}__int8"
                scale_name, zero_name, dequantized = f"{base}_scale", f"{base}_zero_point", f"{base}_dequantized"
                new_inits += [numpy_helper.from_array(q, base),
                              numpy_helper.from_array(scale.astype(np.float32), scale_name),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int8), zero_name)]  # fmt: skip
                new_nodes.append(helper.make_node("DequantizeLinear", [base, scale_name, zero_name], [dequantized],
                                                  axis=axis, name=f"{node.name}/weight_dequantize"))  # fmt: skip
                node.input[1] = dequantized
                model.graph.initializer.remove(init)
                quantized += 1
                float_bytes += weight.nbytes
                int8_bytes += q.nbytes + scale.nbytes * 2
        new_nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    return {"weights": "int8, symmetric, per output channel (DequantizeLinear, folded to float at load)",
            "activations": "float32", "quantized_nodes": quantized, "float_nodes": len(keep_float),
            "weight_bytes_float": float_bytes, "weight_bytes_int8": int8_bytes,
            "session_config": SESSION_CONFIG[Precision.INT8_DYNAMIC]}  # fmt: skip


def _load_calibration(calib: Any) -> Any:
    """A CalibrationSet (anything with `.images()` and `.manifest_hash`) or a calibration folder."""
    if hasattr(calib, "images") and hasattr(calib, "manifest_hash"):
        return calib
    from maskconver_deploy.calibration import load_calibration

    return load_calibration(Path(calib))


def _calibration_images(calibration_set: Any, size: tuple[int, int]) -> Iterator[np.ndarray]:
    try:
        images = calibration_set.images(size)
    except TypeError:  # a set without letterboxing: it must already have the model's size
        images = calibration_set.images()
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.shape != (size[0], size[1], 3):
            raise UserError(f"calibration image is {image.dtype} {image.shape}, the model takes uint8 "
                            f"({size[0]}, {size[1]}, 3)")  # fmt: skip
        yield image


def quantize_qdq(source: Path, out: Path, keep_float: set[str], calibration_set: Any,
                 size: tuple[int, int]) -> dict[str, Any]:  # fmt: skip
    """Static QDQ int8 of `source` into `out`, calibrated over `calibration_set` (MinMax, per-channel)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.count = 0
            self._images = _calibration_images(calibration_set, size)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self._images, None)
            if image is None:
                return None
            self.count += 1
            return {INPUT_NAME: np.ascontiguousarray(image[None])}

    reader = Reader()
    # quantize_static logs a root-logger WARNING advising its pre-processing step; the graph is already simplified
    # with static shapes (see "preprocess" below), so that advice is noise on the user's terminal
    logging.disable(logging.WARNING)
    try:
        with _runtime_errors(source):
            quantize_static(
                str(source), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=sorted(keep_float),
                # MinMax keeps one min and max per tensor and image (small); CalibMaxIntermediateOutputs is not
                # used: in onnxruntime 1.32 it drops the collected batches instead of merging them
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )  # fmt: skip
    finally:
        logging.disable(logging.NOTSET)
    if reader.count == 0:
        raise UserError("the calibration set gave no images")
    return {"format": "QDQ", "weights": "int8, symmetric, per output channel", "activations": "uint8, asymmetric",
            "calibration": "MinMax", "calibration_images": reader.count, "float_nodes": len(keep_float),
            "preprocess": "none (graph already simplified, static shapes)"}  # fmt: skip


@contextlib.contextmanager
def _runtime_errors(path: Path) -> Iterator[None]:
    """ONNX Runtime's own failures while it runs a graph (a Conv whose weights do not fit ...): one-line UserError."""
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise UserError(f"ONNX Runtime fails to run it ({type(exc).__name__}: {_first_line(exc)})", path) from None


def _tag(path: Path, meta: ModelMeta, extra: dict[str, Any]) -> None:
    """Make sure a derived ONNX carries our metadata (plus how it was made)."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = meta.to_json()
    props["maskconver.build"] = json.dumps(extra)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def convert_to_ort(source: Path, out_dir: Path, onnx_path: Path) -> tuple[Path, Path]:
    """Run onnxruntime's own converter (Fixed style, arm target); returns (.ort, required operators config)."""
    command = [sys.executable, "-m", CONVERTER, str(source), "--output_dir", str(out_dir),
               "--optimization_style", MOBILE_STYLE, "--target_platform", MOBILE_TARGET]  # fmt: skip
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=CONVERTER_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise UserError(f"the ORT format converter did not finish in {CONVERTER_TIMEOUT_S} s", onnx_path) from None
    ort_file = out_dir / f"{source.stem}.ort"
    config = out_dir / f"{source.stem}{OPERATORS_CONFIG_SUFFIX}"
    if proc.returncode != 0 or not ort_file.is_file() or not config.is_file():
        text = proc.stdout + proc.stderr
        errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "fail" in ln.lower()]
        detail = (errors[-1] if errors else _first_line(text or "no output"))[:300]
        raise UserError(f"the ORT format converter failed (exit {proc.returncode}): {detail}", onnx_path)
    return ort_file, config


def session_options(path: Path, precision: Precision, threads: int | None = None) -> Any:
    """The SessionOptions the runner opens an artifact with (the profiler uses the same, so it profiles that graph)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    if path.suffix == ".ort":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in {**COMMON_SESSION_CONFIG, **SESSION_CONFIG.get(precision, {})}.items():
        options.add_session_config_entry(key, value)
    return options


def _session(path: Path, precision: Precision, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = session_options(path, precision, threads)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # InvalidGraph, InvalidProtobuf, Fail, NotImplemented ...
        raise UserError(f"ONNX Runtime cannot load it ({type(exc).__name__}: {_first_line(exc)})", path) from None


def check_images(size: tuple[int, int], calibration_set: Any | None, count: int = CHECK_IMAGES) -> list[np.ndarray]:
    """Images for the post-build check: the calibration set's first ones, else deterministic synthetic scenes."""
    if calibration_set is not None:
        images = []
        for image in _calibration_images(calibration_set, size):
            images.append(image)
            if len(images) == count:
                return images
        if images:
            return images
    from maskconver_deploy.data.synthetic import generate_scene

    return [np.ascontiguousarray(generate_scene(12345, i, max(size)).image[: size[0], : size[1]]) for i in range(count)]


def compare_with_source(artifact: Path, precision: Precision, source: Path, images: list[np.ndarray]) -> dict[str, Any]:
    """The artifact against its source graph (both in ONNX Runtime) on `images`: share of equal integer outputs
    (mean and min over the images; `category` compares the class of every panoptic pixel, blind to which proposal
    slot a segment came from) and max abs difference of float outputs."""
    built, reference = _session(artifact, precision, threads=1), _session(source, Precision.FP32, threads=1)
    names = [o.name for o in reference.get_outputs()]
    agree: dict[str, list[float]] = {}
    diffs: dict[str, list[float]] = {}
    for image in images:
        feeds = {INPUT_NAME: image[None]}
        with _runtime_errors(source):
            want = dict(zip(names, reference.run(names, feeds), strict=True))
        with _runtime_errors(artifact):
            got = dict(zip(names, built.run(names, feeds), strict=True))
        if "panoptic" in want:  # ids carry the proposal slot: a category map is blind to reordered slots
            same = (got["panoptic"] // LABEL_DIVISOR) == (want["panoptic"] // LABEL_DIVISOR)
            agree.setdefault("category", []).append(float(same.mean()))
        for name in names:
            if np.issubdtype(want[name].dtype, np.integer):
                agree.setdefault(name, []).append(float((got[name] == want[name]).mean()))
            else:
                diffs.setdefault(name, []).append(float(np.max(np.abs(got[name].astype(np.float64) - want[name]))))
    out: dict[str, Any] = {"images": len(images), "against": source.name}
    for name, values in agree.items():
        out[f"{name}_agreement"] = float(np.mean(values))
        out[f"{name}_agreement_min"] = min(values)
    out.update({f"{name}_max_abs_diff": max(values) for name, values in diffs.items()})
    return out


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("onnxruntime", "onnx", "numpy", "maskconver-deploy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


# ---------------------------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------------------------
def compile_onnx(
    onnx_path: str | Path, out_path: str | Path, name: Any, calib: Any = None, force: bool = False
) -> Path:
    """Build the artifact of backend `name` from an exported graph; write it atomically with `<artifact>.json`.

    `ort` fp32 runs the exported graph itself: the graph is checked (readable, ours, loads in ONNX Runtime) and its
    path returned. int8-static needs `calib` (a calibration folder or a loaded CalibrationSet). An existing
    artifact is replaced only with `force`; on any failure or interruption nothing is left at the destination.
    """
    started = time.perf_counter()
    parsed = _parse(name)
    precision = parsed.precision
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    _require(parsed.family)
    mobile = parsed.family == MOBILE
    passthrough = not mobile and precision is Precision.FP32 and out_path.resolve() == onnx_path.resolve()
    if not passthrough:
        refuse_overwrite(out_path, force)
        if mobile:
            refuse_overwrite(operators_config_path(out_path), force)
    if precision is Precision.INT8_STATIC and calib is None:
        raise UserError(f"{parsed} needs a calibration set: pass --calib calibration/NAME "
                        "(see `maskconver calib make`)")  # fmt: skip
    model, meta = read_onnx(onnx_path)
    assert meta is not None
    size = input_size(model, onnx_path)
    if tuple(meta.input_size) != size:
        raise UserError(f"the graph takes {size[0]}x{size[1]} but its metadata says "
                        f"{meta.input_size[0]}x{meta.input_size[1]}", onnx_path)  # fmt: skip
    calibration_set = _load_calibration(calib) if precision is Precision.INT8_STATIC else None
    _session(onnx_path, Precision.FP32)  # ONNX Runtime loads it (a graph it refuses is a UserError, before any work)
    if passthrough:
        return onnx_path

    with tempfile.TemporaryDirectory(prefix="maskconver-ort-") as scratch_name:
        scratch = Path(scratch_name)
        stem = out_path.name[: -len(out_path.suffix)] if out_path.suffix else out_path.name
        work = scratch / f"{stem}.onnx"  # the converter names its output after its input
        quantization: dict[str, Any] | None = None
        if precision is Precision.FP32:
            shutil.copyfile(onnx_path, work)
        else:
            _name_nodes(model)
            keep = float_nodes(model)
            if precision is Precision.INT8_DYNAMIC:
                quantization = weight_only_int8(model, keep)
                import onnx

                onnx.save(model, str(work))
            else:
                import onnx

                named = scratch / "source.onnx"
                onnx.save(model, str(named))
                quantization = quantize_qdq(named, work, keep, calibration_set, size)
            _tag(work, meta, {"backend": str(parsed), "quantization": quantization})
        conversion = None
        config_file = None
        built = work
        if mobile:
            built, config_file = convert_to_ort(work, scratch / "ort", onnx_path)
            conversion = {"tool": f"python -m {CONVERTER}", "optimization_style": MOBILE_STYLE,
                          "target_platform": MOBILE_TARGET,
                          "operators_config": operators_config_path(out_path).name}  # fmt: skip
        check = compare_with_source(built, precision, onnx_path, check_images(size, calibration_set))
        agreement = check.get("panoptic_agreement_min")
        if precision is Precision.FP32 and agreement is not None and agreement < FP32_AGREEMENT_FLOOR:
            floor = 100 * FP32_AGREEMENT_FLOOR
            raise CheckFailed(f"{out_path.name}: the {parsed} artifact agrees with {onnx_path.name} on only "
                              f"{100 * agreement:.2f}% of panoptic pixels (expected >= {floor:.1f}%)")  # fmt: skip
        record = {
            "format": RECORD_FORMAT,
            "backend": str(parsed),
            "family": parsed.family,
            "precision": precision.value,
            "artifact": out_path.name,
            "artifact_sha256": sha256_file(built),
            "graph": meta.output,
            "source_onnx": onnx_path.name,
            "source_onnx_sha256": sha256_file(onnx_path),
            "input": {"name": INPUT_NAME, "shape": [1, size[0], size[1], 3], "dtype": "uint8", "layout": "NHWC"},
            "quantization": quantization,
            "conversion": conversion,
            "session_config": SESSION_CONFIG.get(precision, {}),
            "check": check,
            "calibration": None if calibration_set is None else {
                "manifest_hash": str(calibration_set.manifest_hash),
                "path": str(getattr(calibration_set, "path", calib)),
                "images": (quantization or {}).get("calibration_images")},  # fmt: skip
            "calibration_manifest_hash": None if calibration_set is None else str(calibration_set.manifest_hash),
            "tool_versions": _tool_versions(),
            "seconds": round(time.perf_counter() - started, 2),
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with atomic_path(out_path, force=force) as tmp:
            shutil.copyfile(built, tmp)
        if config_file is not None:
            text = config_file.read_text().replace(str(built), out_path.name)
            with atomic_path(operators_config_path(out_path), force=True) as tmp:
                tmp.write_text(text)
        with atomic_path(record_path(out_path), force=True) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return out_path


# ---------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------
class OrtRunner(Runner):
    """An .onnx or .ort artifact in an ONNX Runtime CPU session (settings in the module docstring)."""

    def __init__(self, name: str, artifact: Path, meta: ModelMeta, threads: int | None = None,
                 precision: Precision = Precision.FP32) -> None:  # fmt: skip
        super().__init__(name, artifact, meta, threads)
        self.precision = precision
        self._session: Any = None
        self._outputs: list[str] = []

    def _open(self) -> None:
        _require(FAMILY)
        if not self.artifact.is_file():
            hint = f"build it with `maskconver compile --backend {self.name}`"
            raise UserError(f"no such artifact; {hint}", self.artifact)
        session = _session(self.artifact, self.precision, self.threads)
        inputs = session.get_inputs()
        h, w = self.meta.input_size
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)" \
                or list(inputs[0].shape) != [1, h, w, 3]:  # fmt: skip
            got = [(i.name, i.type, i.shape) for i in inputs]
            raise UserError(f"the artifact takes {got}, the model meta says {INPUT_NAME} uint8 [1, {h}, {w}, 3]",
                            self.artifact)  # fmt: skip
        available = [o.name for o in session.get_outputs()]
        missing = [n for n in self.meta.output_names if n not in available]
        if missing:
            raise UserError(f"the artifact lacks outputs {missing} (it has {available})", self.artifact)
        self._outputs = available
        self._session = session

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._outputs, feeds)
        return dict(zip(self._outputs, values, strict=True))

    def _close(self) -> None:
        self._session = None


def open_runner(artifact: str | Path, meta: ModelMeta, name: Any = FAMILY, threads: int | None = None) -> OrtRunner:
    """An OrtRunner for an artifact (opened on first use). Missing artifact: UserError with the compile command."""
    parsed = _parse(name)
    artifact = Path(artifact)
    _require(parsed.family)
    if not artifact.is_file():
        raise UserError(f"no such artifact; build it with `maskconver compile --backend {parsed}`", artifact)
    return OrtRunner(str(parsed), artifact, meta, threads=threads, precision=parsed.precision)

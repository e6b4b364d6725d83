"""TFLite / LiteRT: ONNX -> `.tflite` (fp32, fp16, int8-dynamic, int8) and `TfliteRunner` on the LiteRT interpreter.

How `compile_onnx` builds an artifact (in a scratch folder; nothing is written beside the source until the end):

1. The ONNX graph is split in two (`split_graph`). The *network* is every node that feeds a convolution (input
   cast, normalisation, backbone, decoder, heads); the *post-processing* is the rest (sigmoid, peak NMS, top-N,
   mask embeddings, mask logits, upsampling, panoptic merge). Between them are the heads' 4D outputs.
2. The network goes through onnx2tf. Its uint8 NHWC input is presented to onnx2tf as NCHW (one Transpose in
   front), so onnx2tf's layout handling sees the layout it expects and its NCHW->NHWC step hands back exactly our
   `image: uint8 [1, H, W, 3]`. The layout of each network output is then decided by comparing it with ONNX Runtime.
   Depthwise convolutions over 25 taps (the heads' 7x7) are first split into row bands (`split_wide_depthwise`):
   XNNPACK runs a 7x7 depthwise conv several times slower than the bands (35x in int8); not for int8-dynamic.
3. The post-processing is converted op by op into TensorFlow *in the ONNX layout* (`_TailConverter`). onnx2tf
   1.29.24 cannot do this part: on the whole graph it stops with a shape error in the merge's `Where`, and on a 4D
   variant it gave a panoptic map that agreed on 68% of pixels; its layout guesses go wrong on [N, H, W] tensors.
4. Both halves become one TensorFlow function with named outputs (a SignatureDef, so the runner finds outputs by
   our names), converted by the TFLite converter: fp32; fp16 (float16 weights); int8-dynamic (dynamic-range: int8
   weights, float activations); int8 (full integer network calibrated on our calibration set, float I/O). In int8
   the post-processing and the heads' last convolutions stay float (`_tf_int8`): heatmap logits, scores, top-N,
   argmax and the merge (TopK/ArgMax in int8 reorder ties: 68-75% of pixels on a stand-in model). onnx2tf's own
   quantisation (`-oiqt`, `-cind`) is not used: `-cind` silently broke its layout handling.
5. The new `.tflite` (LiteRT) and the source ONNX (ONNX Runtime) run on two images; the agreement goes into the
   build record `<artifact>.json`. An fp32 artifact below 99.9% of pixels is refused (CheckFailed).

Which code runs where (TensorFlow and onnx2tf pin numpy 1, onnx 1.19, onnxruntime 1.23, so they never share the
toolkit's environment):
- this module (`__init__.py`): the toolkit side, in the toolkit's environment: steps 1 and 5, the graph surgery on
  ONNX, the subprocess that runs the builder, the build record and `TfliteRunner` (LiteRT). It imports
  ai_edge_litert, onnx and onnxruntime inside functions only.
- `builder.py` (steps 2-4) and `tail.py` (the op-by-op post-processing converter): the onnx2tf side, run as
  `python -m maskconver_deploy.backends.tflite build SCRATCH PRECISION` (`__main__.py`) with the onnx2tf
  environment's Python; they import only numpy, onnx, onnxruntime, tensorflow and onnx2tf (and `common.py`,
  `types.py`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.backends.base import Availability, Runner
from maskconver_deploy.backends.tflite.common import CUT_PREFIX, POST_SCOPE, RECORD_FORMAT, SIGNATURE
from maskconver_deploy.backends.tflite.tail import text as _text
from maskconver_deploy.errors import BackendUnavailable, CheckFailed, UserError
from maskconver_deploy.fileio import atomic_path, read_json, refuse_overwrite, sha256_file
from maskconver_deploy.modeldir import graph_suffix, record_path
from maskconver_deploy.types import INPUT_NAME, LABEL_DIVISOR, ModelMeta, Precision

FAMILY = "tflite"
FAMILIES = (FAMILY,)
PRECISIONS = {FAMILY: (Precision.FP32, Precision.FP16, Precision.INT8_DYNAMIC, Precision.INT8)}
EXT = ".tflite"
ENV_VAR = "MASKCONVER_ONNX2TF"  # path of an onnx2tf executable (its environment's python runs the build)
HINT_LITERT = 'pip install ".[tflite]"'
HINT_ONNX2TF = "make install (creates .venv-onnx2tf from requirements-onnx2tf.txt), or set MASKCONVER_ONNX2TF"
ONNX2TF_SAMPLE_NAME = "calibration_image_sample_data_20x128x128x3_float32.npy"  # onnx2tf downloads it if absent
MAX_DEPTHWISE_TAPS = 25  # larger depthwise kernels are split in row bands (split_wide_depthwise)
FP32_AGREEMENT_FLOOR = 0.999
CHECK_IMAGES = 2
BUILD_TIMEOUT_S = 3600
MAP_OUTPUTS = ("panoptic", "semantic")  # integer maps compared pixel by pixel in the post-build check


# ---------------------------------------------------------------------------------------------------------------
# Names, availability
# ---------------------------------------------------------------------------------------------------------------
def artifact_path(model_dir: str | Path, name: Any, graph: str = "panoptic") -> Path:
    """`.tflite` file for backend `name` ('tflite', 'tflite-fp16', 'tflite-int8-dynamic', 'tflite-int8')."""
    return Path(model_dir) / f"{name}{graph_suffix(graph)}{EXT}"


def read_record(artifact: str | Path) -> dict[str, Any]:
    """The build record of an artifact (UserError if it is missing or not JSON)."""
    return read_json(record_path(artifact))


def op_dtypes(artifact: str | Path) -> dict[str, set[str]]:
    """Op type -> dtypes of the tensors it reads and writes, for a `.tflite` (what runs in int8, what in float)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(artifact))
    tensors = {d["index"]: np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}
    out: dict[str, set[str]] = {}
    for op in interpreter._get_ops_details():  # noqa: SLF001
        out.setdefault(op["op_name"], set()).update(tensors[i] for i in [*op["inputs"], *op["outputs"]] if i >= 0)
    return out


def _precision_of(name: Any) -> Precision:
    from maskconver_deploy.backends import parse_backend

    backend = parse_backend(str(name))
    if backend.family != FAMILY or backend.precision not in PRECISIONS[FAMILY]:
        allowed = ", ".join(FAMILY if p is Precision.FP32 else f"{FAMILY}-{p.value}" for p in PRECISIONS[FAMILY])
        raise UserError(f"'{name}' is not a TFLite backend; use one of {allowed}")
    return backend.precision


def find_onnx2tf() -> tuple[Path | None, str]:
    """The onnx2tf executable: $MASKCONVER_ONNX2TF, else <checkout>/.venv-onnx2tf/bin/onnx2tf, else PATH.

    Returns (path or None, where it was looked for). A set but wrong $MASKCONVER_ONNX2TF is not silently replaced.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path, f"${ENV_VAR}"
        return None, f"${ENV_VAR}={configured} is not an executable file"
    root = next((p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()), None)
    if root is not None:
        candidate = root / ".venv-onnx2tf" / "bin" / "onnx2tf"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate, str(candidate)
    found = shutil.which("onnx2tf")
    if found:
        return Path(found), "PATH"
    return None, f"no onnx2tf executable in {root / '.venv-onnx2tf/bin/onnx2tf'} or PATH" if root else "PATH"


def _python_of(executable: Path) -> Path:
    """The Python of the environment that holds an onnx2tf executable: `python` beside it, else its #! line."""
    for name in ("python", "python3"):
        if (executable.parent / name).exists():
            return executable.parent / name
    try:
        with open(executable, "rb") as handle:
            first = handle.readline(300).decode(errors="replace").strip()
    except OSError:
        first = ""
    interpreter = first[2:].split()[0] if first.startswith("#!") and first[2:].split() else ""
    if interpreter and Path(interpreter).name != "env" and Path(interpreter).exists():
        return Path(interpreter)
    raise UserError("cannot find the Python interpreter of the onnx2tf environment", executable)


def _litert_missing() -> Availability | None:
    try:
        if importlib.util.find_spec("ai_edge_litert") is not None:
            return None
        return Availability(False, "the LiteRT interpreter (ai-edge-litert) is not installed", HINT_LITERT)
    except (ImportError, ValueError) as exc:  # a broken install
        return Availability(False, f"ai-edge-litert cannot be imported ({exc})", HINT_LITERT)


def availability(family: str = FAMILY) -> Availability:
    """Can TFLite artifacts be built and run here? The LiteRT interpreter and onnx2tf's environment. Never raises."""
    missing = _litert_missing()
    if missing is not None:
        return missing
    path, where = find_onnx2tf()
    if path is None:
        return Availability(False, f"the onnx2tf converter was not found ({where})", HINT_ONNX2TF)
    return Availability(True)


# ---------------------------------------------------------------------------------------------------------------
# Graph preparation (toolkit side, onnx only)
# ---------------------------------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _static_shape(value_info: Any) -> list[int] | None:
    dims = value_info.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return shape if shape and all(d > 0 for d in shape) else None


def check_input(model: Any, onnx_path: Path) -> tuple[int, int]:
    """The graph must have one input `image`, uint8 [1, H, W, 3] with static H, W. Returns (H, W)."""
    from onnx import TensorProto

    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise UserError(f"expected one input named '{INPUT_NAME}', the graph has {[i.name for i in inputs]}", onnx_path)
    shape = _static_shape(inputs[0])
    elem = inputs[0].type.tensor_type.elem_type
    if elem != TensorProto.UINT8 or shape is None or len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        kind = TensorProto.DataType.Name(elem)
        raise UserError(f"input '{INPUT_NAME}' must be uint8 [1, H, W, 3] with static sizes, got {kind} "
                        f"{shape or 'dynamic'}", onnx_path)  # fmt: skip
    return shape[1], shape[2]


def split_graph(model: Any) -> tuple[Any, Any, list[str]]:
    """Split into (network model, post-processing model, cut tensor names); see the module docstring.

    The network is every node that is a Conv or an ancestor of one; the cut tensors are the network's outputs that
    the post-processing or the graph outputs read, renamed `mcv_cut_<i>` in both models. The network model takes
    the image as NCHW (a Transpose in front); the post-processing model has the graph's outputs.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    network: set[int] = set()
    stack = [node for node in graph.node if node.op_type == "Conv"]
    if not stack:
        raise ValueError("the graph has no convolution")
    while stack:
        node = stack.pop()
        if id(node) not in network:
            network.add(id(node))
            stack.extend(producer[name] for name in node.input if name in producer)
    net_nodes = [n for n in graph.node if id(n) in network]
    tail_nodes = [n for n in graph.node if id(n) not in network]
    if any(INPUT_NAME in n.input for n in tail_nodes):
        raise ValueError(f"the post-processing reads the input '{INPUT_NAME}' directly")
    net_outputs = {out for n in net_nodes for out in n.output}
    read = [*(i for n in tail_nodes for i in n.input), *(o.name for o in graph.output)]
    cut = list(dict.fromkeys(name for name in read if name in net_outputs))
    rename = {name: f"{CUT_PREFIX}{i}" for i, name in enumerate(cut)}
    initializers = {t.name: t for t in graph.initializer}
    shapes = _value_shapes(model)

    def copy_nodes(nodes: Sequence[Any], extra: dict[str, str]) -> list[Any]:
        copies = []
        for node in nodes:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.input[:] = [extra.get(i, rename.get(i, i)) for i in new.input]
            new.output[:] = [rename.get(o, o) for o in new.output]
            copies.append(new)
        return copies

    def used_initializers(nodes: Sequence[Any]) -> list[Any]:
        return [initializers[name] for name in {i for n in nodes for i in n.input} if name in initializers]

    def make_model(nodes: list[Any], name: str, inputs: list[Any], outputs: list[Any], source: list[Any]) -> Any:
        body = helper.make_graph(nodes, name, inputs, outputs, used_initializers(source))
        return helper.make_model(body, opset_imports=list(model.opset_import), ir_version=model.ir_version)

    image = next(i for i in graph.input if i.name == INPUT_NAME)
    _, height, width, channels = _static_shape(image)  # checked by check_input
    nhwc = f"{INPUT_NAME}__nhwc"
    front = helper.make_node("Transpose", [INPUT_NAME], [nhwc], perm=[0, 2, 3, 1], name="mcv_to_nhwc")
    net_in = helper.make_tensor_value_info(INPUT_NAME, image.type.tensor_type.elem_type, [1, channels, height, width])
    cut_info = [_value_info(rename[name], shapes.get(name)) for name in cut]
    net_model = make_model([front, *copy_nodes(net_nodes, {INPUT_NAME: nhwc})], "network", [net_in], cut_info,
                           net_nodes)  # fmt: skip
    tail_body = copy_nodes(tail_nodes, {})
    for out in graph.output:  # a network tensor that is also a graph output (raw graph: heatmap) passes through
        if out.name in rename:
            tail_body.append(helper.make_node("Identity", [rename[out.name]], [out.name], name=f"mcv_pass_{out.name}"))
    tail_model = make_model(tail_body, "postprocess", cut_info, list(graph.output), tail_nodes)
    return net_model, tail_model, cut


def split_wide_depthwise(model: Any) -> list[str]:
    """In place: every depthwise Conv with more than MAX_DEPTHWISE_TAPS taps (the heads' 7x7) becomes row bands of
    at most that many taps (7x7 -> 3x7 + 3x7 + 1x7), summed. Each band is a Conv with the original pads on the
    original input, and a Slice of its output rows (band from kernel row s: output rows s .. s + H_out). The same
    arithmetic in another order; LiteRT's XNNPACK runs it ~7x (fp32) to ~35x (int8) faster than one 7x7 (measured
    on x86-64: a 7x7 depthwise conv at 32x32x256 took 10 ms fp32 and 50 ms int8, the three bands 1.3 and 1.4 ms).
    Nothing but a Conv reads the input (at the cost of a few more output rows per band): onnx2tf keeps the bands
    in NHWC this way, where an explicit Pad on a tensor it had lost the layout of (the sum of the decoder's Resize
    and a Conv) became Transpose + Pad + Slice + Transpose. Returns the names of the nodes it split."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    shapes = _value_shapes(model)
    nodes, split = [], []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        dims = list(weight.dims) if weight is not None else []
        wide = len(dims) == 4 and dims[1] == 1 and attrs.get("group", 1) == dims[0] > 1 and dims[2] * dims[3] > \
            MAX_DEPTHWISE_TAPS and dims[3] <= MAX_DEPTHWISE_TAPS  # fmt: skip
        plain = all(v == 1 for v in [*attrs.get("strides", [1]), *attrs.get("dilations", [1])]) \
            and _text(attrs.get("auto_pad", "NOTSET")) == "NOTSET" and node.input[0] in shapes  # fmt: skip
        if not (wide and plain):
            nodes.append(node)
            continue
        kernel = numpy_helper.to_array(weight)
        height = shapes[node.input[0]][1][2]
        pads = [int(v) for v in attrs.get("pads", [0, 0, 0, 0])]
        out_rows = height + pads[0] + pads[2] - dims[2] + 1
        base = f"{node.name or node.output[0]}/band"
        rows_per_band = MAX_DEPTHWISE_TAPS // dims[3]
        partial = []
        for start in range(0, dims[2], rows_per_band):
            stop = min(start + rows_per_band, dims[2])
            name = f"{base}{start}"
            for suffix, value in (("starts", start), ("ends", start + out_rows), ("axes", 2)):
                graph.initializer.append(numpy_helper.from_array(np.array([value]), f"{name}_{suffix}"))
            graph.initializer.append(numpy_helper.from_array(kernel[:, :, start:stop], f"{name}_weight"))
            inputs = [node.input[0], f"{name}_weight"] + (list(node.input[2:3]) if not partial else [])
            nodes.append(helper.make_node("Conv", inputs, [f"{name}_conv"], name=f"{name}_conv", group=dims[0],
                                          kernel_shape=[stop - start, dims[3]], pads=pads))  # fmt: skip
            nodes.append(helper.make_node("Slice", [f"{name}_conv", f"{name}_starts", f"{name}_ends", f"{name}_axes"],
                                          [f"{name}_out"], name=f"{name}_slice"))  # fmt: skip
            partial.append(f"{name}_out")
        total = partial[0]
        for index, other in enumerate(partial[1:], start=1):
            last = index == len(partial) - 1
            out = node.output[0] if last else f"{base}_sum{index}"
            nodes.append(helper.make_node("Add", [total, other], [out], name=f"{base}_add{index}"))
            total = out
        split.append(node.name or node.output[0])
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    return split


def _value_shapes(model: Any) -> dict[str, tuple[int, list[int]]]:
    """(elem_type, static shape) of every tensor, from ONNX shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    out: dict[str, tuple[int, list[int]]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        shape = _static_shape(info)
        if shape is not None:
            out[info.name] = (info.type.tensor_type.elem_type, shape)
    return out


def _value_info(name: str, typed_shape: tuple[int, list[int]] | None) -> Any:
    from onnx import TensorProto, helper

    if typed_shape is None:
        raise ValueError(f"tensor '{name}' between the network and the post-processing has no static shape")
    elem, shape = typed_shape
    return helper.make_tensor_value_info(name, elem or TensorProto.FLOAT, shape)


# ---------------------------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------------------------
def check_images(size: tuple[int, int], calibration_set: Any | None, count: int = CHECK_IMAGES) -> np.ndarray:
    """Images for the post-build check: the calibration set's first ones, else deterministic synthetic scenes
    (the same scenes ONNX Runtime's artifacts are checked on)."""
    from maskconver_deploy.data.synthetic import generate_scene

    if calibration_set is not None:
        images = [image for image, _ in zip(calibration_set.images(size), range(count), strict=False)]
        if images:
            return np.stack(images)
    height, width = size
    return np.stack([generate_scene(12345, i, max(size)).image[:height, :width] for i in range(count)])


def _onnx2tf_sample(images: np.ndarray) -> np.ndarray:
    """onnx2tf's sample file: 20 float32 images 128x128x3 in 0..1 (ours, so it never downloads its own)."""
    from maskconver_deploy.data.preprocess import letterbox

    picks = [letterbox(images[i % len(images)], (128, 128))[0] for i in range(20)]
    return np.stack(picks).astype(np.float32) / 255.0


def compile_onnx(
    onnx_path: str | Path, out_path: str | Path, name: Any, calib: Any = None, force: bool = False
) -> Path:
    """Convert an exported ONNX graph to a `.tflite` and write it atomically, with its build record `<out>.json`.

    `name` picks the precision: tflite (fp32), tflite-fp16 (float16 weights), tflite-int8-dynamic (dynamic range),
    tflite-int8 (full integer network, float post-processing). tflite-int8 needs `calib`: a calibration folder
    (`maskconver calib make`) or a loaded CalibrationSet, letterboxed to the model's size; with the other
    precisions its first images only serve the check against ONNX Runtime.
    """
    from maskconver_deploy.calibration import CalibrationSet, load_calibration
    from maskconver_deploy.modeldir import read_onnx

    started = time.perf_counter()
    name = str(name)
    precision = _precision_of(name)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise UserError("no such ONNX file", onnx_path)
    refuse_overwrite(out_path, force)
    refuse_overwrite(record_path(out_path), force)
    if precision is Precision.INT8 and calib is None:
        raise UserError(f"{name} needs a calibration set: pass --calib calibration/NAME (see `maskconver calib make`)")
    status = availability(FAMILY)
    if not status.ok:
        raise BackendUnavailable(name, status.reason, status.hint)
    executable, _ = find_onnx2tf()
    assert executable is not None
    python = _python_of(executable)
    model, meta = read_onnx(onnx_path, require_meta=False)
    height, width = check_input(model, onnx_path)
    try:
        net_model, tail_model, cut = split_graph(model)
    except (ValueError, KeyError) as exc:
        raise UserError(f"cannot split the graph into network and post-processing ({_first_line(exc)})",
                        onnx_path) from None  # fmt: skip
    unsupported = sorted({n.op_type for n in tail_model.graph.node} - tail_ops())
    if unsupported:
        raise UserError(f"cannot convert the post-processing to TFLite: no conversion for op "
                        f"{', '.join(unsupported)}", onnx_path)  # fmt: skip
    calibration_set = None
    if calib is not None:
        calibration_set = calib if isinstance(calib, CalibrationSet) else load_calibration(Path(calib))
    check = check_images((height, width), calibration_set)
    if precision is not Precision.INT8:
        calibration_set = None  # only int8 depends on it

    with tempfile.TemporaryDirectory(prefix="maskconver-tflite-") as scratch_name:
        scratch = Path(scratch_name)
        # dynamic-range kernels run outside XNNPACK, where the bands only add ops (measured: 300 ms instead of 232)
        split_nodes = split_wide_depthwise(net_model) if precision is not Precision.INT8_DYNAMIC else []
        _save_onnx(net_model, scratch / "network.onnx")
        _save_onnx(tail_model, scratch / "postprocess.onnx")
        np.save(scratch / "check.npy", check)
        if calibration_set is not None:
            np.save(scratch / "calibration.npy", np.stack(list(calibration_set.images((height, width)))))
        np.save(scratch / ONNX2TF_SAMPLE_NAME, _onnx2tf_sample(check))
        build = _run_builder(python, executable, scratch, precision, onnx_path)
        built = scratch / "model.tflite"
        agreement = verify_against_onnx(built, onnx_path, check)
        agreement["images_source"] = "calibration set, first images" if calib is not None else "synthetic scenes"
        worst = agreement["map_agreement"]
        if precision is Precision.FP32 and worst is not None and worst < FP32_AGREEMENT_FLOOR:
            raise CheckFailed(f"{out_path.name}: the fp32 TFLite {agreement['map_output']} map agrees with "
                              f"{onnx_path.name} (ONNX Runtime) on only {100 * worst:.2f}% of pixels (expected >= "
                              f"{100 * FP32_AGREEMENT_FLOOR:.1f}%): the conversion is wrong")  # fmt: skip
        record = {
            "format": RECORD_FORMAT,
            "backend": name,
            "family": FAMILY,
            "precision": precision.value,
            "artifact": out_path.name,
            "artifact_sha256": sha256_file(built),
            "graph": meta.output if meta is not None else None,
            "source_onnx": onnx_path.name,
            "source_onnx_sha256": sha256_file(onnx_path),
            "input": {"name": INPUT_NAME, "shape": [1, height, width, 3], "dtype": "uint8", "layout": "NHWC"},
            "outputs": build["outputs"],
            "conversion": {
                "network": f"onnx2tf {build['versions'].get('onnx2tf')} (onnx2tf.convert, static input "
                           f"{INPUT_NAME}:1,3,{height},{width}, no onnx2tf quantisation)",
                "postprocess": "op by op in the ONNX layout (maskconver_deploy.backends.tflite)",
                "cut_tensors": cut,
                "network_layouts": build["network_layouts"],
                "depthwise_split_in_row_bands": split_nodes,
            },
            "quantization": build["quantization"],
            "check": agreement,
            "calibration": None if calibration_set is None else {
                "manifest_hash": calibration_set.manifest_hash, "path": str(calibration_set.path),
                "images": len(calibration_set)},  # fmt: skip
            "calibration_manifest_hash": None if calibration_set is None else calibration_set.manifest_hash,
            "tool_versions": {**build["versions"], **_toolkit_versions(), "onnx2tf_python": str(python)},
            "seconds": {"onnx2tf": build["seconds"]["onnx2tf"], "tflite": build["seconds"]["tflite"],
                        "total": round(time.perf_counter() - started, 2)},  # fmt: skip
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with atomic_path(out_path, force=force) as tmp:
            shutil.copyfile(built, tmp)
        with atomic_path(record_path(out_path), force=True) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return out_path


def _save_onnx(model: Any, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def _run_builder(python: Path, executable: Path, scratch: Path, precision: Precision, onnx_path: Path) -> dict:
    """Run the builder (`python -m maskconver_deploy.backends.tflite build`, builder.py) in the onnx2tf environment;
    returns its report (scratch/build.json)."""
    package_dir = Path(__file__).resolve().parents[2]
    shim = scratch / "pkg"
    shim.mkdir()
    # only this package on the path (never the toolkit's site-packages: numpy 2 would shadow onnx2tf's numpy 1)
    (shim / package_dir.name).symlink_to(package_dir, target_is_directory=True)
    env = dict(os.environ)
    env["PATH"] = f"{executable.parent}{os.pathsep}{env.get('PATH', '')}"  # onnx2tf runs `onnxsim` as a command
    env["PYTHONPATH"] = str(shim)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    command = [str(python), "-m", "maskconver_deploy.backends.tflite", "build", str(scratch), precision.value]
    try:
        proc = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise UserError(f"the TFLite conversion did not finish in {BUILD_TIMEOUT_S} s", onnx_path) from None
    except OSError as exc:
        raise UserError(f"cannot run the onnx2tf environment's Python ({exc})", python) from None
    report_file = scratch / "build.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    if proc.returncode != 0 or "error" in report or not (scratch / "model.tflite").is_file():
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        detail = report.get("error") or f"TFLite conversion failed (exit {proc.returncode}): " + " | ".join(lines[-3:])
        raise UserError(detail, onnx_path)
    return report


def _toolkit_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("ai-edge-litert", "onnx", "onnxruntime", "maskconver-deploy"):
        try:
            key = f"{package} (toolkit)" if package in ("onnx", "onnxruntime") else package
            versions[key] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def verify_against_onnx(artifact: Path, onnx_path: Path, images: np.ndarray) -> dict[str, Any]:
    """Run the `.tflite` (LiteRT) and the ONNX graph (ONNX Runtime) on the same images and compare every output.

    `map_agreement`: the worst image's share of equal pixels in the panoptic (or semantic) map; `category_agreement`
    the same for the class of each panoptic pixel (blind to proposals that only swapped slots). None for raw graphs.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    map_output = next((n for n in MAP_OUTPUTS if n in names), None)
    interpreter, input_index, output_index = _load_interpreter(artifact, threads=2)
    per_output: dict[str, dict[str, float]] = {}
    agreements: list[float] = []
    categories: list[float] = []
    for image in images:
        feed = np.ascontiguousarray(image[None])
        reference = dict(zip(names, session.run(None, {INPUT_NAME: feed}), strict=True))
        interpreter.set_tensor(input_index, feed)
        interpreter.invoke()
        got = {n: interpreter.get_tensor(output_index[n]) for n in names}
        for out_name in names:
            ref = reference[out_name]
            if got[out_name].shape != ref.shape:
                raise UserError(f"TFLite output '{out_name}' has shape {got[out_name].shape}, ONNX has {ref.shape}",
                                artifact)  # fmt: skip
            entry = per_output.setdefault(out_name, {"equal_fraction": 1.0, "max_abs_diff": 0.0})
            entry["equal_fraction"] = min(entry["equal_fraction"], float(np.mean(got[out_name] == ref)))
            diff = np.abs(got[out_name].astype(np.float64) - ref.astype(np.float64))
            entry["max_abs_diff"] = max(entry["max_abs_diff"], float(diff.max()) if diff.size else 0.0)
        if map_output is not None:
            agreements.append(float(np.mean(got[map_output] == reference[map_output])))
        if map_output == "panoptic":
            same = got["panoptic"] // LABEL_DIVISOR == reference["panoptic"] // LABEL_DIVISOR
            categories.append(float(np.mean(same)))
    return {
        "images": int(len(images)),
        "map_output": map_output,
        "map_agreement": min(agreements) if agreements else None,
        "panoptic_agreement": min(agreements) if map_output == "panoptic" else None,
        "agreement_per_image": agreements,
        "category_agreement": min(categories) if categories else None,
        "outputs": per_output,
    }


# ---------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------
def _load_interpreter(artifact: Path, threads: int | None) -> tuple[Any, int, dict[str, int]]:
    """LiteRT interpreter (XNNPACK, its default delegate), allocated once; input index and output indices by name."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(artifact), num_threads=threads)
    except ValueError as exc:
        raise UserError(f"not a loadable .tflite file ({_first_line(exc)})", artifact) from None
    signatures = interpreter._get_full_signature_list()  # noqa: SLF001 - tensor indices per signature name
    if SIGNATURE not in signatures:
        raise UserError(f"the .tflite has no '{SIGNATURE}' signature; rebuild it with `maskconver compile`", artifact)
    signature = signatures[SIGNATURE]
    if list(signature["inputs"]) != [INPUT_NAME]:
        raise UserError(f"expected one input '{INPUT_NAME}', the .tflite has {list(signature['inputs'])}", artifact)
    interpreter.allocate_tensors()
    return interpreter, int(signature["inputs"][INPUT_NAME]), {k: int(v) for k, v in signature["outputs"].items()}


class TfliteRunner(Runner):
    """A `.tflite` on the LiteRT interpreter (XNNPACK, `threads`); NHWC uint8 in, outputs read by signature name."""

    def _open(self) -> None:
        missing = _litert_missing()
        if missing is not None:
            raise BackendUnavailable(self.name, missing.reason, missing.hint)
        if not self.artifact.is_file():
            raise UserError(f"no such .tflite file; build it with `maskconver compile --backend {self.name}`",
                            self.artifact)  # fmt: skip
        self._interpreter, self._input_index, self._output_index = _load_interpreter(self.artifact, self.threads)
        detail = next(d for d in self._interpreter.get_input_details() if d["index"] == self._input_index)
        h, w = self.meta.input_size
        if tuple(int(v) for v in detail["shape"]) != (1, h, w, 3) or detail["dtype"] != np.uint8:
            raise UserError(f"the .tflite takes {np.dtype(detail['dtype']).name} {list(detail['shape'])}, the model "
                            f"meta says uint8 [1, {h}, {w}, 3]", self.artifact)  # fmt: skip
        missing_outputs = [n for n in self.meta.output_names if n not in self._output_index]
        if missing_outputs:
            raise UserError(f"the .tflite lacks outputs {missing_outputs} (it has {list(self._output_index)})",
                            self.artifact)  # fmt: skip

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._interpreter.set_tensor(self._input_index, feeds[INPUT_NAME])
        self._interpreter.invoke()
        return {name: self._interpreter.get_tensor(index) for name, index in self._output_index.items()}

    def _close(self) -> None:
        self._interpreter = None


def open_runner(artifact: str | Path, meta: ModelMeta, name: Any = FAMILY, threads: int | None = None) -> TfliteRunner:
    """A runner for a `.tflite` artifact (opened on first use or `with runner:`)."""
    return TfliteRunner(str(name), Path(artifact), meta, threads=threads)


def tail_ops() -> set[str]:
    """The ONNX op types the post-processing converter (tail.py) handles."""
    from maskconver_deploy.backends.tflite.tail import tail_ops as ops

    return ops()


__all__ = ["CUT_PREFIX", "POST_SCOPE", "RECORD_FORMAT", "SIGNATURE"]

"""TFLite / LiteRT: ONNX -> `.tflite` (fp32, fp16, int8-dynamic, int8) and `TfliteRunner` on the LiteRT interpreter.

How an artifact is built (`compile_onnx`), in a scratch folder, nothing written at the destination until the end:

1. The ONNX graph is split in two. The *network* is every node that feeds a convolution (input cast, normalisation,
   backbone, decoder, heads); the *post-processing* is the rest (sigmoid, peak NMS, top-N, mask embeddings, mask
   logits, upsampling, panoptic merge). The tensors between them are the heads' 4D outputs.
2. The network goes through onnx2tf (its own environment, a subprocess). Its uint8 NHWC input is presented to
   onnx2tf as NCHW (one Transpose in front), so onnx2tf's own layout handling and its ONNX Runtime checks see the
   layout they expect, and its NCHW->NHWC conversion hands back exactly our `image: uint8 [1, H, W, 3]`.
3. The post-processing is converted op by op into TensorFlow *in the ONNX layout* (no layout guessing), by
   `_TailConverter` below. onnx2tf 1.29.24 mis-converts this part: on the real graph it stops with a shape error
   in the merge's `Where`, and on a 4D variant it produced a panoptic map that agreed on 68% of pixels while every
   intermediate tensor matched. Its 3D tensors ([N, H, W]) are where its layout heuristics go wrong.
4. Both halves are composed into one TensorFlow function with named outputs (a SignatureDef, so the artifact maps
   its outputs by our names) and converted by the TFLite converter at the requested precision: fp32; fp16 (float16
   weights); int8-dynamic (int8 weights, dynamic-range kernels); int8 (full integer network calibrated on OUR
   calibration images, float I/O). For int8 the model is calibrated, the calibration statistics of every
   post-processing tensor and of the heads' last convolutions are removed, and it is quantised with those ops on a
   deny list (the two steps of tf.lite.experimental.QuantizationDebugger): they stay float, so heatmap logits,
   scores, top-N, argmax and the merge are float (full int8 with TopK/ArgMax inside matched only 68-75% of pixels
   on the stand-in model). onnx2tf's own quantisation (`-oiqt`/`-cind`) is not used.
5. The new `.tflite` and the source ONNX (ONNX Runtime) are run on two deterministic images; the panoptic pixel
   agreement goes into the build record `<artifact>.json`; fp32 below 99.9% is reported loudly.

Steps 2-4 run in the onnx2tf environment (TensorFlow lives there): this file is also its entry point
(`python -m maskconver_deploy.backends.tflite build ...`), so everything TensorFlow-side is in functions named
`_tf_*` and imports only numpy, onnx, onnxruntime and tensorflow. The toolkit side imports ai_edge_litert,
onnx and onnxruntime inside functions only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.backends.base import Availability, Runner
from maskconver_deploy.errors import BackendUnavailable, UserError
from maskconver_deploy.fileio import atomic_path, refuse_overwrite, sha256_file
from maskconver_deploy.types import INPUT_NAME, LABEL_DIVISOR, METADATA_KEY, ModelMeta, Precision

FAMILY = "tflite"
FAMILIES = (FAMILY,)
PRECISIONS = {FAMILY: (Precision.FP32, Precision.FP16, Precision.INT8_DYNAMIC, Precision.INT8)}
EXT = ".tflite"
ENV_VAR = "MASKCONVER_ONNX2TF"
HINT_LITERT = 'pip install ".[tflite]"'
HINT_ONNX2TF = "make install (creates .venv-onnx2tf from requirements-onnx2tf.txt), or set MASKCONVER_ONNX2TF"
RECORD_FORMAT = "maskconver-tflite/1"
SIGNATURE = "serving_default"
# onnx2tf downloads this file for its checks unless one of that name is in its working directory.
ONNX2TF_SAMPLE_NAME = "calibration_image_sample_data_20x128x128x3_float32.npy"
POST_SCOPE = "mcv_post"  # name scope of the post-processing ops (kept float in int8)
FP32_AGREEMENT_FLOOR = 0.999
CHECK_IMAGES = 2
CUT_PREFIX = "mcv_cut_"
ONNX2TF_TIMEOUT_S = 3600


# ---------------------------------------------------------------------------------------------------------------
# Names, paths, availability
# ---------------------------------------------------------------------------------------------------------------
def artifact_path(model_dir: str | Path, name: Any, graph: str = "panoptic") -> Path:
    """`.tflite` file for backend `name` ('tflite', 'tflite-fp16', 'tflite-int8-dynamic', 'tflite-int8')."""
    return Path(model_dir) / f"{name}{'.raw' if graph == 'raw' else ''}{EXT}"


def record_path(artifact: str | Path) -> Path:
    """The build record beside an artifact: `<artifact>.json`."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def read_record(artifact: str | Path) -> dict[str, Any]:
    """The build record of an artifact (UserError if it is missing or not JSON)."""
    from maskconver_deploy.fileio import read_json

    return read_json(record_path(artifact))


def op_dtypes(artifact: str | Path) -> dict[str, set[str]]:
    """Op type -> dtypes of the tensors it reads and writes, for a `.tflite` (what runs in int8, what in float)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(artifact))
    tensors = {d["index"]: np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}
    out: dict[str, set[str]] = {}
    for op in interpreter._get_ops_details():  # noqa: SLF001
        kinds = {tensors[i] for i in [*op["inputs"], *op["outputs"]] if i >= 0}
        out.setdefault(op["op_name"], set()).update(kinds)
    return out


def _precision_of(name: Any) -> Precision:
    from maskconver_deploy.backends import parse_backend

    backend = parse_backend(str(name))
    if backend.family != FAMILY or backend.precision not in PRECISIONS[FAMILY]:
        allowed = ", ".join(FAMILY if p is Precision.FP32 else f"{FAMILY}-{p.value}" for p in PRECISIONS[FAMILY])
        raise UserError(f"'{name}' is not a TFLite backend; use one of {allowed}")
    return backend.precision


def _project_root() -> Path | None:
    """The source checkout this package runs from (the folder with pyproject.toml), if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def find_onnx2tf() -> tuple[Path | None, str]:
    """The onnx2tf executable: $MASKCONVER_ONNX2TF, else <project>/.venv-onnx2tf/bin/onnx2tf, else PATH.

    Returns (path or None, where it was looked for). A set but wrong $MASKCONVER_ONNX2TF is not silently replaced.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path, f"${ENV_VAR}"
        return None, f"${ENV_VAR}={configured} is not an executable file"
    root = _project_root()
    if root is not None:
        candidate = root / ".venv-onnx2tf" / "bin" / "onnx2tf"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate, str(candidate)
    found = shutil.which("onnx2tf")
    if found:
        return Path(found), "PATH"
    looked = f"{root / '.venv-onnx2tf/bin/onnx2tf'} or PATH" if root else "PATH"
    return None, f"no onnx2tf executable in {looked}"


def _interpreter_of(executable: Path) -> Path:
    """The Python that runs a console script (its #! line), i.e. the onnx2tf environment's python."""
    try:
        with open(executable, "rb") as handle:
            first = handle.readline().decode(errors="replace").strip()
    except OSError:
        first = ""
    if first.startswith("#!"):
        parts = first[2:].split()
        if parts and Path(parts[0]).name != "env" and Path(parts[0]).exists():
            return Path(parts[0])
    sibling = executable.parent / "python"
    if sibling.exists():
        return sibling
    raise UserError("cannot find the Python interpreter of the onnx2tf executable", executable)


def availability(family: str = FAMILY) -> Availability:
    """Can TFLite artifacts be built and run here? The LiteRT interpreter and the onnx2tf executable. Never raises."""
    try:
        if importlib.util.find_spec("ai_edge_litert") is None:
            return Availability(False, "the LiteRT interpreter (ai-edge-litert) is not installed", HINT_LITERT)
    except (ImportError, ValueError) as exc:  # a broken install
        return Availability(False, f"ai-edge-litert cannot be imported ({exc})", HINT_LITERT)
    path, where = find_onnx2tf()
    if path is None:
        return Availability(False, f"the onnx2tf converter was not found ({where})", HINT_ONNX2TF)
    return Availability(True)


def _runtime_availability() -> Availability:
    """Running an existing `.tflite` needs only the interpreter."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        return Availability(False, "the LiteRT interpreter (ai-edge-litert) is not installed", HINT_LITERT)
    return Availability(True)


# ---------------------------------------------------------------------------------------------------------------
# Graph preparation (toolkit side, onnx only)
# ---------------------------------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _onnx_meta(model: Any) -> ModelMeta | None:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return ModelMeta.from_dict(json.loads(prop.value))
            except (ValueError, KeyError, TypeError):
                return None
    return None


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
    spec = inputs[0]
    shape = _static_shape(spec)
    elem = spec.type.tensor_type.elem_type
    if elem != TensorProto.UINT8 or shape is None or len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        raise UserError(
            f"input '{INPUT_NAME}' must be uint8 [1, H, W, 3] with static sizes, got "
            f"{TensorProto.DataType.Name(elem)} {shape or 'dynamic'}",
            onnx_path,
        )
    return shape[1], shape[2]


def split_graph(model: Any) -> tuple[Any, Any, list[str]]:
    """Split into (network model, post-processing model, cut tensor names).

    The network is every node that is an ancestor of (or is) a Conv; cut tensors are the network's outputs that
    the post-processing or the graph outputs read. In both models the cut tensors are renamed `mcv_cut_<i>`.
    The network model gets its uint8 NHWC input presented as NCHW (a Transpose in front, see the module doc).
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
        if id(node) in network:
            continue
        network.add(id(node))
        stack.extend(producer[name] for name in node.input if name in producer)
    net_nodes = [n for n in graph.node if id(n) in network]
    tail_nodes = [n for n in graph.node if id(n) not in network]
    net_outputs = {out for n in net_nodes for out in n.output}
    cut: list[str] = []
    for name in [i for n in tail_nodes for i in n.input] + [o.name for o in graph.output]:
        if name in net_outputs and name not in cut:
            cut.append(name)
    if any(INPUT_NAME in n.input for n in tail_nodes):
        raise ValueError(f"the post-processing reads the input '{INPUT_NAME}' directly")
    rename = {name: f"{CUT_PREFIX}{i}" for i, name in enumerate(cut)}
    initializers = {t.name: t for t in graph.initializer}

    def copy_nodes(nodes: Sequence[Any]) -> list[Any]:
        copies = []
        for node in nodes:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.input[:] = [rename.get(i, i) for i in new.input]
            new.output[:] = [rename.get(o, o) for o in new.output]
            copies.append(new)
        return copies

    def used_initializers(nodes: Sequence[Any]) -> list[Any]:
        names = {i for n in nodes for i in n.input}
        # subgraph attributes (If/Loop) are not expected here; their captures would be missed
        return [initializers[name] for name in names if name in initializers]

    shapes = _value_shapes(model)
    image = next(i for i in graph.input if i.name == INPUT_NAME)
    _, height, width, channels = _static_shape(image)  # checked by check_input
    nhwc_name = f"{INPUT_NAME}__nhwc"
    net_body = copy_nodes(net_nodes)
    for node in net_body:
        node.input[:] = [nhwc_name if i == INPUT_NAME else i for i in node.input]
    front = helper.make_node("Transpose", [INPUT_NAME], [nhwc_name], perm=[0, 2, 3, 1], name="mcv_to_nhwc")
    net_in = helper.make_tensor_value_info(INPUT_NAME, image.type.tensor_type.elem_type, [1, channels, height, width])
    net_out = [_value_info(rename[name], shapes[name]) for name in cut]
    net_graph = helper.make_graph([front, *net_body], "network", [net_in], net_out, used_initializers(net_nodes))
    net_model = helper.make_model(net_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)

    tail_in = [_value_info(rename[name], shapes[name]) for name in cut]
    tail_body = copy_nodes(tail_nodes)
    for out in graph.output:  # a network tensor that is also a graph output (raw graph: heatmap) passes through
        if out.name in rename:
            tail_body.append(helper.make_node("Identity", [rename[out.name]], [out.name], name=f"mcv_pass_{out.name}"))
    tail_graph = helper.make_graph(tail_body, "postprocess", tail_in, list(graph.output), used_initializers(tail_nodes))
    tail_model = helper.make_model(tail_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return net_model, tail_model, cut


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
# Images for calibration and checks
# ---------------------------------------------------------------------------------------------------------------
def synthetic_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 RGB scenes [count, H, W, 3]: smooth background, a few rectangles and discs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = np.empty((count, height, width, 3), dtype=np.uint8)
    for k in range(count):
        base = rng.uniform(40, 200, 3)
        slope = rng.uniform(-0.5, 0.5, (2, 3))
        canvas = base + yy[..., None] * slope[0] * (128 / height) + xx[..., None] * slope[1] * (128 / width)
        for _ in range(int(rng.integers(2, 6))):
            color = rng.uniform(0, 255, 3)
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.08, 0.3) * height, rng.uniform(0.08, 0.3) * width
            if rng.random() < 0.5:
                inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
            else:
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            canvas[inside] = color
        canvas += rng.normal(0, 6, canvas.shape)
        images[k] = np.clip(canvas, 0, 255).astype(np.uint8)
    return images


def _resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = (np.arange(height) * image.shape[0] // height).clip(0, image.shape[0] - 1)
    cols = (np.arange(width) * image.shape[1] // width).clip(0, image.shape[1] - 1)
    return image[rows][:, cols]


def _load_calibration(calib: Any) -> Any:
    """A CalibrationSet (anything with `.images()` and `.manifest_hash`) or a calibration folder."""
    if hasattr(calib, "images") and hasattr(calib, "manifest_hash"):
        return calib
    from maskconver_deploy.calibration import load_calibration

    return load_calibration(Path(calib))


def _calibration_array(calibration_set: Any, height: int, width: int, path: Path) -> np.ndarray:
    images = []
    for image in calibration_set.images():
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"calibration images must be uint8 HxWx3, got {image.dtype} {image.shape}", path)
        if image.shape[:2] != (height, width):
            got = f"{image.shape[1]}x{image.shape[0]}"
            raise UserError(f"calibration images are {got}, the model takes {width}x{height}", path)
        images.append(image)
    if not images:
        raise UserError("the calibration set has no images", path)
    return np.stack(images)


def _onnx2tf_sample(images: np.ndarray) -> np.ndarray:
    """onnx2tf's sample file: 20 float32 images 128x128x3 in 0..1 (ours, so it never downloads its own)."""
    picks = [images[i % len(images)] for i in range(20)]
    return np.stack([_resize_nearest(p, 128, 128) for p in picks]).astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------------------------
def compile_onnx(
    onnx_path: str | Path, out_path: str | Path, name: Any, calib: Any = None, force: bool = False
) -> Path:
    """Convert an exported ONNX graph to a `.tflite` and write it atomically, with its build record `<out>.json`.

    `name` picks the precision: tflite (fp32), tflite-fp16 (float16 weights), tflite-int8-dynamic (int8 weights,
    float activations), tflite-int8 (int8 network from `calib`, float post-processing). int8 needs `calib` (a
    calibration folder or a loaded CalibrationSet); with other precisions its first images only serve the check
    against ONNX Runtime (deterministic synthetic images without it).
    """
    import onnx

    started = time.perf_counter()
    name = str(name)
    precision = _precision_of(name)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise UserError("no such ONNX file", onnx_path)
    refuse_overwrite(out_path, force)
    if precision is Precision.INT8 and calib is None:
        raise UserError(f"{name} needs a calibration set: pass --calib calibration/NAME (see `maskconver calib`)")
    status = availability(FAMILY)
    if not status.ok:
        raise BackendUnavailable(FAMILY, status.reason, status.hint)
    executable, _ = find_onnx2tf()
    assert executable is not None
    python = _interpreter_of(executable)

    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:
        raise UserError(f"not a readable ONNX model ({_first_line(exc)})", onnx_path) from None
    height, width = check_input(model, onnx_path)
    meta = _onnx_meta(model)
    output_names = [o.name for o in model.graph.output]
    try:
        net_model, tail_model, cut = split_graph(model)
    except (ValueError, KeyError) as exc:
        problem = _first_line(exc)
        raise UserError(f"cannot split the graph into network and post-processing ({problem})", onnx_path) from None

    calibration_set = _load_calibration(calib) if calib is not None else None
    if calibration_set is not None:
        calib_images = _calibration_array(calibration_set, height, width, Path(str(calib)))
        check_images, check_source = calib_images[:CHECK_IMAGES], "calibration set, first images"
    else:
        calib_images = synthetic_images(8, height, width, seed=1)
        check_images, check_source = synthetic_images(CHECK_IMAGES, height, width, seed=12345), "synthetic (seed 12345)"
    if precision is not Precision.INT8:
        calibration_set = None  # only int8 depends on it

    with tempfile.TemporaryDirectory(prefix="maskconver-tflite-") as scratch_name:
        scratch = Path(scratch_name)
        onnx.save(net_model, str(scratch / "network.onnx"))
        onnx.save(tail_model, str(scratch / "postprocess.onnx"))
        np.save(scratch / ONNX2TF_SAMPLE_NAME, _onnx2tf_sample(calib_images))
        np.save(scratch / "calibration.npy", calib_images)
        np.save(scratch / "check.npy", check_images)
        onnx2tf_seconds = _run_onnx2tf(executable, scratch, height, width, onnx_path)
        built = scratch / f"model{EXT}"
        build = _run_builder(python, scratch, precision, built, output_names, onnx_path)
        check = verify_against_onnx(built, onnx_path, check_images)
        check["images_source"] = check_source
        if precision is Precision.FP32 and check["panoptic_agreement"] is not None:
            if check["panoptic_agreement"] < FP32_AGREEMENT_FLOOR:
                message = (
                    f"WARNING: {out_path.name}: the fp32 TFLite panoptic map agrees with ONNX Runtime on only "
                    f"{100 * check['panoptic_agreement']:.2f}% of pixels "
                    f"(expected >= {100 * FP32_AGREEMENT_FLOOR:.1f}%): the conversion is suspect"
                )
                check["warning"] = message
                print(message, file=sys.stderr)
        record = build_record(
            name=name,
            precision=precision,
            artifact=out_path,
            built=built,
            onnx_path=onnx_path,
            meta=meta,
            input_shape=(1, height, width, 3),
            cut=cut,
            build=build,
            check=check,
            calibration=(
                {"manifest_hash": str(calibration_set.manifest_hash), "images": int(len(calib_images))}
                if calibration_set is not None
                else None
            ),
            onnx2tf_seconds=onnx2tf_seconds,
            total_seconds=time.perf_counter() - started,
            tool_versions=_tool_versions(python, build),
        )
        record_file = record_path(out_path)
        refuse_overwrite(record_file, force)
        with atomic_path(out_path, force=force) as tmp:
            shutil.copyfile(built, tmp)
        with atomic_path(record_file, force=True) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return out_path


def _subprocess_env(executable: Path) -> dict[str, str]:
    """onnx2tf runs `onnxsim` as a command: its environment's bin folder goes first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{executable.parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.pop("PYTHONPATH", None)
    return env


def onnx2tf_command(executable: Path, height: int, width: int) -> list[str]:
    """The exact onnx2tf call for the network part (cwd: the scratch folder)."""
    return [
        str(executable),
        "-i", "network.onnx",
        "-o", "saved_model",
        "-ois", f"{INPUT_NAME}:1,3,{height},{width}",  # static shapes; NCHW as presented, see split_graph
        "-osd",  # SignatureDef with named inputs/outputs, read back by the builder
        "-v", "error",
    ]  # fmt: skip


def _tail_of(text: str, lines: int = 12) -> str:
    kept = [line for line in text.splitlines() if line.strip() and "computation_placer" not in line]
    return " | ".join(kept[-lines:])


def _run_onnx2tf(executable: Path, scratch: Path, height: int, width: int, onnx_path: Path) -> float:
    started = time.perf_counter()
    command = onnx2tf_command(executable, height, width)
    try:
        proc = subprocess.run(
            command, cwd=scratch, env=_subprocess_env(executable), capture_output=True, text=True,
            timeout=ONNX2TF_TIMEOUT_S, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise UserError(f"onnx2tf did not finish in {ONNX2TF_TIMEOUT_S} s", onnx_path) from None
    except OSError as exc:
        raise UserError(f"cannot run onnx2tf ({exc})", executable) from None
    if proc.returncode != 0 or not (scratch / "saved_model" / "saved_model.pb").is_file():
        error = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln or "ERROR" in ln]
        detail = _strip_ansi(error[-1] if error else _tail_of(proc.stdout + proc.stderr, 3))
        raise UserError(f"onnx2tf could not convert the network (exit {proc.returncode}): {detail}", onnx_path)
    return time.perf_counter() - started


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def _run_builder(
    python: Path, scratch: Path, precision: Precision, out: Path, output_names: list[str], onnx_path: Path
) -> dict[str, Any]:
    """Run this file's `build` entry point in the onnx2tf environment; returns its report."""
    package_dir = Path(__file__).resolve().parents[1]
    shim = scratch / "pkg"
    shim.mkdir()
    # only this package on the path (never the toolkit's site-packages: numpy 2 would shadow onnx2tf's numpy 1)
    (shim / package_dir.name).symlink_to(package_dir, target_is_directory=True)
    env = _subprocess_env(python)
    env["PYTHONPATH"] = str(shim)
    report = scratch / "build.json"
    command = [
        str(python), "-m", "maskconver_deploy.backends.tflite", "build",
        "--scratch", str(scratch), "--precision", precision.value, "--out", str(out), "--report", str(report),
        "--outputs", ",".join(output_names),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            command, cwd=scratch, env=env, capture_output=True, text=True, timeout=ONNX2TF_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise UserError(f"the TFLite converter did not finish in {ONNX2TF_TIMEOUT_S} s", onnx_path) from None
    result = json.loads(report.read_text()) if report.is_file() else {}
    if proc.returncode != 0 or not out.is_file():
        detail = result.get("error") or _tail_of(proc.stderr or proc.stdout, 3)
        raise UserError(f"TFLite conversion failed: {detail}", onnx_path)
    return result


def _tool_versions(python: Path, build: dict[str, Any]) -> dict[str, str]:
    from importlib import metadata

    versions = dict(build.get("versions", {}))
    for package in ("ai-edge-litert", "onnx", "onnxruntime", "maskconver-deploy"):
        try:
            key = f"{package} (toolkit)" if package in ("onnx", "onnxruntime") else package
            versions[key] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    versions["onnx2tf_python"] = str(python)
    return versions


def build_record(
    *,
    name: str,
    precision: Precision,
    artifact: Path,
    built: Path,
    onnx_path: Path,
    meta: ModelMeta | None,
    input_shape: Sequence[int],
    cut: Sequence[str],
    build: dict[str, Any],
    check: dict[str, Any],
    calibration: dict[str, Any] | None,
    onnx2tf_seconds: float,
    total_seconds: float,
    tool_versions: dict[str, str],
) -> dict[str, Any]:
    """The `<artifact>.json` beside a `.tflite`: what it was made from, how, and how well it agrees with ONNX."""
    return {
        "format": RECORD_FORMAT,
        "backend": name,
        "family": FAMILY,
        "precision": precision.value,
        "artifact": artifact.name,
        "artifact_sha256": sha256_file(built),
        "graph": meta.output if meta is not None else None,
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "input": {"name": INPUT_NAME, "shape": [int(d) for d in input_shape], "dtype": "uint8", "layout": "NHWC"},
        "outputs": build.get("outputs", {}),
        "conversion": {
            "network": "onnx2tf " + " ".join(onnx2tf_command(Path("onnx2tf"), input_shape[1], input_shape[2])[1:]),
            "postprocess": "op-by-op in the ONNX layout (maskconver_deploy.backends.tflite)",
            "cut_tensors": list(cut),
            "quantization": build.get("quantization", {}),
        },
        "check": check,
        "calibration": calibration,
        "calibration_manifest_hash": (calibration or {}).get("manifest_hash"),
        "tool_versions": tool_versions,
        "seconds": {"onnx2tf": round(onnx2tf_seconds, 2), "tflite": round(float(build.get("seconds", 0.0)), 2),
                    "total": round(total_seconds, 2)},
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip


def verify_against_onnx(artifact: Path, onnx_path: Path, images: np.ndarray) -> dict[str, Any]:
    """Run the `.tflite` (LiteRT) and the ONNX graph (ONNX Runtime) on the same images and compare every output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    interpreter, input_index, output_index = _load_interpreter(artifact, threads=2)
    per_output: dict[str, dict[str, float]] = {}
    agreements: list[float] = []
    categories: list[float] = []  # class of each pixel: blind to proposals that only swapped slots
    for image in images:
        feed = np.ascontiguousarray(image[None])
        reference = dict(zip(names, session.run(None, {INPUT_NAME: feed}), strict=True))
        interpreter.set_tensor(input_index, feed)
        interpreter.invoke()
        for out_name in names:
            got = interpreter.get_tensor(output_index[out_name])
            ref = reference[out_name]
            if got.shape != ref.shape:
                raise UserError(f"TFLite output '{out_name}' has shape {got.shape}, ONNX has {ref.shape}", artifact)
            entry = per_output.setdefault(out_name, {"equal_fraction": 1.0, "max_abs_diff": 0.0})
            entry["equal_fraction"] = min(entry["equal_fraction"], float(np.mean(got == ref)))
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            entry["max_abs_diff"] = max(entry["max_abs_diff"], float(diff.max()) if diff.size else 0.0)
        if "panoptic" in reference:
            got = interpreter.get_tensor(output_index["panoptic"])
            agreements.append(float(np.mean(got == reference["panoptic"])))
            categories.append(float(np.mean(got // LABEL_DIVISOR == reference["panoptic"] // LABEL_DIVISOR)))
    return {
        "images": int(len(images)),
        "panoptic_agreement": min(agreements) if agreements else None,
        "panoptic_agreement_per_image": agreements,
        "category_agreement": min(categories) if categories else None,
        "outputs": per_output,
    }


# ---------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------
def _load_interpreter(artifact: Path, threads: int | None) -> tuple[Any, int, dict[str, int]]:
    """LiteRT interpreter (XNNPACK, the default delegate), allocated once; input index and output indices by name."""
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
    """A `.tflite` on the LiteRT interpreter; outputs are read by signature name, the batch dimension kept."""

    def _open(self) -> None:
        status = _runtime_availability()
        if not status.ok:
            raise BackendUnavailable(FAMILY, status.reason, status.hint)
        if not self.artifact.is_file():
            raise UserError("no such .tflite file; build it with `maskconver compile --backend tflite`", self.artifact)
        self._interpreter, self._input_index, self._output_index = _load_interpreter(self.artifact, self.threads)
        detail = next(d for d in self._interpreter.get_input_details() if d["index"] == self._input_index)
        h, w = self.meta.input_size
        if tuple(int(v) for v in detail["shape"]) != (1, h, w, 3) or detail["dtype"] != np.uint8:
            raise UserError(
                f"the .tflite takes {np.dtype(detail['dtype']).name} {list(detail['shape'])}, the model meta says "
                f"uint8 [1, {h}, {w}, 3]",
                self.artifact,
            )
        missing = [n for n in self.meta.output_names if n not in self._output_index]
        if missing:
            raise UserError(f"the .tflite lacks outputs {missing} (it has {list(self._output_index)})", self.artifact)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._interpreter.set_tensor(self._input_index, feeds[INPUT_NAME])
        self._interpreter.invoke()
        return {name: self._interpreter.get_tensor(index) for name, index in self._output_index.items()}

    def _close(self) -> None:
        self._interpreter = None


def open_runner(artifact: str | Path, meta: ModelMeta, name: str = FAMILY, threads: int | None = None) -> TfliteRunner:
    """A runner for a `.tflite` artifact (opened on first use or `with runner:`)."""
    return TfliteRunner(str(name), Path(artifact), meta, threads=threads)


# ---------------------------------------------------------------------------------------------------------------
# TensorFlow side: runs in the onnx2tf environment (`python -m maskconver_deploy.backends.tflite build ...`)
# ---------------------------------------------------------------------------------------------------------------
class _Unsupported(Exception):
    """A post-processing op (or attribute) the op-by-op converter does not handle."""


def _tf_dtype(elem_type: int) -> Any:
    import tensorflow as tf
    from onnx import helper

    return tf.as_dtype(helper.tensor_dtype_to_np_dtype(elem_type))


class _TailConverter:
    """ONNX post-processing -> TensorFlow ops with the same layout and semantics, one node at a time.

    Values are numpy arrays while they are constants (initializers, Constant, shape arithmetic), TF tensors
    otherwise; ops with only constant inputs are evaluated eagerly, so shapes, axes and K stay static.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        from onnx import numpy_helper

        env: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}
        env.update(inputs)
        for node in self.model.graph.node:
            args = [env[name] if name else None for name in node.input]
            attrs = {a.name: _attr_value(a) for a in node.attribute}
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None or node.domain not in ("", "ai.onnx"):
                where = f" (node {node.name})" if node.name else ""
                raise _Unsupported(f"op {node.op_type}{where} has no TFLite conversion here")
            if args and all(isinstance(a, np.ndarray) or a is None for a in args) and node.op_type not in _NO_FOLD:
                outs = self._eager(handler, args, attrs)
            else:
                outs = handler(args, attrs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            for name, value in zip(node.output, outs, strict=False):
                if name:
                    env[name] = value
        return {o.name: env[o.name] for o in self.model.graph.output}

    @staticmethod
    def _eager(handler: Any, args: list[Any], attrs: dict[str, Any]) -> Any:
        import tensorflow as tf

        with tf.init_scope():
            outs = handler(args, attrs)
        if isinstance(outs, tuple):
            return tuple(o if isinstance(o, np.ndarray) else np.asarray(o) for o in outs)
        return outs if isinstance(outs, np.ndarray) else np.asarray(outs)

    # -- helpers ----------------------------------------------------------------------------------------------
    @staticmethod
    def static(value: Any, what: str) -> np.ndarray:
        import tensorflow as tf

        if isinstance(value, np.ndarray):
            return value
        folded = tf.get_static_value(value)
        if folded is None:
            raise _Unsupported(f"{what} must be a constant")
        return np.asarray(folded)

    @staticmethod
    def shape(value: Any) -> list[int]:
        shape = list(value.shape)
        if any(d is None for d in shape):
            raise _Unsupported("dynamic shapes in the post-processing")
        return [int(d) for d in shape]

    def axes(self, args: list[Any], attrs: dict[str, Any], index: int = 1) -> list[int] | None:
        if "axes" in attrs:
            return [int(a) for a in attrs["axes"]]
        if len(args) > index and args[index] is not None:
            return [int(a) for a in self.static(args[index], "axes").reshape(-1)]
        return None

    # -- elementwise ------------------------------------------------------------------------------------------
    def op_Identity(self, a: list[Any], k: dict[str, Any]) -> Any:
        return a[0]

    def op_Constant(self, a: list[Any], k: dict[str, Any]) -> Any:
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            if key in k:
                value = np.asarray(k[key])
                if key in ("value_float", "value_floats"):
                    value = value.astype(np.float32)
                elif key in ("value_int", "value_ints"):
                    value = value.astype(np.int64)
                return value
        raise _Unsupported("Constant without a value")

    def op_Cast(self, a: list[Any], k: dict[str, Any]) -> Any:
        import tensorflow as tf

        return tf.cast(a[0], _tf_dtype(int(k["to"])))

    def op_Add(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.add(a[0], a[1])

    def op_Sub(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.subtract(a[0], a[1])

    def op_Mul(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.multiply(a[0], a[1])

    @staticmethod
    def _truncdiv(x: Any, y: Any) -> Any:
        """Integer division rounding toward zero from FLOOR_DIV (TFLite has no TruncateDiv; int64 goes via int32)."""
        tf = _tf()
        x = tf.convert_to_tensor(x)
        y = tf.cast(y, x.dtype)
        wide = x.dtype == tf.int64
        xs, ys = (tf.cast(x, tf.int32), tf.cast(y, tf.int32)) if wide else (x, y)
        floor = tf.math.floordiv(xs, ys)
        inexact = tf.math.not_equal(floor * ys, xs)
        signs_differ = tf.math.not_equal(tf.math.less(xs, 0), tf.math.less(ys, 0))
        out = floor + tf.cast(tf.math.logical_and(inexact, signs_differ), xs.dtype)
        return tf.cast(out, tf.int64) if wide else out

    def op_Div(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        x = tf.convert_to_tensor(a[0])
        if x.dtype.is_integer:
            return self._truncdiv(x, a[1])
        return tf.math.divide(x, a[1])

    def op_Mod(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        if int(k.get("fmod", 0)):
            x = tf.convert_to_tensor(a[0])
            y = tf.cast(a[1], x.dtype)
            return x - self._truncdiv(x, y) * y if x.dtype.is_integer else tf.math.floormod(x, y) - tf.where(
                tf.math.logical_and(tf.math.not_equal(tf.math.floormod(x, y), 0), tf.math.less(x * y, 0)), y, 0 * y
            )
        return tf.math.floormod(a[0], a[1])

    def op_Pow(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.pow(a[0], a[1])

    def op_Max(self, a: list[Any], k: dict[str, Any]) -> Any:
        out = a[0]
        for other in a[1:]:
            out = _tf().math.maximum(out, other)
        return out

    def op_Min(self, a: list[Any], k: dict[str, Any]) -> Any:
        out = a[0]
        for other in a[1:]:
            out = _tf().math.minimum(out, other)
        return out

    def op_Equal(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.equal(a[0], a[1])

    def op_Greater(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.greater(a[0], a[1])

    def op_GreaterOrEqual(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.greater_equal(a[0], a[1])

    def op_Less(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.less(a[0], a[1])

    def op_LessOrEqual(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.less_equal(a[0], a[1])

    def op_And(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.logical_and(a[0], a[1])

    def op_Or(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.logical_or(a[0], a[1])

    def op_Not(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.logical_not(a[0])

    def op_Where(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().where(a[0], a[1], a[2])

    def op_Sigmoid(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.sigmoid(a[0])

    def op_Relu(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().nn.relu(a[0])

    def op_Tanh(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.tanh(a[0])

    def op_Exp(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.exp(a[0])

    def op_Log(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.log(a[0])

    def op_Sqrt(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.sqrt(a[0])

    def op_Neg(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.negative(a[0])

    def op_Abs(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.abs(a[0])

    def op_Reciprocal(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.reciprocal(a[0])

    def op_Floor(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.floor(a[0])

    def op_Ceil(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.ceil(a[0])

    def op_Sign(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.sign(a[0])

    def op_Round(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.round(a[0])  # half to even, as ONNX

    def op_Erf(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().math.erf(a[0])

    def op_HardSigmoid(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        alpha, beta = float(k.get("alpha", 0.2)), float(k.get("beta", 0.5))
        return tf.clip_by_value(a[0] * alpha + beta, 0.0, 1.0)

    def op_Clip(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        x = a[0]
        low = a[1] if len(a) > 1 and a[1] is not None else k.get("min")
        high = a[2] if len(a) > 2 and a[2] is not None else k.get("max")
        if low is not None:
            x = tf.math.maximum(x, tf.cast(low, tf.convert_to_tensor(x).dtype))
        if high is not None:
            x = tf.math.minimum(x, tf.cast(high, tf.convert_to_tensor(x).dtype))
        return x

    def op_Softmax(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().nn.softmax(a[0], axis=int(k.get("axis", -1)))

    # -- shapes -----------------------------------------------------------------------------------------------
    def op_Shape(self, a: list[Any], k: dict[str, Any]) -> Any:
        shape = np.asarray(self.shape(a[0]), dtype=np.int64)
        start, end = int(k.get("start", 0)), k.get("end")
        return shape[start : (int(end) if end is not None else None)]

    def op_Size(self, a: list[Any], k: dict[str, Any]) -> Any:
        return np.asarray(int(np.prod(self.shape(a[0]))), dtype=np.int64)

    def op_Reshape(self, a: list[Any], k: dict[str, Any]) -> Any:
        target = [int(d) for d in self.static(a[1], "Reshape shape")]
        current = self.shape(a[0])
        if not int(k.get("allowzero", 0)):
            target = [current[i] if d == 0 else d for i, d in enumerate(target)]
        return _tf().reshape(a[0], target)

    def op_Flatten(self, a: list[Any], k: dict[str, Any]) -> Any:
        shape = self.shape(a[0])
        axis = int(k.get("axis", 1)) % (len(shape) or 1) if int(k.get("axis", 1)) < 0 else int(k.get("axis", 1))
        return _tf().reshape(a[0], [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))])

    def op_Transpose(self, a: list[Any], k: dict[str, Any]) -> Any:
        perm = k.get("perm")
        return _tf().transpose(a[0], perm=[int(p) for p in perm] if perm is not None else None)

    def op_Unsqueeze(self, a: list[Any], k: dict[str, Any]) -> Any:
        shape = self.shape(a[0])
        axes = sorted(ax % (len(shape) + len(self.axes(a, k) or [])) for ax in (self.axes(a, k) or []))
        for ax in axes:
            shape.insert(ax, 1)
        return _tf().reshape(a[0], shape)

    def op_Squeeze(self, a: list[Any], k: dict[str, Any]) -> Any:
        shape = self.shape(a[0])
        axes = self.axes(a, k)
        keep = [d for i, d in enumerate(shape) if (d != 1 if axes is None else i not in {x % len(shape) for x in axes})]
        return _tf().reshape(a[0], keep)

    def op_Concat(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        if all(isinstance(x, np.ndarray) for x in a):
            return np.concatenate(a, axis=int(k["axis"]))
        return tf.concat(list(a), axis=int(k["axis"]))

    def op_Expand(self, a: list[Any], k: dict[str, Any]) -> Any:
        target = np.broadcast_shapes(tuple(self.shape(a[0])), tuple(int(d) for d in self.static(a[1], "Expand shape")))
        return _tf().broadcast_to(a[0], target)

    def op_Tile(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().tile(a[0], [int(r) for r in self.static(a[1], "Tile repeats")])

    def op_Range(self, a: list[Any], k: dict[str, Any]) -> Any:
        start, limit, delta = (self.static(x, "Range bounds") for x in a)
        return np.arange(start, limit, delta, dtype=np.asarray(start).dtype)

    def op_ConstantOfShape(self, a: list[Any], k: dict[str, Any]) -> Any:
        value = np.asarray(k.get("value", np.zeros(1, np.float32))).reshape(-1)
        return np.full([int(d) for d in self.static(a[0], "ConstantOfShape shape")], value[0], dtype=value.dtype)

    def op_Slice(self, a: list[Any], k: dict[str, Any]) -> Any:
        shape = self.shape(a[0])
        if self.opset < 10:
            starts, ends, axes, steps = k["starts"], k["ends"], k.get("axes"), None
        else:
            starts = self.static(a[1], "Slice starts")
            ends = self.static(a[2], "Slice ends")
            axes = self.static(a[3], "Slice axes") if len(a) > 3 and a[3] is not None else None
            steps = self.static(a[4], "Slice steps") if len(a) > 4 and a[4] is not None else None
        axes = list(range(len(starts))) if axes is None else [int(x) % len(shape) for x in axes]
        steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
        index = [slice(None)] * len(shape)
        for ax, st, en, sp in zip(axes, starts, ends, steps, strict=True):
            start, stop, step = slice(int(st), int(en), sp).indices(shape[ax])
            index[ax] = slice(start, stop if stop >= 0 else None, step)
        return a[0][tuple(index)]

    def op_Gather(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        axis = int(k.get("axis", 0))
        indices = a[1]
        if isinstance(indices, np.ndarray):
            size = self.shape(a[0])[axis]
            indices = np.where(indices < 0, indices + size, indices)
        return tf.gather(a[0], indices, axis=axis)

    def op_GatherElements(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        data, indices = a[0], tf.convert_to_tensor(a[1])
        rank = len(self.shape(data))
        axis = int(k.get("axis", 0)) % rank
        index_shape = self.shape(indices)
        grids = np.indices(index_shape, dtype=np.int64 if indices.dtype == tf.int64 else np.int32)
        coords = [tf.constant(grids[i]) if i != axis else indices for i in range(rank)]
        return tf.gather_nd(data, tf.stack(coords, axis=-1))

    def op_GatherND(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().gather_nd(a[0], a[1], batch_dims=int(k.get("batch_dims", 0)))

    # -- reductions ---------------------------------------------------------------------------------------------
    def _reduce(self, fn: Any, a: list[Any], k: dict[str, Any]) -> Any:
        axes = self.axes(a, k)
        keep = bool(int(k.get("keepdims", 1)))
        if axes is None or not axes:
            if int(k.get("noop_with_empty_axes", 0)):
                return a[0]
            axes = None
        return fn(a[0], axis=axes, keepdims=keep)

    def op_ReduceSum(self, a: list[Any], k: dict[str, Any]) -> Any:
        return self._reduce(_tf().math.reduce_sum, a, k)

    def op_ReduceMax(self, a: list[Any], k: dict[str, Any]) -> Any:
        return self._reduce(_tf().math.reduce_max, a, k)

    def op_ReduceMin(self, a: list[Any], k: dict[str, Any]) -> Any:
        return self._reduce(_tf().math.reduce_min, a, k)

    def op_ReduceMean(self, a: list[Any], k: dict[str, Any]) -> Any:
        return self._reduce(_tf().math.reduce_mean, a, k)

    def op_ReduceProd(self, a: list[Any], k: dict[str, Any]) -> Any:
        return self._reduce(_tf().math.reduce_prod, a, k)

    def _arg(self, fn: Any, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        if int(k.get("select_last_index", 0)):
            raise _Unsupported("ArgMax/ArgMin with select_last_index=1")
        rank = len(self.shape(a[0]))
        axis = int(k.get("axis", 0)) % rank
        x = a[0]
        if axis != rank - 1:  # TFLite's ARG_MAX over an inner axis is ~10x slower than transpose + last axis
            x = tf.transpose(x, [i for i in range(rank) if i != axis] + [axis])
        out = fn(x, axis=-1, output_type=tf.int64)  # first index of the extreme value either way
        return tf.expand_dims(out, axis) if int(k.get("keepdims", 1)) else out

    def op_ArgMax(self, a: list[Any], k: dict[str, Any]) -> Any:
        return self._arg(_tf().math.argmax, a, k)

    def op_ArgMin(self, a: list[Any], k: dict[str, Any]) -> Any:
        return self._arg(_tf().math.argmin, a, k)

    def op_TopK(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        count = int(self.static(a[1], "TopK K").reshape(-1)[0])
        rank = len(self.shape(a[0]))
        axis = int(k.get("axis", -1)) % rank
        if not int(k.get("sorted", 1)):
            raise _Unsupported("TopK with sorted=0")
        x = a[0]
        perm = None
        if axis != rank - 1:
            perm = [i for i in range(rank) if i != axis] + [axis]
            x = tf.transpose(x, perm)
        largest = bool(int(k.get("largest", 1)))
        values, indices = tf.math.top_k(x if largest else -x, k=count, sorted=True)
        values = values if largest else -values
        indices = tf.cast(indices, tf.int64)
        if perm is not None:
            inverse = list(np.argsort(perm))
            values, indices = tf.transpose(values, inverse), tf.transpose(indices, inverse)
        return values, indices

    # -- linear algebra, pooling, resizing -------------------------------------------------------------------
    def op_MatMul(self, a: list[Any], k: dict[str, Any]) -> Any:
        return _tf().linalg.matmul(a[0], a[1])

    def op_Gemm(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        out = tf.linalg.matmul(a[0], a[1], transpose_a=bool(k.get("transA", 0)), transpose_b=bool(k.get("transB", 0)))
        out = out * float(k.get("alpha", 1.0))
        if len(a) > 2 and a[2] is not None:
            out = out + float(k.get("beta", 1.0)) * a[2]
        return out

    def op_Einsum(self, a: list[Any], k: dict[str, Any]) -> Any:
        equation = k["equation"].decode() if isinstance(k["equation"], bytes) else k["equation"]
        return _tf().einsum(equation, *a)

    def op_LayerNormalization(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        rank = len(self.shape(a[0]))
        axes = list(range(int(k.get("axis", -1)) % rank, rank))
        mean = tf.math.reduce_mean(a[0], axis=axes, keepdims=True)
        centered = a[0] - mean
        variance = tf.math.reduce_mean(centered * centered, axis=axes, keepdims=True)
        out = centered * tf.math.rsqrt(variance + float(k.get("epsilon", 1e-5))) * a[1]
        return out + a[2] if len(a) > 2 and a[2] is not None else out

    def op_MaxPool(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        shape = self.shape(a[0])
        if len(shape) != 4 or int(k.get("ceil_mode", 0)) or k.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise _Unsupported("MaxPool other than 2D with explicit pads")
        if any(int(d) != 1 for d in k.get("dilations", [1, 1])):
            raise _Unsupported("dilated MaxPool")
        kernel = [int(v) for v in k["kernel_shape"]]
        strides = [int(v) for v in k.get("strides", [1, 1])]
        pads = [int(v) for v in k.get("pads", [0, 0, 0, 0])]
        x = tf.transpose(a[0], [0, 2, 3, 1])
        same = []
        for size, k_, s_ in zip(shape[2:], kernel, strides, strict=True):
            total = max((-(-size // s_) - 1) * s_ + k_ - size, 0)
            same += [total // 2, total - total // 2]
        if pads == [same[0], same[2], same[1], same[3]]:
            # TF's SAME max pool ignores the padding, as ONNX's implicit -inf padding does; no -inf constant in the
            # graph (its calibration range would wreck int8 quantisation nearby)
            x = tf.nn.max_pool2d(x, ksize=kernel, strides=strides, padding="SAME")
        else:
            lowest = float(np.finfo(x.dtype.as_numpy_dtype).min)
            x = tf.pad(x, [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]], constant_values=lowest)
            x = tf.nn.max_pool2d(x, ksize=kernel, strides=strides, padding="VALID")
        return tf.transpose(x, [0, 3, 1, 2])

    def op_Resize(self, a: list[Any], k: dict[str, Any]) -> Any:
        tf = _tf()
        shape = self.shape(a[0])
        mode = _text(k.get("mode", "nearest"))
        transform = _text(k.get("coordinate_transformation_mode", "half_pixel"))
        sizes = a[3] if len(a) > 3 and a[3] is not None and np.size(self.static(a[3], "Resize sizes")) else None
        if sizes is not None:
            target = [int(v) for v in self.static(sizes, "Resize sizes")]
        else:
            scales = [float(v) for v in self.static(a[2], "Resize scales")]
            target = [int(np.floor(d * s)) for d, s in zip(shape, scales, strict=True)]
        if len(shape) != 4 or target[:2] != shape[:2]:
            raise _Unsupported("Resize other than the spatial dims of a 4D NCHW tensor")
        if transform == "pytorch_half_pixel" and min(target[2:]) <= 1:
            raise _Unsupported("Resize pytorch_half_pixel to a size of 1")
        x = tf.transpose(a[0], [0, 2, 3, 1])  # measured: 10x faster than resizing [B*C, h, w, 1] without transposes
        if mode == "linear":
            if transform in ("half_pixel", "pytorch_half_pixel"):
                x = tf.compat.v1.image.resize_bilinear(x, target[2:], align_corners=False, half_pixel_centers=True)
            elif transform == "align_corners":
                x = tf.compat.v1.image.resize_bilinear(x, target[2:], align_corners=True, half_pixel_centers=False)
            elif transform == "asymmetric":
                x = tf.compat.v1.image.resize_bilinear(x, target[2:], align_corners=False, half_pixel_centers=False)
            else:
                raise _Unsupported(f"Resize linear with coordinate_transformation_mode={transform}")
        elif mode == "nearest" and transform == "asymmetric" and _text(k.get("nearest_mode", "")) == "floor":
            x = tf.compat.v1.image.resize_nearest_neighbor(x, target[2:], align_corners=False, half_pixel_centers=False)
        else:
            raise _Unsupported(f"Resize mode={mode} coordinate_transformation_mode={transform}")
        return tf.transpose(x, [0, 3, 1, 2])


_NO_FOLD = {"Constant"}  # handled directly (no inputs)


def _tf() -> Any:
    import tensorflow as tf

    return tf


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attr_value(attr: Any) -> Any:
    from onnx import helper, numpy_helper

    value = helper.get_attribute_value(attr)
    if attr.type == attr.TENSOR:
        return numpy_helper.to_array(value)
    return value


def _tf_layouts(scratch: Path, signature: Any, cut_names: list[str], image: np.ndarray) -> dict[str, list[int] | None]:
    """For each cut tensor, the permutation that brings onnx2tf's output back to the ONNX layout (None: as is).

    Decided by running the network in ONNX Runtime and in TensorFlow on one image, never by shape alone.
    """
    import onnxruntime as ort
    import tensorflow as tf

    session = ort.InferenceSession(str(scratch / "network.onnx"), providers=["CPUExecutionProvider"])
    reference = dict(zip([o.name for o in session.get_outputs()],
                         session.run(None, {INPUT_NAME: np.ascontiguousarray(image.transpose(0, 3, 1, 2))}),
                         strict=True))  # fmt: skip
    produced = {k: v.numpy() for k, v in signature(**{INPUT_NAME: tf.constant(image)}).items()}
    keys = sorted(produced, key=_output_order)
    if len(keys) != len(cut_names):
        raise RuntimeError(f"onnx2tf's network has {len(keys)} outputs, expected {len(cut_names)}")
    layouts: dict[str, list[int] | None] = {}
    for key, name in zip(keys, cut_names, strict=True):
        ref, got = reference[name], produced[key]
        candidates: list[list[int] | None] = [None]
        if got.ndim == 4:
            candidates.append([0, 3, 1, 2])
        elif got.ndim == 3:
            candidates.append([0, 2, 1])
        best = None
        for perm in candidates:
            aligned = got if perm is None else got.transpose(perm)
            if aligned.shape == ref.shape:
                error = float(np.max(np.abs(aligned - ref)) / (np.max(np.abs(ref)) + 1e-6))
                if best is None or error < best[0]:
                    best = (error, perm)
        if best is None or best[0] > 1e-3:
            raise RuntimeError(f"onnx2tf's output for '{name}' does not match ONNX Runtime in any layout")
        layouts[key] = best[1]
    return {f"{k}": layouts[k] for k in keys}


def _output_order(key: str) -> tuple[int, str]:
    """onnx2tf names signature outputs output_0, output_1, ... in ONNX output order."""
    tail = key.rsplit("_", 1)[-1]
    return (int(tail), key) if tail.isdigit() else (1 << 30, key)


def _tf_build(scratch: Path, precision: str, out: Path, output_names: list[str]) -> dict[str, Any]:
    """Compose onnx2tf's network with the converted post-processing and write one `.tflite`."""
    import onnx
    import tensorflow as tf

    started = time.perf_counter()
    tail_model = onnx.load(str(scratch / "postprocess.onnx"))
    cut_names = [i.name for i in tail_model.graph.input]
    network = tf.saved_model.load(str(scratch / "saved_model"))
    signature = network.signatures[SIGNATURE]
    spec = signature.structured_input_signature[1][INPUT_NAME]
    height, width = int(spec.shape[1]), int(spec.shape[2])
    if spec.dtype != tf.uint8 or list(spec.shape) != [1, height, width, 3]:
        raise RuntimeError(f"onnx2tf's network takes {spec.dtype.name} {list(spec.shape)}, expected uint8 NHWC")
    check_images = np.load(scratch / "check.npy")
    layouts = _tf_layouts(scratch, signature, cut_names, check_images[:1])
    keys = sorted(layouts, key=_output_order)
    tail = _TailConverter(tail_model)

    class Composite(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        @tf.function(input_signature=[tf.TensorSpec([1, height, width, 3], tf.uint8, name=INPUT_NAME)], autograph=False)
        def serve(self, image: Any) -> dict[str, Any]:
            produced = self.network.signatures[SIGNATURE](**{INPUT_NAME: image})
            with tf.name_scope(POST_SCOPE):
                inputs = {}
                for key, name in zip(keys, cut_names, strict=True):
                    perm = layouts[key]
                    inputs[name] = produced[key] if perm is None else tf.transpose(produced[key], perm)
                outputs = tail(inputs)
                return {name: tf.identity(tf.convert_to_tensor(outputs[name]), name=name) for name in output_names}

    module = Composite()
    composed = scratch / "composed"
    tf.saved_model.save(module, str(composed), signatures={SIGNATURE: module.serve})

    def converter() -> Any:
        conv = tf.lite.TFLiteConverter.from_saved_model(str(composed), signature_keys=[SIGNATURE])
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return conv

    quantization: dict[str, Any] = {"weights": "float32", "activations": "float32"}
    if precision == Precision.FP32.value:
        model_bytes = converter().convert()
    elif precision == Precision.FP16.value:
        conv = converter()
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
        model_bytes = conv.convert()
        quantization = {"weights": "float16", "activations": "float32"}
    elif precision == Precision.INT8_DYNAMIC.value:
        conv = converter()
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        model_bytes = conv.convert()
        quantization = {"weights": "int8 (dynamic range)", "activations": "float32, int8 on the fly in hybrid kernels"}
    elif precision == Precision.INT8.value:
        model_bytes, quantization = _tf_int8(converter, scratch, height, width)
    else:
        raise RuntimeError(f"unknown precision {precision}")
    out.write_bytes(model_bytes)
    return {
        "seconds": time.perf_counter() - started,
        "outputs": {o.name: {"dtype": onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name,
                             "shape": [d.dim_value for d in o.type.tensor_type.shape.dim]}
                    for o in tail_model.graph.output},  # fmt: skip
        "network_layouts": {cut: layouts[key] for key, cut in zip(keys, cut_names, strict=True)},
        "quantization": quantization,
        "versions": _tf_versions(),
    }


def _tf_int8(converter: Any, scratch: Path, height: int, width: int) -> tuple[bytes, dict[str, Any]]:
    """Full-integer network from our calibration images; the post-processing and the heads' last convs stay float.

    Calibrate, strip the statistics of the float part, quantise with a deny list (see the comment below); then the
    result is checked: post-processing ops that still touch int8 are listed in the record (expected: none).
    """
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.python import convert

    images = np.load(scratch / "calibration.npy")

    def dataset() -> Iterator[list[np.ndarray]]:
        for image in images:
            yield [np.ascontiguousarray(image[None])]

    conv = converter()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = dataset
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    conv.experimental_mlir_quantizer = True
    conv._experimental_calibrate_only = True  # noqa: SLF001 - the debugger's calibration step
    calibrated = conv.convert()
    probe = Interpreter(model_content=calibrated)
    denied = _post_tensor_names(probe, heads=True)
    denied_ops = sorted(_post_only_op_types(probe))
    # A deny list alone still leaves int8 round trips on the float path (measured: the heatmap probabilities went
    # through int8 at 1/256 steps, and a -inf padding range zeroed every score). Without calibration statistics a
    # tensor cannot be quantised at all, so they are removed from every post-processing tensor first.
    stripped = _strip_statistics(calibrated, denied)
    model_bytes = convert.mlir_quantize(
        stripped, disable_per_channel=False, fully_quantize=False,
        denylisted_nodes=sorted(denied), denylisted_ops=denied_ops,
    )  # fmt: skip
    int8_post = _int8_post_ops(Interpreter(model_content=model_bytes))
    return model_bytes, {
        "weights": "int8 per-channel",
        "activations": "int8 (network), float32 (post-processing)",
        "calibration_images": int(len(images)),
        "float_tensors": len(denied),
        "quantize_ops": _count_ops(Interpreter(model_content=model_bytes), ("QUANTIZE", "DEQUANTIZE")),
        "float_op_types_denylisted": denied_ops,
        "post_processing_ops_in_int8": int8_post,
    }


def _strip_statistics(model: bytes, names: set[str]) -> bytes:
    """Remove calibration statistics (min/max) from the named tensors of a calibrated `.tflite`."""
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    for subgraph in tree.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.name.decode() in names:
                tensor.quantization = None
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def _post_tensor_names(interpreter: Any, heads: bool = False) -> set[str]:
    """Output tensors of the post-processing ops: in the POST_SCOPE name scope or producing a model output.

    With `heads`, also the convolutions whose outputs the post-processing reads (the heads' prediction convs):
    keeping them float keeps heatmap logits, and so the scores and their order, at float resolution.
    """
    details = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    signatures = interpreter._get_full_signature_list().values()  # noqa: SLF001
    outputs = {details[i] for sig in signatures for i in sig["outputs"].values()}
    names: set[str] = set()
    ops = interpreter._get_ops_details()  # noqa: SLF001
    for op in ops:
        out_names = [details[i] for i in op["outputs"] if i >= 0]
        if any(POST_SCOPE in n or n in outputs or n.split(";")[0] in outputs for n in out_names):
            names.update(out_names)
    if heads:  # the ops that produce the post-processing's inputs: the heads' last convolutions
        post_ops = [op for op in ops if any(details[o] in names for o in op["outputs"])]
        post_inputs = {details[i] for op in post_ops for i in op["inputs"] if i >= 0}
        for op in ops:
            out_names = [details[i] for i in op["outputs"] if i >= 0]
            if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D") and any(n in post_inputs for n in out_names):
                names.update(out_names)
    return names


def _count_ops(interpreter: Any, kinds: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(kinds, 0)
    for op in interpreter._get_ops_details():  # noqa: SLF001
        if op["op_name"] in counts:
            counts[op["op_name"]] += 1
    return counts


def _post_only_op_types(interpreter: Any) -> set[str]:
    """Op types that occur in the post-processing and nowhere in the network (safe to deny by type)."""
    details = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    post = _post_tensor_names(interpreter)
    in_post, in_network = set(), set()
    for op in interpreter._get_ops_details():  # noqa: SLF001
        names = [details[i] for i in op["outputs"] if i >= 0]
        (in_post if any(n in post for n in names) else in_network).add(op["op_name"])
    return in_post - in_network - {"QUANTIZE", "DEQUANTIZE"}


def _int8_post_ops(interpreter: Any) -> list[str]:
    """Post-processing ops (by the names above) that read or write int8 tensors, QUANTIZE/DEQUANTIZE aside."""
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    post = _post_tensor_names(interpreter)
    found = []
    for op in interpreter._get_ops_details():  # noqa: SLF001
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        outs = [tensors[i] for i in op["outputs"] if i >= 0]
        ins = [tensors[i] for i in op["inputs"] if i >= 0]
        if any(t["name"] in post for t in outs) and any(t["dtype"] == np.int8 for t in ins + outs):
            found.append(op["op_name"])
    return sorted(found)


def _tf_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("onnx2tf", "tensorflow", "onnx", "onnxruntime", "numpy"):
        try:
            key = package if package in ("onnx2tf", "tensorflow") else f"{package} (onnx2tf env)"
            versions[key] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _tf_error_line(exc: BaseException) -> str:
    """The informative line of a TensorFlow / converter error (they are long and end in MLIR dumps)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for marker in ("TF Select ops:", "op is neither", "error:", "Error"):
        for line in lines:
            if marker in line:
                return line[:300]
    return lines[-1][:300] if lines else ""


def _build_main(argv: Sequence[str]) -> int:
    """Entry point in the onnx2tf environment: `build --scratch D --precision P --out F --report R --outputs a,b`."""
    import argparse

    parser = argparse.ArgumentParser(prog="maskconver_deploy.backends.tflite")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--precision", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--outputs", required=True)
    args = parser.parse_args(list(argv))
    try:
        report = _tf_build(args.scratch, args.precision, args.out, args.outputs.split(","))
    except _Unsupported as exc:
        args.report.write_text(json.dumps({"error": f"post-processing: {exc}"}))
        return 2
    except Exception as exc:  # reported to the toolkit as one line; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        args.report.write_text(json.dumps({"error": f"{type(exc).__name__}: {_tf_error_line(exc)}"}))
        return 1
    args.report.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(_build_main(sys.argv[1:]))

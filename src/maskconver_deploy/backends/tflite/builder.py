"""The onnx2tf side of the TFLite backend (steps 2-4 of the package docstring): onnx2tf on the network, the
post-processing converted op by op (tail.py), both composed into one SavedModel, then the TFLite converter at one
precision. Runs in the onnx2tf environment only, as `python -m maskconver_deploy.backends.tflite build SCRATCH
PRECISION` (`__main__.py`): it reads SCRATCH/network.onnx, postprocess.onnx, check.npy (and calibration.npy),
written by the toolkit side, and writes SCRATCH/model.tflite and SCRATCH/build.json. Imports numpy here; onnx,
onnxruntime, tensorflow and onnx2tf inside functions.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.backends.tflite.common import POST_SCOPE, SIGNATURE
from maskconver_deploy.backends.tflite.tail import TailConverter, Unsupported, tf_error_line
from maskconver_deploy.types import INPUT_NAME, Precision

class _Onnx2tfFailed(Exception):
    """onnx2tf stopped on the network (the message is its most informative line)."""


def build_main(argv: Sequence[str]) -> int:
    """Entry point in the onnx2tf environment: `build SCRATCH PRECISION`; writes SCRATCH/model.tflite and a report
    SCRATCH/build.json (`{"error": one line}` on failure)."""
    if len(argv) != 3 or argv[0] != "build":
        print("usage: python -m maskconver_deploy.backends.tflite build SCRATCH PRECISION", file=sys.stderr)
        return 2
    scratch, precision = Path(argv[1]), argv[2]
    try:
        report = _tf_build(scratch, precision)
        code = 0
    except _Onnx2tfFailed as exc:
        report, code = {"error": f"onnx2tf could not convert the network: {exc}"}, 2
    except Unsupported as exc:
        report, code = {"error": f"cannot convert the post-processing to TFLite: {exc}"}, 2
    except Exception as exc:  # reported as one line; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        report, code = {"error": f"TFLite conversion failed: {type(exc).__name__}: {tf_error_line(exc)}"}, 1
    (scratch / "build.json").write_text(json.dumps(report))
    return code


def _tf_build(scratch: Path, precision: str) -> dict[str, Any]:
    """onnx2tf's network + the converted post-processing -> one `.tflite` at `precision` (scratch/model.tflite)."""
    import onnx

    started = time.perf_counter()
    network = _tf_network(scratch)
    onnx2tf_seconds = time.perf_counter() - started
    tail_model = onnx.load(str(scratch / "postprocess.onnx"))
    layouts = _tf_layouts(scratch, network, [i.name for i in tail_model.graph.input])
    composed = _tf_composite(network, tail_model, layouts, scratch / "composed")
    model_bytes, quantization = _tf_convert(composed, precision, scratch)
    (scratch / "model.tflite").write_bytes(model_bytes)
    return {
        "outputs": {o.name: {"dtype": onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name,
                             "shape": [d.dim_value for d in o.type.tensor_type.shape.dim]}
                    for o in tail_model.graph.output},  # fmt: skip
        "network_layouts": layouts,
        "quantization": quantization,
        "versions": _tf_versions(),
        "seconds": {"onnx2tf": round(onnx2tf_seconds, 2),
                    "tflite": round(time.perf_counter() - started - onnx2tf_seconds, 2)},
    }  # fmt: skip


def _tf_network(scratch: Path) -> Any:
    """onnx2tf on scratch/network.onnx, in this process (cwd: scratch, where its sample file is): a Keras model
    that takes uint8 NHWC (nothing saved; `output_signaturedefs` only renames '/x' nodes 'wa/x', which a SavedModel
    needs). Its messages are kept; on failure the most informative one is raised."""
    import contextlib
    import io

    import onnx2tf

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            network = onnx2tf.convert(input_onnx_file_path=str(scratch / "network.onnx"),
                                      output_folder_path=str(scratch / "onnx2tf"), disable_model_save=True,
                                      output_signaturedefs=True, verbosity="error")  # fmt: skip
    except ModuleNotFoundError as exc:  # one module per ONNX op type: onnx2tf.ops.<OpType>
        if not (exc.name or "").startswith("onnx2tf.ops."):
            raise
        raise _Onnx2tfFailed(f"onnx2tf has no converter for op {exc.name.rsplit('.', 1)[-1]}") from None
    except (Exception, SystemExit) as exc:  # onnx2tf prints what failed, then raises or exits
        raise _Onnx2tfFailed(_onnx2tf_error_line(log.getvalue(), exc)) from None
    import tensorflow as tf

    spec = network.inputs[0]
    if len(network.inputs) != 1 or tf.as_dtype(spec.dtype) != tf.uint8 or spec.shape[0] != 1 or spec.shape[-1] != 3:
        raise RuntimeError(f"onnx2tf's network takes {[(i.dtype, i.shape) for i in network.inputs]}, "
                           "expected one uint8 NHWC image")  # fmt: skip
    return network


def _onnx2tf_error_line(log: str, exc: BaseException) -> str:
    """What failed, from onnx2tf's messages: the ONNX node it names and the first exception line."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.splitlines()]
    node = next((line.split("onnx_op_name:", 1)[1].strip() for line in lines if "onnx_op_name:" in line), "")
    problem = next((line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)), "")
    if not problem and not isinstance(exc, SystemExit):
        problem = f"{type(exc).__name__}: {tf_error_line(exc)}"
    if not problem:
        errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
        problem = next((line for line in errors if "trace log" not in line), "no message")
    node = re.sub(r"^wa/", "/", node)  # onnx2tf's rename of '/x' node names, undone
    return (f"node {node}: " if node else "") + problem[:300]


def _tf_layouts(scratch: Path, network: Any, cut_names: list[str]) -> dict[str, list[int] | None]:
    """For each cut tensor, the permutation that brings onnx2tf's output back to the ONNX layout (None: as is).

    Decided by running the network in ONNX Runtime and in TensorFlow on one check image, never by shape alone.
    """
    import onnxruntime as ort

    image = np.load(scratch / "check.npy")[:1]
    session = ort.InferenceSession(str(scratch / "network.onnx"), providers=["CPUExecutionProvider"])
    reference = session.run(cut_names, {INPUT_NAME: np.ascontiguousarray(image.transpose(0, 3, 1, 2))})
    produced = network(image)
    produced = [t.numpy() for t in (produced if isinstance(produced, list | tuple) else [produced])]
    if len(produced) != len(cut_names):
        raise RuntimeError(f"onnx2tf's network has {len(produced)} outputs, expected {len(cut_names)}")
    layouts: dict[str, list[int] | None] = {}
    for name, ref, got in zip(cut_names, reference, produced, strict=True):
        perms: list[list[int] | None] = [None, *{4: [[0, 3, 1, 2]], 3: [[0, 2, 1]]}.get(got.ndim, [])]
        errors = []
        for perm in perms:
            aligned = got if perm is None else got.transpose(perm)
            if aligned.shape == ref.shape:
                errors.append((float(np.max(np.abs(aligned - ref)) / (np.max(np.abs(ref)) + 1e-6)), perm))
        if not errors or min(e for e, _ in errors) > 1e-3:
            raise RuntimeError(f"onnx2tf's output for '{name}' does not match ONNX Runtime in any layout")
        layouts[name] = min(errors, key=lambda item: item[0])[1]
    return layouts


def _tf_composite(network: Any, tail_model: Any, layouts: dict[str, list[int] | None], out: Path) -> Path:
    """Save one SavedModel whose `serving_default(image)` runs the network, restores the ONNX layout of the cut
    tensors and runs the post-processing in the POST_SCOPE name scope; outputs by the graph's names.

    Saved through Keras' ExportArchive, as onnx2tf does: it tracks every variable the function uses (onnx2tf's model
    does not track all of its own). `output_signaturedefs` made onnx2tf name them so that a SavedModel takes them."""
    import tensorflow as tf
    import tf_keras

    spec = network.inputs[0]
    height, width = int(spec.shape[1]), int(spec.shape[2])
    cut_names = [i.name for i in tail_model.graph.input]
    output_names = [o.name for o in tail_model.graph.output]
    tail = TailConverter(tail_model)

    def serve(image: Any) -> dict[str, Any]:
        produced = network(image)
        produced = list(produced) if isinstance(produced, list | tuple) else [produced]
        with tf.name_scope(POST_SCOPE):
            inputs = {name: value if layouts[name] is None else tf.transpose(value, layouts[name])
                      for name, value in zip(cut_names, produced, strict=True)}  # fmt: skip
            outputs = tail(inputs)
            return {name: tf.identity(tf.convert_to_tensor(outputs[name]), name=name) for name in output_names}

    archive = tf_keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint(SIGNATURE, serve, input_signature=[tf.TensorSpec([1, height, width, 3], tf.uint8, INPUT_NAME)])
    archive.write_out(str(out))
    return out


def _tf_convert(composed: Path, precision: str, scratch: Path) -> tuple[bytes, dict[str, Any]]:
    """The TFLite converter at `precision` (built-in ops only); returns the model and how it was quantised."""
    import tensorflow as tf

    def converter() -> Any:
        conv = tf.lite.TFLiteConverter.from_saved_model(str(composed), signature_keys=[SIGNATURE])
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return conv

    if precision == Precision.INT8.value:
        return _tf_int8(converter, np.load(scratch / "calibration.npy"))
    conv = converter()
    if precision == Precision.FP32.value:
        return conv.convert(), {"weights": "float32", "activations": "float32"}
    if precision == Precision.FP16.value:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
        return conv.convert(), {"weights": "float16", "activations": "float32"}
    if precision == Precision.INT8_DYNAMIC.value:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        return conv.convert(), {"weights": "int8 (dynamic range)",
                                "activations": "float32; int8 on the fly inside hybrid kernels"}  # fmt: skip
    raise RuntimeError(f"unknown precision {precision}")


def _tf_int8(converter: Any, images: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """Full-integer network from our calibration images; the post-processing and the heads' last convs stay float.

    The two steps of tf.lite.experimental.QuantizationDebugger: calibrate, then quantise with a deny list. A deny
    list alone still leaves int8 round trips on the float path (measured: heatmap probabilities in 1/256 steps, and
    a -inf padding range that zeroed every score); a tensor without calibration statistics cannot be quantised at
    all, so the statistics of every denied tensor are removed first. The record lists post-processing ops that
    still touch int8 (expected: none).
    """
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.python import convert

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
    probe = _OpTable(Interpreter(model_content=calibrated))
    denied = probe.float_tensors(heads=True)
    denied_ops = sorted(probe.post_only_op_types())
    model_bytes = convert.mlir_quantize(
        _strip_statistics(calibrated, denied), disable_per_channel=False, fully_quantize=False,
        denylisted_nodes=sorted(denied), denylisted_ops=denied_ops,
    )  # fmt: skip
    result = _OpTable(Interpreter(model_content=model_bytes))
    return model_bytes, {
        "weights": "int8 per-channel",
        "activations": "int8 (network), float32 (post-processing and the heads' last convolutions)",
        "calibration_images": int(len(images)),
        "float_tensors": len(denied),
        "float_op_types_denylisted": denied_ops,
        "quantize_ops": result.count("QUANTIZE", "DEQUANTIZE"),
        "int8_ops": result.int8_op_types(),
        "post_processing_ops_in_int8": result.int8_post_ops(),
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


class _OpTable:
    """The ops of a `.tflite` with their tensors' names and dtypes: which belong to the post-processing (outputs in
    the POST_SCOPE name scope or a model output), which run in int8."""

    def __init__(self, interpreter: Any) -> None:
        self.tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
        self.ops = interpreter._get_ops_details()  # noqa: SLF001
        signatures = interpreter._get_full_signature_list().values()  # noqa: SLF001
        outputs = {self.tensors[i]["name"] for sig in signatures for i in sig["outputs"].values()}
        self.post: set[str] = set()
        for op in self.ops:
            names = self.names(op["outputs"])
            if any(POST_SCOPE in n or n in outputs or n.split(";")[0] in outputs for n in names):
                self.post.update(names)

    def names(self, indices: Sequence[int]) -> list[str]:
        return [self.tensors[i]["name"] for i in indices if i >= 0]

    def is_post(self, op: dict[str, Any]) -> bool:
        return any(n in self.post for n in self.names(op["outputs"]))

    def float_tensors(self, heads: bool) -> set[str]:
        """The post-processing's tensors; with `heads`, also the outputs of the convolutions it reads (the heads'
        prediction convs: float there keeps the heatmap logits, so the scores and their order, at float resolution)."""
        names = set(self.post)
        if heads:
            read = {n for op in self.ops if self.is_post(op) for n in self.names(op["inputs"])}
            for op in self.ops:
                if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D") and set(self.names(op["outputs"])) & read:
                    names.update(self.names(op["outputs"]))
        return names

    def post_only_op_types(self) -> set[str]:
        """Op types that occur in the post-processing and nowhere in the network (safe to deny by type)."""
        post = {op["op_name"] for op in self.ops if self.is_post(op)}
        network = {op["op_name"] for op in self.ops if not self.is_post(op)}
        return post - network - {"QUANTIZE", "DEQUANTIZE"}

    def _touches_int8(self, op: dict[str, Any]) -> bool:
        return any(self.tensors[i]["dtype"] == np.int8 for i in [*op["inputs"], *op["outputs"]] if i >= 0)

    def int8_op_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE") and self._touches_int8(op):
                counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
        return dict(sorted(counts.items()))

    def int8_post_ops(self) -> list[str]:
        return sorted(op["op_name"] for op in self.ops if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")
                      and self.is_post(op) and self._touches_int8(op))  # fmt: skip

    def count(self, *kinds: str) -> dict[str, int]:
        return {kind: sum(op["op_name"] == kind for op in self.ops) for kind in kinds}


def _tf_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("onnx2tf", "tensorflow", "onnx", "onnxruntime", "numpy"):
        try:
            versions[package if package in ("onnx2tf", "tensorflow") else f"{package} (onnx2tf env)"] = (
                metadata.version(package))
        except metadata.PackageNotFoundError:
            pass
    return versions

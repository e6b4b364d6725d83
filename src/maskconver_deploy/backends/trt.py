"""TensorRT: ONNX graph -> serialized engine (fp32, fp16, int8 with entropy calibration), and `TrtRunner`.

Needs an NVIDIA GPU, TensorRT 10 and cuda-python: `pip install ".[tensorrt]"` on such a machine. TensorRT and
cuda-python are imported inside functions only. Everything that does not need them is plain Python and numpy,
and is tested on any machine: the graph pre-flight check and its one rewrite, calibration batches and the
calibration cache, the choice of layers kept in fp32, the engine's build record and the compatibility check.

Files, all in the model folder (the artifact naming of every backend):
    tensorrt.engine, tensorrt-fp16.engine, tensorrt-int8.engine   engines (`.raw` before `.engine` for the raw graph)
    <engine>.json             build record: GPU, compute capability, TensorRT version, precision, source ONNX sha256,
                              calibration hash; `TrtRunner` refuses an engine built for another GPU or TensorRT
    tensorrt-int8.calib       int8 calibration cache (+ `.json` key: reused only for the same ONNX, calibration set
                              and TensorRT version)
    tensorrt.timing-cache     tactic timing cache shared by every build in the folder (speeds up rebuilds)

What the build does beyond parsing, and why:
- uint8 input. TensorRT accepts a uint8 network input only as the input of a Cast. Our exporter transposes the
  uint8 NHWC image before casting it, so the build moves the Cast in front of the Transpose (exact: both are
  lossless) and records that in the build record. Any other use of a uint8 input is refused with a clear message.
- TopK. K must be a constant <= 3840 with sorted output; the pre-flight check says so before TensorRT is called.
- ScatterElements with reduction "add" (the `input` merge path's owner histogram) is not a core layer: the ONNX
  parser builds it from the standard "ScatterElements" plugin (`scatterPluginHelper` in onnx-tensorrt), so the
  standard plugins are registered (`init_libnvinfer_plugins`) before parsing and before deserialising. The
  additions are of 1.0 into float32 counts below 2^24, so the atomics' order cannot change a count.
- fp16/int8. The post-processing (heatmap sigmoid and peak NMS, TopK, mask embeddings, mask logits, resize and
  panoptic merge) is kept in fp32 through layer precisions (PREFER_PRECISION_CONSTRAINTS): ties in peak NMS and
  TopK, and overflow in the logits, are where reduced precision changes the panoptic answer.
- TF32 is switched off, so `fp32` means fp32 (and parity with ONNX Runtime is tight).
- Weakly typed precision flags (BuilderFlag.FP16/INT8) and the int8 calibrator exist in TensorRT 10 only (they are
  deprecated since 10.1 and removed in 11); fp16/int8 builds on TensorRT 11 are refused with that explanation.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.backends.base import Availability, Runner
from maskconver_deploy.errors import BackendUnavailable, UserError
from maskconver_deploy.fileio import (
    atomic_path,
    read_json,
    refuse_overwrite,
    sha256_bytes,
    sha256_file,
    write_bytes,
    write_json,
)
from maskconver_deploy.types import INPUT_NAME, METADATA_KEY, ModelMeta, Precision

FAMILY = "tensorrt"
FAMILIES = (FAMILY,)
PRECISIONS = {FAMILY: (Precision.FP32, Precision.FP16, Precision.INT8)}
ENGINE_EXT = ".engine"
TIMING_CACHE_NAME = "tensorrt.timing-cache"
HINT = 'pip install ".[tensorrt]" on a machine with an NVIDIA GPU and CUDA'
TENSORRT_MAJOR = 10  # the API this module is written against
MAX_TOPK = 3840  # TensorRT's TopK limit
RECORD_FORMAT = "maskconver-tensorrt-engine/1"

# TensorRT DataType names -> numpy (trt.nptype does the same, but this mapping is testable without TensorRT)
_NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


# ---------------------------------------------------------------------------------------------------------------
# Names and paths
# ---------------------------------------------------------------------------------------------------------------
def artifact_path(model_dir: str | Path, name: Any, graph: str = "panoptic") -> Path:
    """Engine file for backend `name` ('tensorrt', 'tensorrt-fp16', 'tensorrt-int8' or a BackendName)."""
    return Path(model_dir) / f"{name}{'.raw' if graph == 'raw' else ''}{ENGINE_EXT}"


def record_path(engine: str | Path) -> Path:
    """The build record beside an engine: `<engine>.json`."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def calibration_cache_path(engine: str | Path) -> Path:
    """The int8 calibration cache beside an engine: tensorrt-int8.engine -> tensorrt-int8.calib."""
    return Path(engine).with_suffix(".calib")


def timing_cache_path(engine: str | Path) -> Path:
    """The timing cache shared by every TensorRT build in the engine's folder."""
    return Path(engine).parent / TIMING_CACHE_NAME


def _precision_of(name: str) -> Precision:
    from maskconver_deploy.backends import parse_backend

    backend = parse_backend(str(name))
    if backend.family != FAMILY or backend.precision not in PRECISIONS[FAMILY]:
        allowed = ", ".join(str(FAMILY if p is Precision.FP32 else f"{FAMILY}-{p.value}") for p in PRECISIONS[FAMILY])
        raise UserError(f"'{name}' is not a TensorRT backend; use one of {allowed}")
    return backend.precision


# ---------------------------------------------------------------------------------------------------------------
# Versions and availability
# ---------------------------------------------------------------------------------------------------------------
def _major(version: str) -> int | None:
    head = str(version).strip().split(".")[0]
    return int(head) if head.isdigit() else None


def tensorrt_version_problem(version: str) -> str | None:
    """Why this TensorRT version cannot run this module (None: it can)."""
    major = _major(version)
    if major is None:
        return f"cannot read the TensorRT version '{version}'"
    if major < TENSORRT_MAJOR:
        return f"TensorRT {version} is too old: this backend uses the TensorRT {TENSORRT_MAJOR} API"
    return None


def precision_problem(version: str, precision: Precision) -> str | None:
    """fp16/int8 use weakly typed builder flags and the int8 calibrator, which TensorRT 11 removed."""
    major = _major(version)
    if precision is not Precision.FP32 and major is not None and major > TENSORRT_MAJOR:
        return (
            f"{precision.value} builds use BuilderFlag.{precision.value.upper()} and implicit quantization, which "
            f"TensorRT {version} no longer has; install TensorRT {TENSORRT_MAJOR}.x (pip install 'tensorrt>=10,<11')"
        )
    return None


def _import_tensorrt() -> Any:
    import tensorrt

    return tensorrt


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _probe() -> str:
    """The reason this backend cannot run here, or '' when it can. May raise; `availability` catches."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the TensorRT Python package (tensorrt) is not installed"
    try:
        trt = _import_tensorrt()
    except (ImportError, OSError) as exc:
        return f"the tensorrt package is installed but cannot be loaded ({_first_line(exc)})"
    problem = tensorrt_version_problem(getattr(trt, "__version__", "?"))
    if problem:
        return problem
    try:
        cudart = _import_cudart()
    except (ImportError, OSError) as exc:
        return f"cuda-python is missing or cannot be loaded ({_first_line(exc)})"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        return f"no usable NVIDIA GPU (cudaGetDeviceCount: {_cuda_error_name(cudart, err)})"
    if count < 1:
        return "no NVIDIA GPU is visible"
    return ""


def availability(family: str = FAMILY) -> Availability:
    """Can TensorRT run here? Checks the package, then its import, then a CUDA device. Never raises."""
    if family not in FAMILIES:
        return Availability(False, f"'{family}' is not served by the TensorRT backend", "")
    try:
        reason = _probe()
    except Exception as exc:  # a broken driver or library must not crash `doctor`
        reason = f"TensorRT or CUDA failed to initialise ({_first_line(exc)})"
    return Availability(True) if not reason else Availability(False, reason, HINT)


def _require(family: str = FAMILY) -> None:
    status = availability(family)
    if not status.ok:
        raise BackendUnavailable(family, status.reason, status.hint)


# ---------------------------------------------------------------------------------------------------------------
# The ONNX graph before TensorRT sees it (onnx only)
# ---------------------------------------------------------------------------------------------------------------
def _consumers(graph: Any) -> dict[str, list[Any]]:
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                users.setdefault(name, []).append(node)
    return users


def _graph_inputs(graph: Any) -> list[Any]:
    initializers = {init.name for init in graph.initializer}
    return [value for value in graph.input if value.name not in initializers]


def prepare_onnx(model: Any) -> list[str]:
    """Make the graph acceptable to TensorRT, in place; returns what changed (for the build record).

    One rewrite: a uint8 graph input feeding only a Transpose that feeds only a Cast becomes input -> Cast ->
    Transpose. Both orders give identical values (the cast of uint8 to float is exact), and TensorRT takes a
    uint8 input only into a Cast. Running it again changes nothing.
    """
    import onnx

    graph = model.graph
    outputs = {value.name for value in graph.output}
    changes: list[str] = []
    for value in _graph_inputs(graph):
        if value.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            continue
        users = _consumers(graph)
        first = users.get(value.name, [])
        if len(first) != 1 or first[0].op_type != "Transpose" or first[0].output[0] in outputs:
            continue
        second = users.get(first[0].output[0], [])
        if len(second) != 1 or second[0].op_type != "Cast":
            continue
        nodes = [_copy_node(node) for node in graph.node]
        i_transpose = list(graph.node).index(first[0])
        i_cast = list(graph.node).index(second[0])
        transpose, cast = nodes[i_transpose], nodes[i_cast]
        old_mid = transpose.output[0]
        taken = {name for node in graph.node for name in (*node.input, *node.output)}
        new_mid = f"{value.name}_as_{onnx.TensorProto.DataType.Name(_cast_to(cast))}".lower()
        while new_mid in taken:
            new_mid += "_"
        cast_out = cast.output[0]
        cast.input[0], cast.output[0] = value.name, new_mid
        transpose.input[0], transpose.output[0] = new_mid, cast_out
        nodes.insert(i_transpose, nodes.pop(i_cast))  # the Cast now runs first
        graph.ClearField("node")
        graph.node.extend(nodes)
        stale = [info for info in graph.value_info if info.name == old_mid]
        for info in stale:
            graph.value_info.remove(info)
        changes.append(
            f"moved Cast '{cast.name or cast_out}' before Transpose '{transpose.name or old_mid}' on uint8 input "
            f"'{value.name}' (TensorRT takes a uint8 input only into a Cast)"
        )
    return changes


def _copy_node(node: Any) -> Any:
    copy = type(node)()
    copy.CopyFrom(node)
    return copy


def _cast_to(node: Any) -> int:
    return next((attr.i for attr in node.attribute if attr.name == "to"), 0)


def _constant_value(graph: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def tensorrt_graph_problems(model: Any) -> list[str]:
    """What TensorRT will refuse in this graph, found before TensorRT is called (empty: none known)."""
    import onnx

    graph = model.graph
    problems: list[str] = []
    users = _consumers(graph)
    for value in _graph_inputs(graph):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if not tensor.HasField("shape") or any(d is None or d < 1 for d in dims):
            shown = [d.dim_param or "?" if not d.HasField("dim_value") else d.dim_value for d in tensor.shape.dim]
            problems.append(f"input '{value.name}' has a dynamic shape {shown}; export with fixed shapes")
        if tensor.elem_type == onnx.TensorProto.UINT8:
            uses = users.get(value.name, [])
            bad = sorted({f"{node.op_type} '{node.name}'" for node in uses if node.op_type != "Cast"})
            if bad:
                problems.append(
                    f"uint8 input '{value.name}' feeds {', '.join(bad)}; TensorRT takes a uint8 input only into a "
                    f"Cast (export with the Cast first)"
                )
    for node in graph.node:
        if node.op_type != "TopK":
            continue
        label = f"TopK '{node.name or node.output[0]}'"
        k = _constant_value(graph, node.input[1]) if len(node.input) > 1 else None
        if k is None:
            problems.append(f"{label} has a K computed at run time; TensorRT needs a constant K (<= {MAX_TOPK})")
        elif int(np.asarray(k).reshape(-1)[0]) > MAX_TOPK:
            problems.append(f"{label} has K={int(np.asarray(k).reshape(-1)[0])}; TensorRT allows at most {MAX_TOPK}")
        if any(attr.name == "sorted" and attr.i == 0 for attr in node.attribute):
            problems.append(f"{label} is unsorted; TensorRT supports sorted TopK only")
    return problems


def _onnx_meta(model: Any) -> ModelMeta | None:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return ModelMeta.from_dict(json.loads(prop.value))
            except (ValueError, KeyError, TypeError):
                return None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Layers kept in fp32 (works on TensorRT layers and on ONNX nodes alike)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    """One layer (or ONNX node): its kind, input tensor names and output tensor names."""

    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def fp32_tail(
    layers: Sequence[LayerInfo],
    seed_kinds: Iterable[str] = ("TOPK",),
    stop_kinds: Iterable[str] = ("CONVOLUTION",),
) -> set[int]:
    """Indices of the layers to keep in fp32: every TopK, everything downstream of it, and everything upstream of
    it back to (not including) the convolutions that produce its input. For MaskConver this is the heatmap sigmoid
    and peak NMS, TopK, the mask-embedding MLP, the mask logits, the resize and the panoptic merge; backbone,
    decoder and heads stay in reduced precision.
    """
    seeds = set(seed_kinds)
    stops = set(stop_kinds)
    producer = {name: i for i, layer in enumerate(layers) for name in layer.outputs}
    users: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        for name in layer.inputs:
            users.setdefault(name, []).append(i)
    start = [i for i, layer in enumerate(layers) if layer.kind in seeds]
    keep = set(start)
    stack = list(start)  # downstream
    while stack:
        for name in layers[stack.pop()].outputs:
            for j in users.get(name, []):
                if j not in keep:
                    keep.add(j)
                    stack.append(j)
    upstream: set[int] = set()
    stack = list(start)
    while stack:
        for name in layers[stack.pop()].inputs:
            j = producer.get(name)
            if j is None or j in keep or j in upstream or layers[j].kind in stops:
                continue
            upstream.add(j)
            stack.append(j)
    return keep | upstream


def _network_layers(network: Any) -> list[LayerInfo]:
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = tuple(t.name for t in (layer.get_input(j) for j in range(layer.num_inputs)) if t is not None)
        outputs = tuple(layer.get_output(j).name for j in range(layer.num_outputs))
        layers.append(LayerInfo(layer.type.name, inputs, outputs))
    return layers


def _pin_fp32(trt: Any, network: Any, indices: set[int]) -> int:
    """Ask for fp32 on the chosen layers whose outputs are all floating point; returns how many were pinned."""
    floating = {trt.DataType.FLOAT, trt.DataType.HALF}
    pinned = 0
    for i in sorted(indices):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(t.dtype not in floating for t in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


# ---------------------------------------------------------------------------------------------------------------
# Calibration: batches and cache (numpy only)
# ---------------------------------------------------------------------------------------------------------------
def numpy_dtype(trt_type_name: str) -> np.dtype:
    """numpy dtype of a TensorRT DataType name ('FLOAT', 'UINT8', ...)."""
    try:
        return np.dtype(_NUMPY_DTYPES[trt_type_name])
    except KeyError:
        raise UserError(f"TensorRT tensor type {trt_type_name} has no numpy equivalent here") from None


def calibration_batches(
    images: Iterable[np.ndarray], input_shape: Sequence[int], dtype: Any, source: str | Path = "calibration set"
) -> Iterator[np.ndarray]:
    """Group uint8 HxWx3 images into batches shaped like the engine input [B, H, W, 3], in the engine's dtype.

    Order is kept; an incomplete last batch is dropped (TensorRT needs full batches). A uint8 input gets the
    pixels as they are; a float input gets the same values 0..255 as floats (normalisation is in the graph).
    An image of another size or type is a UserError naming `source`; so is a set without a full batch.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
        raise UserError(f"the engine input has shape {list(shape)}; calibration needs a fixed [B, H, W, 3] input")
    batch, height, width = shape[:3]
    dtype = np.dtype(dtype)
    pending: list[np.ndarray] = []
    produced = 0
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (height, width, 3):
            got = f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}"
            raise UserError(
                f"calibration image {index} is {got}; the graph takes uint8 ({height}, {width}, 3): make the "
                f"calibration set at this model's input size",
                source,
            )
        pending.append(image)
        if len(pending) == batch:
            yield np.ascontiguousarray(np.stack(pending).astype(dtype, copy=False))
            produced += 1
            pending = []
    if produced == 0:
        raise UserError(f"has no full calibration batch of {batch} image(s)", source)


class CalibrationCache:
    """TensorRT's int8 calibration cache in a file, reused only when its key matches.

    The key says what the scales were computed from (source ONNX sha256, calibration manifest hash, TensorRT
    version). It is stored beside the cache as `<cache>.json`; a missing, unreadable or different key means the
    cache is stale and TensorRT calibrates again.
    """

    def __init__(self, path: str | Path, key: dict[str, Any]) -> None:
        self.path = Path(path)
        self.key = dict(key)
        self.reused = False

    @property
    def key_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def read(self) -> bytes | None:
        if not self.path.is_file() or not self.key_path.is_file():
            return None
        try:
            stored = json.loads(self.key_path.read_text())
        except (OSError, ValueError):
            return None
        if stored != self.key:
            return None
        data = self.path.read_bytes()
        self.reused = bool(data)
        return data or None

    def write(self, data: bytes) -> None:
        write_bytes(self.path, bytes(data), force=True)
        write_json(self.key_path, self.key, force=True)


# ---------------------------------------------------------------------------------------------------------------
# Build record and engine compatibility (pure)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to: the TensorRT version and the GPU (compute capability decides)."""

    gpu_name: str
    compute_capability: str  # "8.6"
    tensorrt_version: str
    cuda_runtime: str = ""
    cuda_driver: str = ""


def build_record(
    *,
    name: str,
    precision: Precision,
    engine: Path,
    engine_sha256: str,
    onnx_path: Path,
    onnx_sha256: str,
    device: DeviceInfo,
    graph: str,
    input_shape: Sequence[int],
    input_dtype: str,
    workspace_bytes: int | None,
    fp32_layers: int,
    rewrites: Sequence[str],
    calibration: dict[str, Any] | None,
    timing_cache: str,
    build_seconds: float,
    tool_versions: dict[str, str],
) -> dict[str, Any]:
    """The `<engine>.json` beside an engine: everything the engine depends on and how it was made."""
    return {
        "format": RECORD_FORMAT,
        "backend": name,
        "family": FAMILY,
        "precision": precision.value,
        "artifact": engine.name,
        "artifact_sha256": engine_sha256,
        "graph": graph,
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": onnx_sha256,
        "input": {"name": INPUT_NAME, "shape": [int(d) for d in input_shape], "dtype": input_dtype},
        "tensorrt_version": device.tensorrt_version,
        "gpu": {"name": device.gpu_name, "compute_capability": device.compute_capability},
        "cuda": {"runtime": device.cuda_runtime, "driver": device.cuda_driver},
        "builder": {
            "workspace_bytes": workspace_bytes,
            "tf32": False,
            "fp32_layers": int(fp32_layers),
            "precision_constraints": "prefer" if precision is not Precision.FP32 else "none",
            "graph_rewrites": list(rewrites),
            "timing_cache": timing_cache,
        },
        "calibration": calibration,
        "calibration_manifest_hash": (calibration or {}).get("manifest_hash"),
        "tool_versions": dict(tool_versions),
        "build_seconds": round(float(build_seconds), 3),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def check_engine_compatible(engine: str | Path, record: dict[str, Any], current: DeviceInfo) -> list[str]:
    """Refuse (UserError) an engine whose build record names another TensorRT version or GPU compute capability.

    TensorRT engines are tied to the exact TensorRT version and to the GPU's compute capability. Another GPU model
    of the same compute capability loads but may run slower: that is returned as a warning.
    """
    engine = Path(engine)
    built_trt = str(record.get("tensorrt_version") or "")
    gpu = record.get("gpu") or {}
    built_cc = str(gpu.get("compute_capability") or "")
    built_name = str(gpu.get("name") or "")
    rebuild = f"rebuild it here with `maskconver compile --backend {record.get('backend', FAMILY)} --force`"
    if not built_trt or not built_cc:
        raise UserError(
            f"its build record {record_path(engine).name} does not say which TensorRT and GPU it was built for; "
            f"{rebuild}",
            engine,
        )
    if built_trt != current.tensorrt_version or built_cc != current.compute_capability:
        raise UserError(
            f"built with TensorRT {built_trt} for {built_name or 'a GPU'} (compute {built_cc}); this machine has "
            f"TensorRT {current.tensorrt_version} and {current.gpu_name} (compute {current.compute_capability}): "
            f"an engine runs only where it was built; {rebuild}",
            engine,
        )
    if built_name and built_name != current.gpu_name:
        return [
            f"{engine}: built on {built_name}, running on {current.gpu_name} (same compute {built_cc}); "
            f"timings may differ"
        ]
    return []


# ---------------------------------------------------------------------------------------------------------------
# TensorRT and CUDA plumbing (needs the GPU machine)
# ---------------------------------------------------------------------------------------------------------------
def _cuda_error_name(cudart: Any, err: Any) -> str:
    try:
        return cudart.cudaGetErrorName(err)[1].decode()
    except Exception:
        return str(err)


def _cuda(cudart: Any, result: Any, what: str) -> Any:
    """Unwrap a cuda-python call `(err, *values)`; an error raises RuntimeError naming the call."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA {what} failed: {_cuda_error_name(cudart, err)}")
    return values[0] if len(values) == 1 else (values or None)


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{(number % 1000) // 10}"


def current_device(trt: Any, cudart: Any, index: int = 0) -> DeviceInfo:
    """The GPU and TensorRT of this machine."""
    props = _cuda(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    runtime = _cuda(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    driver = _cuda(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    return DeviceInfo(
        gpu_name=name.split("\x00", 1)[0].strip(),
        compute_capability=f"{props.major}.{props.minor}",
        tensorrt_version=str(trt.__version__),
        cuda_runtime=_cuda_version(int(runtime)),
        cuda_driver=_cuda_version(int(driver)),
    )


_LOGGER: Any = None


def _logger(trt: Any) -> Any:
    """One logger per process (TensorRT expects one): warnings go to stderr, errors are kept for our messages."""
    global _LOGGER
    if _LOGGER is None:

        class _CollectingLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)
                    print(f"[TensorRT] error: {msg}", file=sys.stderr)
                elif severity == trt.ILogger.Severity.WARNING:
                    print(f"[TensorRT] warning: {msg}", file=sys.stderr)

        _LOGGER = _CollectingLogger()
        # The standard plugins, registered once with the logger: the ONNX parser builds ScatterElements with a
        # reduction (the owner histogram of the `input` merge path) from the "ScatterElements" plugin, and an
        # engine holding that layer needs the plugin again when it is deserialised.
        trt.init_libnvinfer_plugins(_LOGGER, "")
    return _LOGGER


def _last_error(logger: Any, fallback: str) -> str:
    return logger.errors[-1] if logger.errors else fallback


def _parser_errors(parser: Any) -> str:
    parts = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = []
        for attr in ("node_operator", "node_name"):
            value = getattr(error, attr, None)
            value = value() if callable(value) else value
            if value:
                where.append(str(value))
        prefix = f"node {error.node()} ({' '.join(where)}): " if where else ""
        parts.append(prefix + str(error.desc()))
    return "; ".join(parts) or "unknown parser error"


def _make_calibrator(trt: Any, cudart: Any, batches: Iterator[np.ndarray], nbytes: int, batch_size: int,
                     input_name: str, cache: CalibrationCache) -> Any:
    """An IInt8EntropyCalibrator2 that copies our host batches into one device buffer, with our cache."""

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device = _cuda(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc")
            self.count = 0
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                host = next(batches, None)
                if host is None:
                    return None
                if host.nbytes != nbytes:
                    raise UserError(f"calibration batch of {host.nbytes} bytes; the engine input takes {nbytes}")
                kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                _cuda(cudart, cudart.cudaMemcpy(self.device, host.ctypes.data, nbytes, kind), "cudaMemcpy")
                if list(names) != [input_name]:
                    raise UserError(f"calibration asked for inputs {list(names)}; the graph has one, '{input_name}'")
                self.count += host.shape[0]
                return [int(self.device)]
            except BaseException as exc:  # raised again after the build; TensorRT only sees "no more data"
                self.error = exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            return cache.read()

        def write_calibration_cache(self, data: Any) -> None:
            cache.write(bytes(data))

        def free(self) -> None:
            if self.device:
                cudart.cudaFree(self.device)
                self.device = 0

    return _EntropyCalibrator()


def _load_calibration(calib: Any) -> Any:
    """A CalibrationSet (anything with `.images()` and `.manifest_hash`) or a calibration folder."""
    if hasattr(calib, "images") and hasattr(calib, "manifest_hash"):
        return calib
    from maskconver_deploy.calibration import load_calibration

    return load_calibration(Path(calib))


def _tool_versions(trt: Any) -> dict[str, str]:
    from importlib import metadata

    versions = {"tensorrt": str(trt.__version__)}
    for package in ("cuda-python", "onnx", "maskconver-deploy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _workspace_bytes(workspace_gb: float | None) -> int | None:
    if workspace_gb is None:
        return None
    if not workspace_gb > 0:
        raise UserError(f"--workspace-gb must be greater than 0, got {workspace_gb}")
    return int(float(workspace_gb) * (1 << 30))


def compile_onnx(
    onnx_path: str | Path,
    out_path: str | Path,
    name: Any,
    calib: Any = None,
    force: bool = False,
    workspace_gb: float | None = None,
) -> Path:
    """Build a TensorRT engine from an ONNX graph and write it atomically, with its build record `<engine>.json`.

    `name` picks the precision (tensorrt, tensorrt-fp16, tensorrt-int8). int8 needs `calib` (a calibration folder
    or a loaded CalibrationSet); other precisions ignore it. `workspace_gb` caps the builder's scratch memory
    (default: TensorRT's, the whole GPU). The timing cache beside the engine is read and updated by every build.
    """
    import onnx

    name = str(name)
    precision = _precision_of(name)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise UserError("no such ONNX file", onnx_path)
    refuse_overwrite(out_path, force)
    workspace = _workspace_bytes(workspace_gb)
    if precision is Precision.INT8 and calib is None:
        raise UserError(f"{name} needs a calibration set: pass --calib calibration/NAME (see `maskconver calib`)")
    _require(FAMILY)

    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:
        raise UserError(f"not a readable ONNX model ({_first_line(exc)})", onnx_path) from None
    rewrites = prepare_onnx(model)
    problems = tensorrt_graph_problems(model)
    if problems:
        raise UserError(f"TensorRT cannot build this graph: {'; '.join(problems)}", onnx_path)
    meta = _onnx_meta(model)

    trt = _import_tensorrt()
    cudart = _import_cudart()
    problem = precision_problem(trt.__version__, precision)
    if problem:
        raise UserError(problem)
    device = current_device(trt, cudart)
    onnx_sha = sha256_file(onnx_path)
    calibration_set = _load_calibration(calib) if precision is Precision.INT8 else None

    logger = _logger(trt)
    logger.errors.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        raise UserError(f"TensorRT's ONNX parser rejected the graph: {_parser_errors(parser)}", onnx_path)
    if network.num_inputs != 1 or network.get_input(0).name != INPUT_NAME:
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        raise UserError(f"expected one input named '{INPUT_NAME}', the graph has {names}", onnx_path)
    net_input = network.get_input(0)
    input_shape = tuple(int(d) for d in net_input.shape)
    input_dtype = numpy_dtype(net_input.dtype.name)

    config = builder.create_builder_config()
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.clear_flag(trt.BuilderFlag.TF32)
    pinned = 0
    if precision is not Precision.FP32:
        config.set_flag(trt.BuilderFlag.FP16 if precision is Precision.FP16 else trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32(trt, network, fp32_tail(_network_layers(network)))

    timing_path = timing_cache_path(out_path)
    previous = timing_path.read_bytes() if timing_path.is_file() else b""
    timing = config.create_timing_cache(previous)
    if not config.set_timing_cache(timing, False):  # from another GPU or TensorRT: start a fresh one
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, False)

    calibrator = None
    calibration: dict[str, Any] | None = None
    if calibration_set is not None:
        cache = CalibrationCache(
            calibration_cache_path(out_path),
            {"source_onnx_sha256": onnx_sha, "calibration_manifest_hash": str(calibration_set.manifest_hash),
             "tensorrt_version": device.tensorrt_version, "input_shape": list(input_shape)},
        )
        source = calib if isinstance(calib, (str, Path)) else "calibration set"
        from maskconver_deploy.calibration import CalibrationSet

        # a calibration folder is letterboxed to the engine's input size; other image sources must already have it
        size = (int(input_shape[1]), int(input_shape[2]))
        if isinstance(calibration_set, CalibrationSet):
            images = calibration_set.images(size)
        else:
            images = calibration_set.images()
        batches = calibration_batches(images, input_shape, input_dtype, source)
        nbytes = int(np.prod(input_shape)) * input_dtype.itemsize
        calibrator = _make_calibrator(trt, cudart, batches, nbytes, input_shape[0], net_input.name, cache)
        config.int8_calibrator = calibrator

    start = time.perf_counter()
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    seconds = time.perf_counter() - start
    if calibrator is not None and calibrator.error is not None:
        raise calibrator.error
    if plan is None:
        reason = _last_error(logger, "see the TensorRT log above")
        raise UserError(f"TensorRT could not build the {precision.value} engine: {reason}", onnx_path)
    engine_bytes = bytes(plan)
    write_bytes(timing_path, bytes(config.get_timing_cache().serialize()), force=True)
    if calibrator is not None:
        calibration = {
            "manifest_hash": str(calibration_set.manifest_hash),
            "images": calibrator.count,
            "cache": calibration_cache_path(out_path).name,
            "cache_reused": cache.reused,
            "algorithm": "entropy2",
        }

    with atomic_path(out_path, force=force) as tmp:
        tmp.write_bytes(engine_bytes)
    record = build_record(
        name=name, precision=precision, engine=out_path, engine_sha256=sha256_bytes(engine_bytes),
        onnx_path=onnx_path, onnx_sha256=onnx_sha, device=device,
        graph=meta.output if meta else ("raw" if out_path.name.endswith(f".raw{ENGINE_EXT}") else "panoptic"),
        input_shape=input_shape, input_dtype=input_dtype.name,
        workspace_bytes=workspace, fp32_layers=pinned, rewrites=rewrites, calibration=calibration,
        timing_cache=timing_path.name, build_seconds=seconds, tool_versions=_tool_versions(trt),
    )
    write_json(record_path(out_path), record, force=True)
    return out_path


# ---------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Tensor:
    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype
    device: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class TrtRunner(Runner):
    """Runs a TensorRT engine on GPU 0: one device buffer per I/O tensor (by name), copies and execution on one
    CUDA stream. `last_latency_s` covers host->device copy, execution, device->host copy and the synchronise.
    `threads` does not apply (the work is on the GPU).
    """

    def __init__(self, name: str, artifact: Path, meta: ModelMeta, threads: int | None = None) -> None:
        super().__init__(name, artifact, meta, threads)
        self.warnings: list[str] = []
        self._trt: Any = None
        self._cudart: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._tensors: list[_Tensor] = []

    def _open(self) -> None:
        record_file = record_path(self.artifact)
        if not record_file.is_file():
            raise UserError(
                f"no build record {record_file.name} beside the engine; rebuild it with `maskconver compile --force`",
                self.artifact,
            )
        record = read_json(record_file)
        self._trt, self._cudart = trt, cudart = _import_tensorrt(), _import_cudart()
        self.warnings = check_engine_compatible(self.artifact, record, current_device(trt, cudart))
        for message in self.warnings:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        try:
            self._load()
        except BaseException:
            self._close()
            raise

    def _load(self) -> None:
        trt, cudart = self._trt, self._cudart
        logger = _logger(trt)
        logger.errors.clear()
        self._runtime = trt.Runtime(logger)  # kept until the engine is released
        self._engine = self._runtime.deserialize_cuda_engine(self.artifact.read_bytes())
        if self._engine is None:
            reason = _last_error(logger, "see the TensorRT log above")
            raise UserError(f"TensorRT could not load the engine: {reason}", self.artifact)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            reason = _last_error(logger, "out of GPU memory?")
            raise UserError(f"TensorRT could not create an execution context: {reason}", self.artifact)
        self._tensors = self._describe_io()
        self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        for tensor in self._tensors:
            tensor.device = int(_cuda(cudart, cudart.cudaMalloc(max(tensor.nbytes, 1)), "cudaMalloc"))
            if not self._context.set_tensor_address(tensor.name, tensor.device):
                raise UserError(f"TensorRT refused the device buffer of tensor '{tensor.name}'", self.artifact)

    def _describe_io(self) -> list[_Tensor]:
        """Every I/O tensor by name, checked against the model: one input 'image' [1, H, W, 3], all outputs."""
        trt, engine = self._trt, self._engine
        tensors = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"tensor '{name}' has a dynamic shape {list(shape)}; build from a fixed-shape graph",
                                self.artifact)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            tensors.append(_Tensor(name, is_input, shape, numpy_dtype(engine.get_tensor_dtype(name).name)))
        inputs = {t.name: t for t in tensors if t.is_input}
        h, w = self.meta.input_size
        if list(inputs) != [INPUT_NAME] or inputs[INPUT_NAME].shape != (1, h, w, 3):
            got = {t.name: list(t.shape) for t in inputs.values()}
            raise UserError(f"engine inputs {got} do not match the model input '{INPUT_NAME}' [1, {h}, {w}, 3]",
                            self.artifact)
        outputs = {t.name for t in tensors if not t.is_input}
        missing = [name for name in self.meta.output_names if name not in outputs]
        if missing:
            raise UserError(f"engine lacks the outputs {missing} (it has {sorted(outputs)})", self.artifact)
        return tensors

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        cudart = self._cudart
        _cuda(cudart, cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self._stream), "cudaMemcpyAsync")

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        hosts: dict[str, np.ndarray] = {}
        for tensor in self._tensors:
            if tensor.is_input:
                host = np.ascontiguousarray(feeds[tensor.name], dtype=tensor.dtype)  # the engine's input type
                if host.shape != tensor.shape:
                    raise UserError(f"{self.name}: input '{tensor.name}' is {host.shape}, engine takes {tensor.shape}")
                self._copy(tensor.device, host.ctypes.data, tensor.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
            else:
                host = np.empty(tensor.shape, dtype=tensor.dtype)  # fresh, so results never alias the next call's
            hosts[tensor.name] = host
        if not self._context.execute_async_v3(int(self._stream)):
            reason = _last_error(_logger(self._trt), "see the TensorRT log above")
            raise RuntimeError(f"{self.artifact}: TensorRT execution failed: {reason}")
        for tensor in self._tensors:
            if not tensor.is_input:
                to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
                self._copy(hosts[tensor.name].ctypes.data, tensor.device, tensor.nbytes, to_host)
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {t.name: hosts[t.name] for t in self._tensors if not t.is_input}

    def _close(self) -> None:
        cudart = self._cudart
        if cudart is not None and self._stream is not None:
            cudart.cudaStreamSynchronize(self._stream)
        self._context = None  # the context goes before its engine, the engine before its runtime
        self._engine = None
        self._runtime = None
        if cudart is not None:
            for tensor in self._tensors:
                if tensor.device:
                    cudart.cudaFree(tensor.device)
                    tensor.device = 0
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
        self._stream = None
        self._tensors = []


def open_runner(artifact: str | Path, meta: ModelMeta, name: Any, threads: int | None = None) -> TrtRunner:
    """A TrtRunner for an engine (opened on first use). Unavailable TensorRT/GPU is BackendUnavailable (exit 2)."""
    artifact, name = Path(artifact), str(name)
    _precision_of(name)
    if not artifact.is_file():
        raise UserError(f"no such engine; build it with `maskconver compile --backend {name}`", artifact)
    _require(FAMILY)
    return TrtRunner(name, artifact, meta, threads)

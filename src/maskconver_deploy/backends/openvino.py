"""OpenVINO on the CPU: `openvino` (fp32), `openvino-bf16`, `openvino-int8` (NNCF post-training quantisation).

Artifacts in a model folder (`.raw` / `.semantic` before the extension for the other graphs), each OpenVINO IR
(`.xml` graph + `.bin` weights) with a build record `<artifact>.json` (source ONNX sha256, OpenVINO / NNCF
versions, precision, calibration hash, input spec, the CPU it was built on, a check against the source graph):
    openvino        openvino.xml       `openvino.convert_model` of the exported ONNX, weights kept float32
                                       (`save_model(compress_to_fp16=False)`); run with INFERENCE_PRECISION_HINT f32
    openvino-bf16   openvino-bf16.xml + openvino-bf16.post.xml
                                       the graph split in two: the network (run with the bf16 hint: AMX or
                                       AVX512-BF16 matrix work) and the post-processing (run with the f32 hint)
    openvino-int8   openvino-int8.xml  `nncf.quantize` over a calibration set, run with the f32 hint

Choices, and why:
- The f32 hint is always set explicitly: on CPUs with bf16 support OpenVINO's *default* inference precision is
  bf16, which would quietly turn the fp32 artifact into a bf16 one.
- bf16 keeps the post-processing in float32 by splitting the graph, not by runtime info on nodes. Marking the
  post-processing nodes with `disable_fp16_compression` / `precise` runtime info (and `enforceBF16evenForGraphTail`)
  changed nothing in OpenVINO 2026.4's CPU plugin: its runtime model still ran the mask resize (Interpolate),
  the mask MatMul, the class-embedding MLP (FullyConnected), MVN and a Reduce in bf16. A split graph makes the
  precision of each part a matter of construction. The float part is the same set every int8 path keeps in float
  (`ort.float_nodes`: every node that is no ancestor of a convolution, plus the heads' last convolutions).
- int8: NNCF's default (performance) preset, all calibration images, an ignored scope of that same float set,
  so sigmoid, peak NMS, top-N, embeddings, mask logits and the merge stay float, and quantised scores cannot
  reorder the top-N.
- Measured cost of that choice on an AMD EPYC with AVX512-BF16 (no AMX), shipped model, 256x256, 1 thread, a
  loaded machine (noisy): the split bf16 network takes ~20 ms, but its float32 post-processing ~80-100 ms, since
  OpenVINO's f32 mask resize ends in a reference (non-JIT) Reorder from channel-last to planar: 96 of 161 ms of
  the fp32 graph (in bf16 a JIT reorder, 7.6 ms). The whole graph under the bf16 hint ran 37 ms and agreed with
  ONNX Runtime on as many pixels (99.05% vs 99.06% mean, 96.4% worst, 12 synthetic scenes). Rewriting that
  resize per channel or channel-last moved the cost into the Interpolate instead.
- Runner: CPU device, PERFORMANCE_HINT LATENCY, `threads` -> INFERENCE_NUM_THREADS; outputs are copied out of the
  request's tensors (the next call reuses them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from maskconver_deploy.backends.base import Availability, Runner
from maskconver_deploy.errors import BackendUnavailable, CheckFailed, UserError
from maskconver_deploy.fileio import atomic_path, refuse_overwrite, sha256_file
from maskconver_deploy.modeldir import GRAPH_FILES, graph_suffix, read_onnx, record_path
from maskconver_deploy.types import INPUT_NAME, LABEL_DIVISOR, ModelMeta, Precision

FAMILY = "openvino"
FAMILIES = (FAMILY,)
PRECISIONS: dict[str, tuple[Precision, ...]] = {FAMILY: (Precision.FP32, Precision.BF16, Precision.INT8)}
HINT = 'pip install "openvino==2026.4.1" "nncf==3.4.0" (pinned in pyproject.toml: pip install -e ".[openvino]")'
RECORD_FORMAT = "maskconver-openvino/1"
POST_SUFFIX = ".post"  # openvino-bf16.xml -> openvino-bf16.post.xml (the float32 post-processing)
DEVICE = "CPU"
# INFERENCE_PRECISION_HINT per artifact precision (per part for the split bf16 artifact)
HINTS: dict[Precision, str] = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.INT8: "f32"}
POST_HINT = "f32"
FP32_AGREEMENT_FLOOR = 0.999  # openvino fp32 vs the source graph in ONNX Runtime, panoptic pixels
CPU_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "vnni")


# ---------------------------------------------------------------------------------------------------------------
# Names, paths, availability
# ---------------------------------------------------------------------------------------------------------------
def _parse(name: Any) -> Any:
    """A BackendName of this module (UserError for other families or precisions it does not offer)."""
    from maskconver_deploy.backends import BackendName, parse_backend

    parsed = name if isinstance(name, BackendName) else parse_backend(str(name))
    if parsed.family not in FAMILIES or parsed.precision not in PRECISIONS[parsed.family]:
        allowed = ", ".join(str(BackendName(FAMILY, p)) for p in PRECISIONS[FAMILY])
        raise UserError(f"'{name}' is not an OpenVINO backend; use one of {allowed}")
    return parsed


def artifact_path(model_dir: str | Path, name: Any, graph: str = "panoptic") -> Path:
    """The IR graph file (`.xml`, weights beside it in `.bin`) of backend `name` for `graph` in a model folder."""
    parsed = _parse(name)
    return Path(model_dir) / f"{parsed}{graph_suffix(graph)}.xml"


def weights_path(xml: str | Path) -> Path:
    """openvino.xml -> openvino.bin (where OpenVINO looks for an IR's weights)."""
    return Path(xml).with_suffix(".bin")


def post_path(xml: str | Path) -> Path:
    """openvino-bf16.xml -> openvino-bf16.post.xml: the float32 post-processing part of a split bf16 artifact."""
    xml = Path(xml)
    return xml.with_name(xml.stem + POST_SUFFIX + ".xml")


def availability(family: str = FAMILY) -> Availability:
    """The openvino package (nncf is checked when an int8 artifact is built). Never raises; imports nothing."""
    if family not in FAMILIES:
        return Availability(False, f"'{family}' is not served by the OpenVINO backend")
    try:
        spec = importlib.util.find_spec("openvino")
    except (ImportError, ValueError) as exc:
        return Availability(False, f"openvino cannot be found ({exc})", HINT)
    if spec is None:
        return Availability(False, "openvino is not installed", HINT)
    return Availability(True)


def _require(family: str = FAMILY) -> None:
    status = availability(family)
    if not status.ok:
        raise BackendUnavailable(family, status.reason, status.hint)


def _first_line(exc: BaseException | str) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _versions() -> dict[str, str]:
    out = {}
    for package in ("openvino", "nncf", "onnx", "onnxruntime", "numpy", "maskconver-deploy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def cpu_info() -> dict[str, Any]:
    """The CPU an artifact is built on: model, the SIMD/matrix flags that decide OpenVINO's kernels, and what
    OpenVINO's CPU plugin reports (its optimisation capabilities include BF16 only with AVX512-BF16 or AMX)."""
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = sorted({f for f in line.split(":", 1)[1].split() if f.startswith(CPU_FLAG_PREFIXES)})
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"model": model, "flags": flags}
    try:
        import openvino as ov

        core = ov.Core()
        info["openvino_device"] = str(core.get_property(DEVICE, "FULL_DEVICE_NAME"))
        info["openvino_capabilities"] = [str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]
    except Exception as exc:  # a record field, never a reason to fail a build
        info["openvino_error"] = _first_line(exc)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------
def split_graph(model: Any, keep_float: set[str]) -> tuple[Any, Any, list[str]]:
    """(network, post-processing, boundary tensors): `model` cut where nodes of `keep_float` read tensors made by
    the other nodes. The network takes the image and returns the boundary tensors (and any graph output it makes);
    the post-processing takes the boundary tensors (and the image, if it reads it) and returns the rest."""
    import onnx
    from onnx import utils as onnx_utils

    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    network_made = {out for node in graph.node if node.name not in keep_float for out in node.output}
    inputs = {i.name for i in graph.input}
    outputs = [o.name for o in graph.output]
    boundary: list[str] = []
    post_inputs: list[str] = []
    for node in graph.node:
        if node.name not in keep_float:
            continue
        for name in node.input:
            if name in network_made and name not in boundary:
                boundary.append(name)
            if name in inputs and name not in post_inputs:
                post_inputs.append(name)
    network_outputs = boundary + [o for o in outputs if o in network_made and o not in boundary]
    post_outputs = [o for o in outputs if o not in network_made]
    if not boundary or not post_outputs:
        raise UserError("the graph has no post-processing to split off (no float nodes read the network)")
    extractor = onnx_utils.Extractor(model)
    network = extractor.extract_model([INPUT_NAME], network_outputs)
    post = extractor.extract_model(post_inputs + boundary, post_outputs)
    return network, post, boundary


def _convert(onnx_path: Path, source: Path) -> Any:
    import openvino as ov

    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise UserError(f"OpenVINO cannot convert it ({type(exc).__name__}: {_first_line(exc)})", source) from None


def _save(model: Any, xml: Path) -> None:
    import openvino as ov

    ov.save_model(model, str(xml), compress_to_fp16=False)  # save_model's default would store fp16 weights


def quantize_int8(model: Any, keep_float: set[str], calibration_set: Any, size: tuple[int, int],
                  source: Path) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """NNCF post-training int8 of an OpenVINO model over `calibration_set`, nodes in `keep_float` ignored."""
    if importlib.util.find_spec("nncf") is None:
        raise BackendUnavailable("openvino-int8", "nncf is not installed", HINT)
    import logging

    import nncf

    from maskconver_deploy.backends.ort import _calibration_images

    images = [np.ascontiguousarray(image[None]) for image in _calibration_images(calibration_set, size)]
    if not images:
        raise UserError("the calibration set gave no images")
    present = {op.get_friendly_name() for op in model.get_ops()}
    ignored = sorted(name for name in keep_float if name in present)
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)  # NNCF logs its statistics collection at INFO/WARNING
    try:
        # ... and draws progress bars on stdout: noise on the user's terminal and in --json output
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantized = nncf.quantize(
                model, nncf.Dataset(images), subset_size=len(images),
                ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
            )  # fmt: skip
    except Exception as exc:
        raise UserError(f"NNCF cannot quantise it ({type(exc).__name__}: {_first_line(exc)})", source) from None
    finally:
        logger.setLevel(level)
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    return quantized, {"tool": "nncf.quantize", "preset": "performance (default)", "calibration_images": len(images),
                       "ignored_nodes": len(ignored), "float_nodes": len(keep_float),
                       "fake_quantize_nodes": fake_quantize}  # fmt: skip


def _compare(artifact: Path, precision: Precision, source: Path, meta: ModelMeta,
             images: list[np.ndarray]) -> dict[str, Any]:  # fmt: skip
    """The artifact (OpenVINO, 1 thread) against its source graph (ONNX Runtime) on `images`: share of equal
    integer outputs and of panoptic pixels of the same class (mean and min), max abs difference of floats."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    reference = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.get_outputs()]
    runner = OpenVinoRunner(f"openvino check {artifact.name}", artifact, meta, threads=1, precision=precision)
    runner.open()
    agree: dict[str, list[float]] = {}
    diffs: dict[str, list[float]] = {}
    try:
        for image in images:
            feeds = {INPUT_NAME: np.ascontiguousarray(image[None])}
            want = dict(zip(names, reference.run(names, feeds), strict=True))
            got = runner._run(feeds)
            if "panoptic" in want:
                same = (got["panoptic"] // LABEL_DIVISOR) == (want["panoptic"] // LABEL_DIVISOR)
                agree.setdefault("category", []).append(float(same.mean()))
            for name in names:
                if np.issubdtype(want[name].dtype, np.integer):
                    agree.setdefault(name, []).append(float((got[name] == want[name]).mean()))
                else:
                    delta = np.abs(got[name].astype(np.float64) - want[name])
                    diffs.setdefault(name, []).append(float(delta.max()))
    finally:
        runner.close()
    out: dict[str, Any] = {"images": len(images), "against": f"{source.name} in ONNX Runtime"}
    for name, values in agree.items():
        out[f"{name}_agreement"] = float(np.mean(values))
        out[f"{name}_agreement_min"] = min(values)
    out.update({f"{name}_max_abs_diff": max(values) for name, values in diffs.items()})
    return out


def _ir_files(xml: Path) -> list[Path]:
    return [xml, weights_path(xml)]


def compile_onnx(
    onnx_path: str | Path, out_path: str | Path, name: Any, calib: Any = None, force: bool = False
) -> Path:
    """Build the OpenVINO IR of backend `name` from an exported graph; write it atomically with `<artifact>.json`.

    int8 needs `calib` (a calibration folder or a loaded CalibrationSet). Existing files are replaced only with
    `force`; on failure nothing is left at the destination. Returns the `.xml` path.
    """
    from maskconver_deploy.backends.ort import _load_calibration, _name_nodes, check_images, float_nodes, input_size

    started = time.perf_counter()
    parsed = _parse(name)
    precision = parsed.precision
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    _require(parsed.family)
    if out_path.suffix != ".xml":
        raise UserError("an OpenVINO artifact is an .xml file (its weights go beside it in .bin)", out_path)
    destinations = _ir_files(out_path) + (_ir_files(post_path(out_path)) if precision is Precision.BF16 else [])
    for path in destinations:
        refuse_overwrite(path, force)
    if precision is Precision.INT8 and calib is None:
        raise UserError(f"{parsed} needs a calibration set: pass --calib calibration/NAME "
                        "(see `maskconver calib make`)")  # fmt: skip
    model, meta = read_onnx(onnx_path)
    assert meta is not None
    size = input_size(model, onnx_path)
    if tuple(meta.input_size) != size:
        raise UserError(f"the graph takes {size[0]}x{size[1]} but its metadata says "
                        f"{meta.input_size[0]}x{meta.input_size[1]}", onnx_path)  # fmt: skip
    calibration_set = _load_calibration(calib) if precision is Precision.INT8 else None
    import onnx

    _name_nodes(model)  # OpenVINO keeps ONNX node names as friendly names: the ignored scope refers to them
    keep = float_nodes(model)
    with tempfile.TemporaryDirectory(prefix="maskconver-openvino-") as scratch_name:
        scratch = Path(scratch_name)
        work = scratch / out_path.name
        named = scratch / "source.onnx"
        onnx.save(model, str(named))
        details: dict[str, Any] = {}
        if precision is Precision.BF16:
            network, post, boundary = split_graph(model, keep)
            onnx.save(network, str(scratch / "network.onnx"))
            onnx.save(post, str(scratch / "post.onnx"))
            _save(_convert(scratch / "network.onnx", onnx_path), work)
            _save(_convert(scratch / "post.onnx", onnx_path), post_path(work))
            details = {"split": {"network": work.name, "post_processing": post_path(out_path).name,
                                 "boundary": boundary, "float_nodes": len(keep),
                                 "hints": {"network": HINTS[precision], "post_processing": POST_HINT}}}  # fmt: skip
        else:
            converted = _convert(named, onnx_path)
            if precision is Precision.INT8:
                converted, details["quantization"] = quantize_int8(converted, keep, calibration_set, size, onnx_path)
            _save(converted, work)
        check = _compare(work, precision, onnx_path, meta, check_images(size, calibration_set))
        agreement = check.get("panoptic_agreement_min")
        if precision is Precision.FP32 and agreement is not None and agreement < FP32_AGREEMENT_FLOOR:
            raise CheckFailed(f"{out_path.name}: the {parsed} artifact agrees with {onnx_path.name} on only "
                              f"{100 * agreement:.2f}% of panoptic pixels "
                              f"(expected >= {100 * FP32_AGREEMENT_FLOOR:.1f}%)")  # fmt: skip
        record = {
            "format": RECORD_FORMAT,
            "backend": str(parsed),
            "family": parsed.family,
            "precision": precision.value,
            "artifact": out_path.name,
            "artifact_sha256": sha256_file(work),
            "weights": weights_path(out_path).name,
            "weights_sha256": sha256_file(weights_path(work)),
            "graph": meta.output,
            "source_onnx": onnx_path.name,
            "source_onnx_sha256": sha256_file(onnx_path),
            "input": {"name": INPUT_NAME, "shape": [1, size[0], size[1], 3], "dtype": "uint8", "layout": "NHWC"},
            "inference_precision_hint": HINTS[precision],
            **details,
            "check": check,
            "calibration": None if calibration_set is None else {
                "manifest_hash": str(calibration_set.manifest_hash),
                "path": str(getattr(calibration_set, "path", calib)),
                "images": details["quantization"]["calibration_images"]},  # fmt: skip
            "calibration_manifest_hash": None if calibration_set is None else str(calibration_set.manifest_hash),
            "cpu": cpu_info(),
            "tool_versions": _versions(),
            "seconds": round(time.perf_counter() - started, 2),
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        # weights first, graph files last: an .xml present means its .bin is complete
        scratch_files = _ir_files(work) + (_ir_files(post_path(work)) if precision is Precision.BF16 else [])
        order = sorted(zip(scratch_files, destinations, strict=True), key=lambda pair: pair[1].suffix == ".xml")
        for built, destination in order:
            with atomic_path(destination, force=force) as tmp:
                tmp.write_bytes(built.read_bytes())
        with atomic_path(record_path(out_path), force=True) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return out_path


# ---------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------
class OpenVinoRunner(Runner):
    """An OpenVINO IR on the CPU device (one compiled model; two for the split bf16 artifact)."""

    def __init__(self, name: str, artifact: Path, meta: ModelMeta, threads: int | None = None,
                 precision: Precision = Precision.FP32) -> None:  # fmt: skip
        super().__init__(name, artifact, meta, threads)
        self.precision = precision
        self._parts: list[tuple[Any, list[str]]] = []  # (infer request, input names) in order
        self._outputs: list[str] = []
        files = [artifact, weights_path(artifact)]
        if precision is Precision.BF16:
            files += [post_path(artifact), weights_path(post_path(artifact))]
        self.artifact_files: list[Path] = [Path(f) for f in files]  # what the artifact's size counts

    def _config(self, hint: str) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        return config

    def _compile(self, core: Any, xml: Path, hint: str) -> Any:
        if not xml.is_file() or not weights_path(xml).is_file():
            missing = xml if not xml.is_file() else weights_path(xml)
            raise UserError(f"no such file; build it with `maskconver compile --backend {self.name}`", missing)
        try:
            return core.compile_model(core.read_model(str(xml)), DEVICE, self._config(hint))
        except Exception as exc:
            raise UserError(f"OpenVINO cannot load it ({type(exc).__name__}: {_first_line(exc)})", xml) from None

    def _open(self) -> None:
        _require(FAMILY)
        import openvino as ov

        core = ov.Core()
        files = [(self.artifact, HINTS[self.precision])]
        if self.precision is Precision.BF16:
            files.append((post_path(self.artifact), POST_HINT))
        compiled = [self._compile(core, xml, hint) for xml, hint in files]
        first = compiled[0].inputs
        h, w = self.meta.input_size
        if [i.get_any_name() for i in first] != [INPUT_NAME] or first[0].get_element_type() != ov.Type.u8 \
                or list(first[0].get_partial_shape().to_shape()) != [1, h, w, 3]:  # fmt: skip
            got = [(i.get_any_name(), str(i.get_element_type()), str(i.get_partial_shape())) for i in first]
            raise UserError(f"the artifact takes {got}, the model meta says {INPUT_NAME} uint8 [1, {h}, {w}, 3]",
                            self.artifact)  # fmt: skip
        made = {name for model in compiled for out in model.outputs for name in out.get_names()}
        missing = [n for n in self.meta.output_names if n not in made]
        if missing:
            raise UserError(f"the artifact lacks outputs {missing} (it has {sorted(made)})", self.artifact)
        self._parts = [(model.create_infer_request(), [i.get_any_name() for i in model.inputs]) for model in compiled]
        self._outputs = list(self.meta.output_names)  # the graph's outputs, not the split's boundary tensors

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = dict(feeds)
        for request, inputs in self._parts:
            result = request.infer({name: values[name] for name in inputs})
            for port, value in result.items():
                value = np.array(value)  # copied: the request reuses its output tensors
                for name in port.get_names():  # a port may carry several tensor names
                    values[name] = value
        return {name: values[name] for name in self._outputs}

    def _close(self) -> None:
        self._parts = []


def open_runner(artifact: str | Path, meta: ModelMeta, name: Any = FAMILY, threads: int | None = None) -> OpenVinoRunner:
    """An OpenVinoRunner for an artifact (opened on first use). Missing artifact: UserError with the compile command."""
    parsed = _parse(name)
    artifact = Path(artifact)
    _require(parsed.family)
    if not artifact.is_file():
        raise UserError(f"no such artifact; build it with `maskconver compile --backend {parsed}`", artifact)
    return OpenVinoRunner(str(parsed), artifact, meta, threads=threads, precision=parsed.precision)

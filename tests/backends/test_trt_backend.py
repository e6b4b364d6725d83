"""TensorRT backend. Everything that does not need TensorRT runs on every machine: the graph pre-flight check and its
uint8 rewrite (checked against ONNX Runtime), calibration batches and cache, the layers kept in fp32, the build
record and the engine-compatibility check, availability and the errors of `compile_onnx`.
`TestOnGpu` builds fp32/fp16/int8 engines of a tiny exported model and compares them with ONNX Runtime; it needs
TensorRT 10, cuda-python and an NVIDIA GPU, and skips (with the reason) without them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from maskconver_deploy.backends import trt as trt_backend
from maskconver_deploy.backends.trt import (
    CalibrationCache,
    DeviceInfo,
    LayerInfo,
    build_record,
    calibration_batches,
    check_engine_compatible,
    fp32_tail,
    numpy_dtype,
    precision_problem,
    prepare_onnx,
    tensorrt_graph_problems,
    tensorrt_version_problem,
)
from maskconver_deploy.errors import BackendUnavailable, UserError
from maskconver_deploy.types import METADATA_KEY, PANOPTIC_OUTPUTS, Category, ModelMeta, Precision

SIZE = 64
NUM_CLASSES = 4
NUM_THINGS = 2
PROPOSALS = 8


# ---------------------------------------------------------------------------------------------------------------
# A tiny model, exported once (random weights: these tests check plumbing and numerics, not accuracy)
# ---------------------------------------------------------------------------------------------------------------
def _meta() -> ModelMeta:
    categories = [Category(i + 1, f"class{i}", i < NUM_THINGS) for i in range(NUM_CLASSES)]
    return ModelMeta(
        preset="tiny-test",
        categories=categories,
        input_size=(SIZE, SIZE),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        num_proposals=PROPOSALS,
    )


def _export_tiny(path: Path, merge: str | None = None) -> Path:
    """The tiny model exported with the given merge path (the spec's default when None)."""
    import torch

    from maskconver_deploy.model.maskconver import MaskConver
    from maskconver_deploy.model.postprocess import DeployModel
    from maskconver_deploy.model.specs import MaskConverSpec

    spec = MaskConverSpec(
        "tiny-test", num_classes=NUM_CLASSES, num_things=NUM_THINGS, input_size=(SIZE, SIZE), decoder_channels=16,
        head_channels=16, embedding_dim=16, num_proposals=PROPOSALS, aspp_rates=(1, 2, 3), small_area_threshold=0,
    )
    torch.manual_seed(0)
    model = DeployModel(MaskConver(spec), merge=merge)
    example = torch.zeros((1, SIZE, SIZE, 3), dtype=torch.uint8)
    torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=list(PANOPTIC_OUTPUTS),
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    helper.set_model_props(proto, {METADATA_KEY: _meta().to_json()})
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelMeta]:
    return _export_tiny(tmp_path_factory.mktemp("tiny") / "model.onnx"), _meta()


def _images(count: int, seed: int, size: int = SIZE) -> list[np.ndarray]:
    """Seeded uint8 RGB images with some structure (gradients and blocks), not only noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    out = []
    for _ in range(count):
        planes = [ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 90.0)]
        image = np.stack(planes, -1)
        y, x = rng.integers(0, size // 2, 2)
        image[y : y + size // 3, x : x + size // 3] = rng.integers(0, 256, 3)
        image += rng.normal(0, 8, image.shape)
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


def _ort_run(model: onnx.ModelProto | Path, image: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": image[None]}), strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Module contract, names and availability
# ---------------------------------------------------------------------------------------------------------------
def test_module_contract_and_file_names(tmp_path: Path) -> None:
    from maskconver_deploy.backends import backend_module, parse_backend

    assert backend_module("tensorrt") is trt_backend
    assert trt_backend.FAMILIES == ("tensorrt",)
    assert trt_backend.PRECISIONS == {"tensorrt": (Precision.FP32, Precision.FP16, Precision.INT8)}
    assert trt_backend.artifact_path(tmp_path, "tensorrt") == tmp_path / "tensorrt.engine"
    assert trt_backend.artifact_path(tmp_path, "tensorrt-fp16") == tmp_path / "tensorrt-fp16.engine"
    assert trt_backend.artifact_path(tmp_path, parse_backend("tensorrt-int8")) == tmp_path / "tensorrt-int8.engine"
    assert trt_backend.artifact_path(tmp_path, "tensorrt-fp16", graph="raw") == tmp_path / "tensorrt-fp16.raw.engine"
    engine = tmp_path / "tensorrt-int8.engine"
    assert trt_backend.calibration_cache_path(engine) == tmp_path / "tensorrt-int8.calib"
    raw = tmp_path / "tensorrt-int8.raw.engine"
    assert trt_backend.calibration_cache_path(raw) == tmp_path / "tensorrt-int8.raw.calib"
    assert trt_backend.timing_cache_path(engine) == tmp_path / "tensorrt.timing-cache"
    assert trt_backend.record_path(engine) == tmp_path / "tensorrt-int8.engine.json"


def test_availability_on_this_machine() -> None:
    status = trt_backend.availability("tensorrt")
    if importlib.util.find_spec("tensorrt") is None:
        assert not status.ok
        assert status.reason == "the TensorRT Python package (tensorrt) is not installed"
        assert status.hint == 'pip install ".[tensorrt]" on a machine with an NVIDIA GPU and CUDA'
    elif status.ok:
        assert status.reason == "" and status.hint == ""
    else:  # installed but unusable here: the reason says why, the hint says how
        assert status.reason and status.hint == trt_backend.HINT
    other = trt_backend.availability("ort")
    assert not other.ok and "not served" in other.reason


def test_version_problems() -> None:
    assert tensorrt_version_problem("10.3.0") is None
    assert tensorrt_version_problem("10.13.3.9") is None
    assert "too old" in tensorrt_version_problem("8.6.1")
    assert "cannot read" in tensorrt_version_problem("unknown")
    assert precision_problem("10.7.0", Precision.FP16) is None
    assert precision_problem("11.1.0", Precision.FP32) is None
    message = precision_problem("11.1.0", Precision.INT8)
    assert message and "TensorRT 11.1.0" in message and "tensorrt>=10,<11" in message


def test_numpy_dtypes() -> None:
    assert numpy_dtype("UINT8") == np.uint8
    assert numpy_dtype("FLOAT") == np.float32
    assert numpy_dtype("HALF") == np.float16
    assert numpy_dtype("INT32") == np.int32
    assert numpy_dtype("INT64") == np.int64
    with pytest.raises(UserError, match="FP8"):
        numpy_dtype("FP8")


# ---------------------------------------------------------------------------------------------------------------
# compile_onnx / open_runner errors (the ones that need no GPU)
# ---------------------------------------------------------------------------------------------------------------
def test_compile_checks_its_inputs_first(tiny_onnx: tuple[Path, ModelMeta], tmp_path: Path) -> None:
    onnx_path, _ = tiny_onnx
    with pytest.raises(UserError, match="no such ONNX file") as missing:
        trt_backend.compile_onnx(tmp_path / "absent.onnx", tmp_path / "tensorrt.engine", "tensorrt")
    assert str(tmp_path / "absent.onnx") in str(missing.value)
    with pytest.raises(UserError, match="not a TensorRT backend"):
        trt_backend.compile_onnx(onnx_path, tmp_path / "x.engine", "ort-int8-static")
    with pytest.raises(UserError, match="unknown backend"):
        trt_backend.compile_onnx(onnx_path, tmp_path / "x.engine", "tensorrt-int4")
    with pytest.raises(UserError, match="needs a calibration set"):
        trt_backend.compile_onnx(onnx_path, tmp_path / "tensorrt-int8.engine", "tensorrt-int8")
    with pytest.raises(UserError, match="--workspace-gb must be greater than 0"):
        trt_backend.compile_onnx(onnx_path, tmp_path / "tensorrt.engine", "tensorrt", workspace_gb=0)
    existing = tmp_path / "tensorrt-fp16.engine"
    existing.write_bytes(b"old engine")
    with pytest.raises(UserError, match="already exists; pass --force"):
        trt_backend.compile_onnx(onnx_path, existing, "tensorrt-fp16")
    assert existing.read_bytes() == b"old engine"
    for error in (missing.value,):
        assert error.exit_code == 2 and "\n" not in str(error)


def test_compile_without_tensorrt_is_backend_unavailable(tiny_onnx: tuple[Path, ModelMeta], tmp_path: Path) -> None:
    status = trt_backend.availability("tensorrt")
    if status.ok:
        pytest.skip("TensorRT and a GPU are present here; the unavailable path is checked on machines without them")
    onnx_path, meta = tiny_onnx
    out = tmp_path / "tensorrt-fp16.engine"
    with pytest.raises(BackendUnavailable) as info:
        trt_backend.compile_onnx(onnx_path, out, "tensorrt-fp16", workspace_gb=2)
    error = info.value
    assert error.exit_code == 2 and error.backend == "tensorrt"
    assert status.reason in str(error) and 'pip install ".[tensorrt]"' in str(error)
    assert "\n" not in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even a partial file

    engine = tmp_path / "tensorrt.engine"
    engine.write_bytes(b"an engine from elsewhere")
    with pytest.raises(BackendUnavailable):
        trt_backend.open_runner(engine, meta, "tensorrt")
    with pytest.raises(UserError, match="no such engine"):
        trt_backend.open_runner(tmp_path / "absent.engine", meta, "tensorrt")


def test_compile_command_explains_unavailable_tensorrt(tiny_onnx: tuple[Path, ModelMeta], tmp_path: Path) -> None:
    """`maskconver compile --backend tensorrt` on a machine without TensorRT: exit 2 and the reason, one line."""
    from typer.testing import CliRunner

    from maskconver_deploy.cli import app

    status = trt_backend.availability("tensorrt")
    if status.ok:
        pytest.skip("TensorRT and a GPU are present here; the unavailable path is checked on machines without them")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_onnx[0], model_dir / "model.onnx")
    result = CliRunner().invoke(app, ["compile", "--backend", "tensorrt-fp16", "--model-dir", str(model_dir)])
    assert result.exit_code == 2, result.output
    assert "tensorrt" in result.output and status.reason in result.output, result.output
    assert "Traceback" not in result.output
    assert not list(model_dir.glob("*.engine"))


# ---------------------------------------------------------------------------------------------------------------
# The graph before TensorRT sees it
# ---------------------------------------------------------------------------------------------------------------
def _transpose_then_cast() -> onnx.ModelProto:
    """uint8 NHWC image -> Transpose -> Cast(float) -> Mul: the input handling the exporter writes."""
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 4, 5, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 5])
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["nchw"], ["pixels"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pixels", "scale"], ["y"], name="scale"),
    ]
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255])
    graph = helper.make_graph(nodes, "g", [image], [out], initializer=[scale])
    graph.value_info.append(helper.make_tensor_value_info("nchw", TensorProto.UINT8, [1, 3, 4, 5]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_uint8_transpose_then_cast_becomes_cast_then_transpose() -> None:
    original = _transpose_then_cast()
    (problem,) = tensorrt_graph_problems(original)
    assert "uint8 input 'image' feeds Transpose 'to_nchw'" in problem

    prepared = _transpose_then_cast()
    (change,) = prepare_onnx(prepared)
    assert "moved Cast 'to_float' before Transpose 'to_nchw'" in change
    assert [n.op_type for n in prepared.graph.node] == ["Cast", "Transpose", "Mul"]
    assert tensorrt_graph_problems(prepared) == []
    assert "nchw" not in {info.name for info in prepared.graph.value_info}  # no stale uint8 type left behind
    onnx.checker.check_model(prepared, full_check=True)
    assert prepare_onnx(prepared) == []  # a second pass changes nothing

    image = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    before, after = _ort_run(original, image), _ort_run(prepared, image)
    np.testing.assert_array_equal(before["y"], after["y"])


def test_exported_graph_is_ready_for_tensorrt_after_preparation(tiny_onnx: tuple[Path, ModelMeta]) -> None:
    onnx_path, _ = tiny_onnx
    original = onnx.load(str(onnx_path))
    prepared = onnx.load(str(onnx_path))
    changes = prepare_onnx(prepared)
    assert tensorrt_graph_problems(prepared) == []
    assert [n.op_type for n in prepared.graph.node if "image" in n.input] == ["Cast"]
    if changes:  # today's exporter transposes the uint8 image first; the rewrite must not change any output
        onnx.checker.check_model(prepared)
        for image in _images(2, seed=3):
            before, after = _ort_run(original, image), _ort_run(prepared, image)
            assert before.keys() == after.keys()
            for name in before:
                np.testing.assert_array_equal(before[name], after[name], err_msg=name)


@pytest.mark.parametrize("merge", ["input", "feature", "official", "input-legacy"])
def test_every_merge_path_passes_the_preflight(merge: str, tmp_path: Path) -> None:
    """Each merge path's graph needs no change TensorRT cannot take, and the preparation keeps its answers."""
    path = _export_tiny(tmp_path / f"{merge}.onnx", merge)
    original, prepared = onnx.load(str(path)), onnx.load(str(path))
    prepare_onnx(prepared)
    assert tensorrt_graph_problems(prepared) == []
    for image in _images(2, seed=5):
        before, after = _ort_run(original, image), _ort_run(prepared, image)
        for name in before:
            np.testing.assert_array_equal(before[name], after[name], err_msg=f"{merge}: {name}")


def _graph_with_topk(k_value: int | None, dynamic: bool = False, sorted_: int = 1) -> onnx.ModelProto:
    dims: list[int | str] = ["batch", 10] if dynamic else [1, 10]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    inputs = [x]
    nodes = []
    initializers = []
    if k_value is None:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    else:
        initializers.append(helper.make_tensor("k", TensorProto.INT64, [1], [k_value]))
    nodes.append(helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", sorted=sorted_))
    graph = helper.make_graph(
        nodes, "g", inputs,
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("indices", TensorProto.INT64, None)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_graph_problems_name_what_tensorrt_refuses() -> None:
    assert tensorrt_graph_problems(_graph_with_topk(100)) == []
    assert tensorrt_graph_problems(_graph_with_topk(3840)) == []
    (too_big,) = tensorrt_graph_problems(_graph_with_topk(3841))
    assert "K=3841" in too_big and "3840" in too_big
    (computed,) = tensorrt_graph_problems(_graph_with_topk(None))
    assert "computed at run time" in computed
    (unsorted,) = tensorrt_graph_problems(_graph_with_topk(5, sorted_=0))
    assert "unsorted" in unsorted
    (dynamic,) = tensorrt_graph_problems(_graph_with_topk(5, dynamic=True))
    assert "input 'x' has a dynamic shape ['batch', 10]" in dynamic

    image = helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 4, 4, 3])
    out = helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 3, 4, 4])
    transposed_only = helper.make_model(
        helper.make_graph(
            [helper.make_node("Transpose", ["image"], ["y"], name="t", perm=[0, 3, 1, 2])], "g", [image], [out]
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    assert prepare_onnx(transposed_only) == []  # no Cast after it: nothing to move, and the problem is reported
    (uint8,) = tensorrt_graph_problems(transposed_only)
    assert "uint8 input 'image' feeds Transpose 't'" in uint8


def test_fp32_tail_on_a_small_chain() -> None:
    layers = [
        LayerInfo("CONVOLUTION", ("image",), ("heat",)),  # 0
        LayerInfo("ACTIVATION", ("heat",), ("prob",)),  # 1 sigmoid
        LayerInfo("POOLING", ("prob",), ("pooled",)),  # 2
        LayerInfo("ELEMENTWISE", ("prob", "pooled"), ("peaks",)),  # 3
        LayerInfo("TOPK", ("peaks",), ("scores", "index")),  # 4
        LayerInfo("CONVOLUTION", ("image",), ("features",)),  # 5
        LayerInfo("MATRIX_MULTIPLY", ("index", "features"), ("logits",)),  # 6
        LayerInfo("RESIZE", ("logits",), ("full",)),  # 7
        LayerInfo("RESIZE", ("features",), ("side",)),  # 8: not on the post-processing path
    ]
    assert fp32_tail(layers) == {1, 2, 3, 4, 6, 7}
    assert fp32_tail(layers[5:6]) == set()  # no TopK: nothing is pinned


def test_fp32_tail_of_the_exported_graph(tiny_onnx: tuple[Path, ModelMeta]) -> None:
    graph = onnx.load(str(tiny_onnx[0])).graph
    nodes = [LayerInfo(n.op_type, tuple(n.input), tuple(n.output)) for n in graph.node]
    tail = fp32_tail(nodes, seed_kinds=("TopK",), stop_kinds=("Conv",))
    kinds_in = {nodes[i].kind for i in tail}
    assert {"Sigmoid", "MaxPool", "TopK", "MatMul", "ArgMax", "Resize"} <= kinds_in
    assert "Conv" not in kinds_in
    assert all(i in tail for i, n in enumerate(nodes) if n.kind in ("TopK", "MatMul", "ArgMax", "Sigmoid"))
    resizes = [i for i, n in enumerate(nodes) if n.kind == "Resize"]
    assert any(i not in tail for i in resizes)  # the decoder's upsampling stays in reduced precision
    assert not any(nodes[i].kind == "ReduceMean" for i in tail)  # ASPP image pooling too
    assert len(tail) < len(nodes) // 2


# ---------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------
def test_calibration_batches_shape_dtype_order_count() -> None:
    images = _images(5, seed=7)
    batches = list(calibration_batches(images, (1, SIZE, SIZE, 3), np.uint8))
    assert len(batches) == 5
    for image, batch in zip(images, batches, strict=True):
        assert batch.shape == (1, SIZE, SIZE, 3) and batch.dtype == np.uint8 and batch.flags.c_contiguous
        np.testing.assert_array_equal(batch[0], image)

    pairs = list(calibration_batches(images, (2, SIZE, SIZE, 3), np.float32))
    assert len(pairs) == 2  # the fifth image does not fill a batch
    assert pairs[1].dtype == np.float32 and pairs[1].shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(pairs[1][1], images[3].astype(np.float32))  # 0..255, not normalised
    assert pairs[0].max() > 1.0


def test_calibration_batches_refuse_bad_sets(tmp_path: Path) -> None:
    source = tmp_path / "calibration" / "small"
    with pytest.raises(UserError, match=r"calibration image 1 is uint8 \(32, 32, 3\)") as wrong:
        list(calibration_batches([_images(1, 0)[0], _images(1, 0, size=32)[0]], (1, SIZE, SIZE, 3), np.uint8, source))
    assert str(source) in str(wrong.value) and "\n" not in str(wrong.value)
    with pytest.raises(UserError, match="calibration image 0 is float32"):
        list(calibration_batches([np.zeros((SIZE, SIZE, 3), np.float32)], (1, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(UserError, match="no full calibration batch of 4"):
        list(calibration_batches(_images(3, 0), (4, SIZE, SIZE, 3), np.uint8, source))
    with pytest.raises(UserError, match="no full calibration batch"):
        list(calibration_batches([], (1, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(UserError, match=r"fixed \[B, H, W, 3\]"):
        list(calibration_batches(_images(1, 0), (1, 3, SIZE, SIZE), np.float32))


def test_calibration_cache_round_trip(tmp_path: Path) -> None:
    key = {"source_onnx_sha256": "a" * 64, "calibration_manifest_hash": "m1", "tensorrt_version": "10.7.0"}
    path = tmp_path / "tensorrt-int8.calib"
    cache = CalibrationCache(path, key)
    assert cache.read() is None and not cache.reused
    data = b"TRT-100700-EntropyCalibration2\nimage: 3c010a14\n"
    cache.write(memoryview(data))
    assert path.read_bytes() == data
    assert json.loads((tmp_path / "tensorrt-int8.calib.json").read_text()) == key
    again = CalibrationCache(path, dict(key))
    assert again.read() == data and again.reused
    changed = (("calibration_manifest_hash", "m2"), ("source_onnx_sha256", "b" * 64), ("tensorrt_version", "10.8.0"))
    for field, value in changed:
        stale = CalibrationCache(path, {**key, field: value})
        assert stale.read() is None and not stale.reused, field
    (tmp_path / "tensorrt-int8.calib.json").write_text("{broken")
    assert CalibrationCache(path, key).read() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tensorrt-int8.calib", "tensorrt-int8.calib.json"]


# ---------------------------------------------------------------------------------------------------------------
# Build record and the compatibility check
# ---------------------------------------------------------------------------------------------------------------
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.7.0", "12.6", "12.8")


def _record(tmp_path: Path, device: DeviceInfo = H100, precision: Precision = Precision.INT8) -> dict:
    return build_record(
        name="tensorrt-int8", precision=precision, engine=tmp_path / "tensorrt-int8.engine", engine_sha256="e" * 64,
        onnx_path=tmp_path / "model.onnx", onnx_sha256="o" * 64, device=device, graph="panoptic",
        input_shape=(1, SIZE, SIZE, 3), input_dtype="uint8", workspace_bytes=2 << 30, fp32_layers=17,
        rewrites=["moved Cast before Transpose"],
        calibration={"manifest_hash": "m1", "images": 8, "cache": "tensorrt-int8.calib", "cache_reused": False},
        timing_cache="tensorrt.timing-cache", build_seconds=12.3456, tool_versions={"tensorrt": "10.7.0"},
    )


def test_build_record_contents(tmp_path: Path) -> None:
    record = _record(tmp_path)
    assert json.loads(json.dumps(record)) == record
    assert record["backend"] == "tensorrt-int8" and record["precision"] == "int8" and record["family"] == "tensorrt"
    assert record["artifact"] == "tensorrt-int8.engine" and record["source_onnx"] == "model.onnx"
    assert record["source_onnx_sha256"] == "o" * 64
    assert record["tensorrt_version"] == "10.7.0"
    assert record["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert record["calibration_manifest_hash"] == "m1"
    assert record["input"] == {"name": "image", "shape": [1, SIZE, SIZE, 3], "dtype": "uint8"}
    assert record["builder"]["fp32_layers"] == 17 and record["builder"]["tf32"] is False
    assert record["build_seconds"] == 12.346 and record["built_at"].endswith("+00:00")
    assert _record(tmp_path, precision=Precision.FP32)["builder"]["precision_constraints"] == "none"


def test_engine_compatibility_accepts_and_refuses(tmp_path: Path) -> None:
    engine = tmp_path / "tensorrt-int8.engine"
    record = _record(tmp_path)
    assert check_engine_compatible(engine, record, H100) == []

    other_card = DeviceInfo("NVIDIA H100 PCIe", "9.0", "10.7.0")
    (note,) = check_engine_compatible(engine, record, other_card)
    assert "NVIDIA H100 80GB HBM3" in note and "NVIDIA H100 PCIe" in note

    newer_trt = DeviceInfo(H100.gpu_name, "9.0", "10.8.0")
    with pytest.raises(UserError) as refused:
        check_engine_compatible(engine, record, newer_trt)
    message = str(refused.value)
    assert message.startswith(f"{engine}: built with TensorRT 10.7.0")
    assert "TensorRT 10.8.0" in message and "maskconver compile --backend tensorrt-int8 --force" in message
    assert "\n" not in message and refused.value.exit_code == 2

    a100 = DeviceInfo("NVIDIA A100-SXM4-40GB", "8.0", "10.7.0")
    with pytest.raises(UserError, match=r"compute 9\.0\).*NVIDIA A100-SXM4-40GB \(compute 8\.0\)"):
        check_engine_compatible(engine, record, a100)

    with pytest.raises(UserError, match="does not say which TensorRT and GPU"):
        check_engine_compatible(engine, {"backend": "tensorrt"}, H100)


# ---------------------------------------------------------------------------------------------------------------
# On a GPU with TensorRT: build, run, compare with ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _CalibrationImages:
    """What compile_onnx needs from a calibration set: the images at the model size and the manifest hash."""

    arrays: list[np.ndarray]
    manifest_hash: str

    def images(self) -> list[np.ndarray]:
        return list(self.arrays)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


@pytest.mark.gpu
class TestOnGpu:
    NAMES = ("tensorrt", "tensorrt-fp16", "tensorrt-int8")

    @pytest.fixture(scope="class")
    def built(self, tiny_onnx: tuple[Path, ModelMeta], tmp_path_factory: pytest.TempPathFactory):
        status = trt_backend.availability("tensorrt")
        if not status.ok:
            pytest.skip(f"TensorRT cannot run here: {status.reason} ({status.hint})")
        folder = tmp_path_factory.mktemp("engines")
        onnx_path = folder / "model.onnx"
        shutil.copy(tiny_onnx[0], onnx_path)
        calib = _CalibrationImages(_images(8, seed=11), "calibration-test-1")
        engines = {}
        for name in self.NAMES:
            engines[name] = trt_backend.compile_onnx(
                onnx_path, trt_backend.artifact_path(folder, name), name,
                calib=calib if name.endswith("int8") else None, workspace_gb=1,
            )
        return folder, onnx_path, engines, tiny_onnx[1], calib

    def _outputs(self, engine: Path, meta: ModelMeta, name: str, images: list[np.ndarray]) -> list[dict]:
        runner = trt_backend.open_runner(engine, meta, name)
        with runner:
            results = []
            for image in images:
                results.append(runner.infer(image))
                assert runner.last_latency_s > 0
        return results

    def test_build_records(self, built) -> None:
        import tensorrt

        from maskconver_deploy.fileio import sha256_file

        folder, onnx_path, engines, _, calib = built
        assert (folder / "tensorrt.timing-cache").stat().st_size > 0
        for name, engine in engines.items():
            record = json.loads(trt_backend.record_path(engine).read_text())
            assert record["backend"] == name and record["tensorrt_version"] == tensorrt.__version__
            assert record["source_onnx_sha256"] == sha256_file(onnx_path)
            assert record["artifact_sha256"] == sha256_file(engine)
            assert record["gpu"]["name"] and record["gpu"]["compute_capability"]
            assert any("before Transpose" in r for r in record["builder"]["graph_rewrites"])
            if name != "tensorrt":
                assert record["builder"]["fp32_layers"] > 0
        int8 = json.loads(trt_backend.record_path(engines["tensorrt-int8"]).read_text())
        assert int8["calibration_manifest_hash"] == calib.manifest_hash
        assert int8["calibration"]["images"] == 8 and not int8["calibration"]["cache_reused"]
        assert (folder / "tensorrt-int8.calib").stat().st_size > 0

    @pytest.mark.parametrize(
        ("name", "min_agreement", "score_atol"), [("tensorrt", 0.99, 1e-3), ("tensorrt-fp16", 0.95, 2e-2)]
    )
    def test_parity_with_onnxruntime(self, built, name: str, min_agreement: float, score_atol: float) -> None:
        _, onnx_path, engines, meta, _ = built
        images = _images(4, seed=21)
        for image, got in zip(images, self._outputs(engines[name], meta, name, images), strict=True):
            want = {k: v[0] for k, v in _ort_run(onnx_path, image).items()}
            assert got["panoptic"].dtype == np.int32 and got["panoptic"].shape == (SIZE, SIZE)
            assert _agreement(got["panoptic"], want["panoptic"]) >= min_agreement
            np.testing.assert_allclose(got["scores"], want["scores"], atol=score_atol)

    def test_int8_outputs_are_well_formed(self, built) -> None:
        _, _, engines, meta, _ = built
        for out in self._outputs(engines["tensorrt-int8"], meta, "tensorrt-int8", _images(3, seed=31)):
            scores, classes, centers = out["scores"], out["classes"], out["centers"]
            assert scores.shape == (PROPOSALS,) and scores.dtype == np.float32
            assert np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))
            assert np.all(np.diff(scores) <= 1e-6)
            assert classes.dtype == np.int32 and np.all((classes >= 0) & (classes < NUM_CLASSES))
            assert centers.shape == (PROPOSALS, 2) and np.all((centers >= 0) & (centers < SIZE // 8))
            ids = np.unique(out["panoptic"])
            assert np.all((ids == 0) | ((ids // 1000 >= 1) & (ids // 1000 <= NUM_CLASSES)))

    def test_int8_rebuild_reuses_the_calibration_cache(self, built) -> None:
        folder, onnx_path, engines, _, calib = built
        trt_backend.compile_onnx(onnx_path, engines["tensorrt-int8"], "tensorrt-int8", calib=calib, force=True)
        record = json.loads(trt_backend.record_path(engines["tensorrt-int8"]).read_text())
        assert record["calibration"]["cache_reused"] is True and record["calibration"]["images"] == 0

    def test_calibration_images_of_another_size_are_refused(self, built, tmp_path: Path) -> None:
        _, onnx_path, _, _, _ = built
        small = _CalibrationImages(_images(2, seed=1, size=32), "calibration-small")
        with pytest.raises(UserError, match="calibration image 0 is uint8"):
            trt_backend.compile_onnx(onnx_path, tmp_path / "tensorrt-int8.engine", "tensorrt-int8", calib=small)
        assert not (tmp_path / "tensorrt-int8.engine").exists()

    def test_engine_from_another_tensorrt_is_refused(self, built, tmp_path: Path) -> None:
        import tensorrt

        _, _, engines, meta, _ = built
        engine = tmp_path / "tensorrt.engine"
        shutil.copy(engines["tensorrt"], engine)
        record = json.loads(trt_backend.record_path(engines["tensorrt"]).read_text())
        record["tensorrt_version"] = "9.9.9"
        trt_backend.record_path(engine).write_text(json.dumps(record))
        runner = trt_backend.open_runner(engine, meta, "tensorrt")
        with pytest.raises(UserError, match=f"TensorRT 9.9.9 .* TensorRT {tensorrt.__version__}"):
            runner.open()

"""TFLite backend: real onnx2tf (its own environment) and the real LiteRT interpreter, on a tiny exported model.

The default run converts the tiny model to fp32, int8-dynamic and full int8 (20-30 s each on 2 cores), runs them in
LiteRT and compares them with ONNX Runtime. Under CI=true a missing LiteRT or onnx2tf fails instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from maskconver_deploy.backends import tflite
from maskconver_deploy.errors import BackendUnavailable, UserError
from maskconver_deploy.types import LABEL_DIVISOR, METADATA_KEY, PANOPTIC_OUTPUTS, Category, ModelMeta, Precision

SIZE = 64
PROPOSALS = 10
CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def require_runtime(module: str, what: str, hint: str) -> None:
    """tests/conftest.py's rule (skip, but fail under CI=true), taken from the module pytest already loaded."""
    import sys

    loaded = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(CONFTEST))
    loaded.require_runtime(module, what, hint)


def require_onnx2tf() -> Path:
    """The onnx2tf executable; skip when it is missing, except under CI=true, where a missing one fails the run."""
    path, where = tflite.find_onnx2tf()
    if path is None:
        message = f"onnx2tf is not installed ({where}; {tflite.HINT_ONNX2TF})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {message}: an install step is missing", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def runtimes() -> None:
    require_runtime("ai_edge_litert", "the LiteRT interpreter", tflite.HINT_LITERT)
    require_onnx2tf()


# ---------------------------------------------------------------------------------------------------------------
# A tiny model, exported once: the shapes-256 network at 64x64 with 10 proposals. Random weights, BN statistics
# from a few batches (so the heatmap is not saturated) and scaled embedding heads (non-empty segments).
# ---------------------------------------------------------------------------------------------------------------
def _meta() -> ModelMeta:
    from maskconver_deploy.model.specs import get_preset

    spec = get_preset("shapes-256")
    categories = [Category(i + 1, f"class{i}", i < spec.num_things) for i in range(spec.num_classes)]
    return ModelMeta("shapes-256", categories, (SIZE, SIZE), spec.mean, spec.std, PROPOSALS,
                     small_area_threshold=0, feature_stride=spec.feature_stride)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelMeta]:
    import torch

    from maskconver_deploy.model.maskconver import MaskConver
    from maskconver_deploy.model.postprocess import DeployModel
    from maskconver_deploy.model.specs import get_preset

    torch.manual_seed(0)
    spec = get_preset("shapes-256").with_changes(
        input_size=(SIZE, SIZE), num_proposals=PROPOSALS, small_area_threshold=0
    )
    net = MaskConver(spec)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(net.normalize(torch.randint(0, 256, (4, SIZE, SIZE, 3), dtype=torch.uint8)))
        for name in ("center_embedding", "mask_features"):
            net.heads[name].predict.weight.mul_(10.0)
    model = DeployModel(net.eval())
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    example = torch.zeros((1, SIZE, SIZE, 3), dtype=torch.uint8)
    torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=list(PANOPTIC_OUTPUTS),
                      opset_version=17, dynamo=False)  # fmt: skip
    proto = onnx.load(str(path))
    meta = _meta()
    helper.set_model_props(proto, {METADATA_KEY: meta.to_json()})
    onnx.save(proto, str(path))
    return path, meta


@pytest.fixture(scope="module")
def converted(runtimes: None, tiny_onnx: tuple[Path, ModelMeta], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """fp32 and int8-dynamic artifacts of the tiny model, built once."""
    onnx_path, _ = tiny_onnx
    folder = tmp_path_factory.mktemp("tflite")
    return {
        name: tflite.compile_onnx(onnx_path, tflite.artifact_path(folder, name), name)
        for name in ("tflite", "tflite-int8-dynamic")
    }


def _images(count: int, seed: int) -> list[np.ndarray]:
    return list(tflite.synthetic_images(count, SIZE, SIZE, seed=seed))


def _ort_outputs(onnx_path: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return {n: v[0] for n, v in zip(names, session.run(None, {"image": image[None]}), strict=True)}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class _Calibration:
    """The calibration-set interface compile_onnx uses: `.images()` and `.manifest_hash`."""

    manifest_hash = "test-calibration"

    def __init__(self, images: list[np.ndarray]) -> None:
        self._images = images

    def images(self) -> list[np.ndarray]:
        return list(self._images)


# ---------------------------------------------------------------------------------------------------------------
# Contract, names, availability (no conversion)
# ---------------------------------------------------------------------------------------------------------------
def test_module_contract_and_file_names(tmp_path: Path) -> None:
    assert tflite.FAMILIES == ("tflite",)
    assert tflite.PRECISIONS["tflite"] == (Precision.FP32, Precision.FP16, Precision.INT8_DYNAMIC, Precision.INT8)
    assert tflite.artifact_path(tmp_path, "tflite") == tmp_path / "tflite.tflite"
    assert tflite.artifact_path(tmp_path, "tflite-int8-dynamic") == tmp_path / "tflite-int8-dynamic.tflite"
    assert tflite.artifact_path(tmp_path, "tflite-fp16", graph="raw") == tmp_path / "tflite-fp16.raw.tflite"
    assert tflite.record_path(tmp_path / "tflite-int8.tflite") == tmp_path / "tflite-int8.tflite.json"


def test_onnx2tf_command_keeps_shapes_static_and_writes_signatures() -> None:
    command = tflite.onnx2tf_command(Path("/x/onnx2tf"), 64, 96)
    assert command[command.index("-ois") + 1] == "image:1,3,64,96"
    assert "-osd" in command
    assert "-cind" not in command and "-oiqt" not in command  # quantisation is done by our own converter step


def test_availability_names_a_missing_onnx2tf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "onnx2tf"
    monkeypatch.setenv(tflite.ENV_VAR, str(missing))
    status = tflite.availability("tflite")
    if importlib_missing("ai_edge_litert"):
        assert not status.ok and "ai-edge-litert" in status.reason
        return
    assert not status.ok
    assert tflite.ENV_VAR in status.reason and str(missing) in status.reason
    assert "make install" in status.hint


def test_compile_without_onnx2tf_is_backend_unavailable(
    monkeypatch: pytest.MonkeyPatch, tiny_onnx: tuple[Path, ModelMeta], tmp_path: Path
) -> None:
    monkeypatch.setenv(tflite.ENV_VAR, str(tmp_path / "missing-onnx2tf"))
    out = tmp_path / "out" / "tflite.tflite"
    with pytest.raises(BackendUnavailable) as info:
        tflite.compile_onnx(tiny_onnx[0], out, "tflite")
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert not out.exists() and not (out.parent.exists() and _leftovers(out.parent))


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_int8_without_calibration_is_a_user_error(tiny_onnx: tuple[Path, ModelMeta], tmp_path: Path) -> None:
    out = tmp_path / "tflite-int8.tflite"
    with pytest.raises(UserError, match="calibration set") as info:
        tflite.compile_onnx(tiny_onnx[0], out, "tflite-int8")
    assert info.value.exit_code == 2
    assert _leftovers(tmp_path) == []


def test_wrong_names_and_inputs_are_user_errors(tiny_onnx: tuple[Path, ModelMeta], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a TFLite backend"):
        tflite.compile_onnx(tiny_onnx[0], tmp_path / "a.tflite", "tflite-int8-static")
    with pytest.raises(UserError, match="no such ONNX file"):
        tflite.compile_onnx(tmp_path / "missing.onnx", tmp_path / "a.tflite", "tflite")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        tflite.compile_onnx(garbage, tmp_path / "a.tflite", "tflite")
    float_input = tmp_path / "float.onnx"
    onnx.save(_conv_graph(elem=TensorProto.FLOAT), str(float_input))
    with pytest.raises(UserError, match="must be uint8"):
        tflite.compile_onnx(float_input, tmp_path / "a.tflite", "tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx", "garbage.onnx"]


def test_split_separates_network_from_post_processing(tiny_onnx: tuple[Path, ModelMeta]) -> None:
    model = onnx.load(str(tiny_onnx[0]))
    network, tail, cut = tflite.split_graph(model)
    assert len(cut) == 3  # heatmap, center embedding and mask features: the heads' outputs
    assert {n.op_type for n in network.graph.node} >= {"Conv", "Transpose"}
    assert not {"TopK", "ArgMax", "HardSigmoid"} & {n.op_type for n in network.graph.node}
    assert {"TopK", "ArgMax", "HardSigmoid", "MaxPool"} <= {n.op_type for n in tail.graph.node}
    assert "Conv" not in {n.op_type for n in tail.graph.node}
    assert [o.name for o in tail.graph.output] == list(PANOPTIC_OUTPUTS)
    image = network.graph.input[0]
    assert image.name == "image" and [d.dim_value for d in image.type.tensor_type.shape.dim] == [1, 3, SIZE, SIZE]
    onnx.checker.check_model(network)
    onnx.checker.check_model(tail)


def test_synthetic_images_are_deterministic() -> None:
    a, b = tflite.synthetic_images(3, 32, 48, seed=5), tflite.synthetic_images(3, 32, 48, seed=5)
    assert a.shape == (3, 32, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1]) and a.std() > 10


# ---------------------------------------------------------------------------------------------------------------
# Real conversions
# ---------------------------------------------------------------------------------------------------------------
def test_fp32_agrees_with_onnxruntime(converted: dict, tiny_onnx: tuple[Path, ModelMeta]) -> None:
    onnx_path, meta = tiny_onnx
    record = tflite.read_record(converted["tflite"])
    assert record["check"]["panoptic_agreement"] >= 0.999
    with tflite.open_runner(converted["tflite"], meta, "tflite", threads=2) as runner:
        for image in _images(3, seed=99):
            got = runner.infer(image)
            ref = _ort_outputs(onnx_path, image)
            assert set(got) == set(PANOPTIC_OUTPUTS)
            assert got["panoptic"].shape == (SIZE, SIZE) and got["panoptic"].dtype == np.int32
            assert got["scores"].shape == (PROPOSALS,) and got["scores"].dtype == np.float32
            assert got["centers"].shape == (PROPOSALS, 2) and got["classes"].dtype == np.int32
            assert np.mean(got["panoptic"] == ref["panoptic"]) >= 0.999
            np.testing.assert_allclose(got["scores"], ref["scores"], rtol=0, atol=1e-4)
            assert np.array_equal(got["classes"], ref["classes"]) and np.array_equal(got["centers"], ref["centers"])
            assert runner.last_latency_s > 0


def test_build_record(converted: dict, tiny_onnx: tuple[Path, ModelMeta]) -> None:
    from maskconver_deploy.fileio import sha256_file

    record = tflite.read_record(converted["tflite-int8-dynamic"])
    assert record["backend"] == "tflite-int8-dynamic" and record["precision"] == "int8-dynamic"
    assert record["source_onnx_sha256"] == sha256_file(tiny_onnx[0])
    assert record["artifact_sha256"] == sha256_file(converted["tflite-int8-dynamic"])
    assert record["tool_versions"]["onnx2tf"] == "1.29.24"
    assert record["input"] == {"name": "image", "shape": [1, SIZE, SIZE, 3], "dtype": "uint8", "layout": "NHWC"}
    assert 0.0 <= record["check"]["panoptic_agreement"] <= 1.0
    assert record["calibration"] is None
    assert "-osd" in record["conversion"]["network"]


def test_int8_dynamic_is_smaller_and_well_formed(converted: dict, tiny_onnx: tuple[Path, ModelMeta]) -> None:
    meta = tiny_onnx[1]
    assert converted["tflite-int8-dynamic"].stat().st_size < 0.5 * converted["tflite"].stat().st_size
    with tflite.open_runner(converted["tflite-int8-dynamic"], meta, "tflite-int8-dynamic") as runner:
        out = runner.infer(_images(1, seed=3)[0])
    _assert_well_formed(out, meta)


def _assert_well_formed(out: dict[str, np.ndarray], meta: ModelMeta) -> None:
    ids = np.unique(out["panoptic"])
    classes = ids[ids > 0] // LABEL_DIVISOR - 1
    instances = ids[ids > 0] % LABEL_DIVISOR
    assert classes.min(initial=0) >= 0 and classes.max(initial=0) < meta.num_classes
    assert instances.max(initial=0) <= meta.num_proposals
    assert np.all(np.diff(out["scores"]) <= 1e-6)  # sorted high to low
    assert out["classes"].min() >= 0 and out["classes"].max() < meta.num_classes
    assert out["centers"].min() >= 0 and out["centers"].max() < SIZE // meta.feature_stride


def test_runner_refuses_wrong_images_and_files(
    converted: dict, tiny_onnx: tuple[Path, ModelMeta], tmp_path: Path
) -> None:
    meta = tiny_onnx[1]
    with tflite.open_runner(converted["tflite"], meta) as runner:
        with pytest.raises(UserError, match="uint8"):
            runner.infer(np.zeros((SIZE, SIZE, 3), np.float32))
    with pytest.raises(UserError, match="no such .tflite"):
        tflite.open_runner(tmp_path / "none.tflite", meta).open()
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a loadable"):
        tflite.open_runner(bad, meta).open()
    other = ModelMeta.from_dict({**meta.to_dict(), "input_size": [SIZE * 2, SIZE]})
    with pytest.raises(UserError, match="the model meta says"):
        tflite.open_runner(converted["tflite"], other).open()


def test_compile_refuses_to_overwrite(converted: dict, tiny_onnx: tuple[Path, ModelMeta]) -> None:
    before = converted["tflite"].read_bytes()
    with pytest.raises(UserError, match="already exists"):
        tflite.compile_onnx(tiny_onnx[0], converted["tflite"], "tflite")
    assert converted["tflite"].read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# Graphs that cannot be converted: one line, exit 2, nothing left behind
# ---------------------------------------------------------------------------------------------------------------
def _conv_graph(
    extra: list | None = None, elem: int = TensorProto.UINT8, out_name: str = "panoptic"
) -> onnx.ModelProto:
    """uint8 image [1, 16, 16, 3] -> Transpose -> Cast -> Conv(3->4) [-> extra nodes] -> output."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.linspace(-1, 1, 108).tolist())
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["nchw"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w"], ["features"], pads=[1, 1, 1, 1]),
    ]
    nodes += extra or [helper.make_node("ArgMax", ["features"], ["am"], axis=1, keepdims=0),
                       helper.make_node("Cast", ["am"], [out_name], to=TensorProto.INT32)]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("image", elem, [1, 16, 16, 3])],
        [helper.make_tensor_value_info(out_name, TensorProto.INT32 if extra is None else TensorProto.FLOAT, None)],
        [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_network_onnx2tf_cannot_convert_is_a_user_error(runtimes: None, tmp_path: Path) -> None:
    # CastLike between two convolutions: a standard op (ONNX infers its shape) that onnx2tf 1.29.24 does not have
    weight2 = helper.make_tensor("w2", TensorProto.FLOAT, [2, 4, 1, 1], [0.5] * 8)
    extra = [
        helper.make_node("CastLike", ["features", "features"], ["same"]),
        helper.make_node("Conv", ["same", "w2"], ["panoptic"]),
    ]
    model = _conv_graph(extra)
    model.graph.initializer.append(weight2)
    source = tmp_path / "src" / "castlike.onnx"
    source.parent.mkdir()
    onnx.save(model, str(source))
    out = tmp_path / "out" / "tflite.tflite"
    with pytest.raises(UserError, match="onnx2tf could not convert") as info:
        tflite.compile_onnx(source, out, "tflite")
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert not out.exists() and not (out.parent.exists() and _leftovers(out.parent))


def test_unsupported_post_processing_is_a_user_error(runtimes: None, tmp_path: Path) -> None:
    extra = [helper.make_node("NonZero", ["features"], ["nz"]), helper.make_node("Cast", ["nz"], ["panoptic"], to=1)]
    source = tmp_path / "nonzero.onnx"
    onnx.save(_conv_graph(extra), str(source))
    out = tmp_path / "out" / "tflite.tflite"
    with pytest.raises(UserError, match="NonZero") as info:
        tflite.compile_onnx(source, out, "tflite")
    assert "\n" not in str(info.value)
    assert not out.exists() and not (out.parent.exists() and _leftovers(out.parent))


# ---------------------------------------------------------------------------------------------------------------
# Full int8 with a small calibration set
# ---------------------------------------------------------------------------------------------------------------
def test_full_int8_keeps_post_processing_float(
    runtimes: None, tiny_onnx: tuple[Path, ModelMeta], tmp_path: Path
) -> None:
    onnx_path, meta = tiny_onnx
    calibration = _Calibration(_images(6, seed=21))
    out = tflite.compile_onnx(onnx_path, tmp_path / "tflite-int8.tflite", "tflite-int8", calib=calibration)
    record = tflite.read_record(out)
    assert record["calibration"] == {"manifest_hash": "test-calibration", "images": 6}
    assert record["calibration_manifest_hash"] == "test-calibration"
    quant = record["conversion"]["quantization"]
    assert quant["post_processing_ops_in_int8"] == []
    # one QUANTIZE after the input cast, one DEQUANTIZE per head: no int8 round trip on the float path
    assert quant["quantize_ops"] == {"QUANTIZE": 1, "DEQUANTIZE": 3}
    assert {"TOPK_V2", "ARG_MAX"} <= set(quant["float_op_types_denylisted"])
    ops = tflite.op_dtypes(out)
    assert ops["CONV_2D"] & {"int8"}  # the network is integer
    assert ops["TOPK_V2"] == {"float32", "int32"} and "int8" not in ops["ARG_MAX"]
    with tflite.open_runner(out, meta, "tflite-int8") as runner:
        _assert_well_formed(runner.infer(_images(1, seed=3)[0]), meta)


def test_calibration_images_of_another_size_are_refused(
    runtimes: None, tiny_onnx: tuple[Path, ModelMeta], tmp_path: Path
) -> None:
    calibration = _Calibration(list(tflite.synthetic_images(2, SIZE * 2, SIZE, seed=1)))
    with pytest.raises(UserError, match="the model takes"):
        tflite.compile_onnx(tiny_onnx[0], tmp_path / "tflite-int8.tflite", "tflite-int8", calib=calibration)
    assert _leftovers(tmp_path) == []

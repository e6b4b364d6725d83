"""ONNX Runtime backends on the tame tiny model (tests/export/tamemodel.py): every variant is compiled with the real
tools (quantisation, the ORT-format converter) and run in the real runtime; fp32 variants equal PyTorch; int8 keeps
the post-processing in float; bad input is a one-line UserError (exit 2); nothing half-written is ever left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from maskconver_deploy import backends
from maskconver_deploy.backends import ort as ort_backend
from maskconver_deploy.calibration import make_calibration
from maskconver_deploy.cli import app
from maskconver_deploy.data.synthetic import generate_scene, write_dataset
from maskconver_deploy.errors import BackendUnavailable, UserError
from maskconver_deploy.fileio import sha256_file
from maskconver_deploy.modeldir import ModelDir, record_path
from maskconver_deploy.types import LABEL_DIVISOR, METADATA_KEY, Precision

from tests.conftest import one_line_exit_2, require_runtime  # noqa: E402  (the CI rule: a missing ONNX Runtime fails under CI=true)

from tests.export import tamemodel

SIZE = tamemodel.SIZE
PROPOSALS = tamemodel.PROPOSALS
VARIANTS = ("ort", "ort-int8-dynamic", "ort-int8-static", "ort-mobile", "ort-mobile-int8-static")
# The build check's panoptic agreement with model.onnx on this tame model, measured: int8-dynamic 0.233, int8-static
# 0.751 (ort-mobile-int8-static the same), ort-mobile 1.0. Floors with margin: a quantiser that breaks falls below.
CHECK_FLOORS = {"ort-mobile": 1.0, "ort-int8-dynamic": 0.15, "ort-int8-static": 0.6, "ort-mobile-int8-static": 0.6}
POST_OPS = ("Sigmoid", "MaxPool", "TopK", "ArgMax", "HardSigmoid", "Resize", "GatherElements")


@pytest.fixture(scope="module", autouse=True)
def _onnxruntime_present() -> None:
    require_runtime("onnxruntime", "ONNX Runtime", ort_backend.HINT)


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and text
    return text


def _images(count: int, seed: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(generate_scene(seed, i, SIZE).image) for i in range(count)]


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training-split images of a small synthetic set, as a calibration folder (128x128: letterboxed to 64)."""
    root = tmp_path_factory.mktemp("calibration")
    data = write_dataset(root / "data", n=10, size=128, seed=4, val_fraction=0.2)
    return make_calibration(data.out, root / "tiny-8", n=8, split="train")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, calib_dir: Path) -> Path:
    """A copy of the tame model folder with every ORT variant compiled (panoptic graph; raw for ort-mobile)."""
    source = tamemodel.tame_model_dir(tmp_path_factory.getbasetemp())
    folder = tmp_path_factory.mktemp("ort") / "model"
    shutil.copytree(source, folder)
    model = ModelDir(folder)
    for name in VARIANTS:
        model.compile(name, calib=calib_dir if "static" in name else None)
    model.compile("ort-mobile", graph="raw")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Names, availability
# ---------------------------------------------------------------------------------------------------------------
def test_module_contract_and_names(tmp_path: Path) -> None:
    from maskconver_deploy.backends import backend_module, parse_backend

    assert backend_module("ort") is ort_backend and backend_module("ort-mobile") is ort_backend
    assert ort_backend.FAMILIES == ("ort", "ort-mobile")
    assert ort_backend.PRECISIONS["ort"] == (Precision.FP32, Precision.INT8_DYNAMIC, Precision.INT8_STATIC)
    assert ort_backend.PRECISIONS["ort-mobile"] == (Precision.FP32, Precision.INT8_STATIC)
    expect = {
        ("ort", "panoptic"): "model.onnx", ("ort", "raw"): "model.raw.onnx",
        ("ort-int8-dynamic", "panoptic"): "ort-int8-dynamic.onnx", ("ort-int8-static", "raw"): "ort-int8-static.raw.onnx",
        ("ort-mobile", "panoptic"): "ort-mobile.ort", ("ort-mobile", "raw"): "ort-mobile.raw.ort",
        ("ort-mobile-int8-static", "semantic"): "ort-mobile-int8-static.semantic.ort",
    }  # fmt: skip
    for (name, graph), file in expect.items():
        assert ort_backend.artifact_path(tmp_path, parse_backend(name), graph) == tmp_path / file
    assert ort_backend.operators_config_path(tmp_path / "ort-mobile.raw.ort") == (
        tmp_path / "ort-mobile.raw.required_operators.config"
    )
    with pytest.raises(UserError, match="not an ONNX Runtime backend"):
        ort_backend.artifact_path(tmp_path, "ort-mobile-int8-dynamic")
    assert ort_backend.availability("ort").ok and ort_backend.availability("ort-mobile").ok
    assert "not served" in ort_backend.availability("tflite").reason


# ---------------------------------------------------------------------------------------------------------------
# Every variant: built, recorded, run
# ---------------------------------------------------------------------------------------------------------------
def test_every_variant_is_built_with_a_record(built: Path, calib_dir: Path) -> None:
    from maskconver_deploy.calibration import load_calibration

    folder = ModelDir(built)
    source_sha = sha256_file(folder.onnx_path())
    calib_hash = load_calibration(calib_dir).manifest_hash
    assert not record_path(folder.onnx_path()).exists()  # ort fp32 compiles nothing
    for name in VARIANTS[1:]:
        artifact = folder.artifact_path(name)
        record = json.loads(record_path(artifact).read_text())
        assert record["backend"] == name and record["artifact"] == artifact.name
        assert record["artifact_sha256"] == sha256_file(artifact)
        assert record["source_onnx"] == "model.onnx" and record["source_onnx_sha256"] == source_sha
        assert (record["merge"], record["mask_activation"]) == (folder.meta.merge, folder.meta.mask_activation)
        assert record["input"]["shape"] == [1, SIZE, SIZE, 3] and record["tool_versions"]["onnxruntime"]
        check = record["check"]
        assert check["images"] == 2 and check["panoptic_agreement"] >= CHECK_FLOORS[name], (name, check)
        if name == "ort-mobile":
            assert check["category_agreement_min"] == check["classes_agreement"] == 1.0  # fp32: the same answer
        if "static" in name:
            assert record["calibration_manifest_hash"] == calib_hash and record["calibration"]["images"] == 8
            assert record["quantization"]["format"] == "QDQ" and record["quantization"]["float_nodes"] > 40
        else:
            assert record["calibration_manifest_hash"] is None
    dynamic = json.loads(record_path(folder.artifact_path("ort-int8-dynamic")).read_text())
    assert dynamic["session_config"] == {"session.disable_quant_qdq": "1"}
    assert dynamic["quantization"]["quantized_nodes"] > 50
    assert folder.artifact_path("ort-int8-dynamic").stat().st_size < 0.45 * folder.onnx_path().stat().st_size
    mobile = json.loads(record_path(folder.artifact_path("ort-mobile")).read_text())
    assert mobile["conversion"]["optimization_style"] == "Fixed" and mobile["conversion"]["target_platform"] == "arm"
    assert mobile["check"]["panoptic_agreement"] == 1.0 and mobile["check"]["scores_max_abs_diff"] < 1e-5
    for artifact in (built / "ort-mobile.ort", built / "ort-mobile.raw.ort", built / "ort-mobile-int8-static.ort"):
        config = ort_backend.operators_config_path(artifact).read_text()
        assert f"# - {artifact.name}" in config and "/tmp" not in config and "maskconver-ort-" not in config
        assert "ai.onnx;" in config and "TopK" in config
    assert not [p for p in built.iterdir() if p.name.startswith(".maskconver-tmp")]


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_runs_and_answers_well_formed(built: Path, name: str) -> None:
    with backends.open_runner(name, model_dir=built, threads=2) as runner:
        assert runner.name == name
        for image in _images(2, seed=21):
            out = runner.infer(image)
            assert runner.last_latency_s > 0
            panoptic, scores = out["panoptic"], out["scores"]
            assert panoptic.shape == (SIZE, SIZE) and panoptic.dtype == np.int32
            assert scores.shape == (PROPOSALS,) and scores.dtype == np.float32 and np.all(np.diff(scores) <= 1e-6)
            assert np.all((scores >= 0) & (scores <= 1))
            assert out["classes"].dtype == np.int32 and np.all((out["classes"] >= 0) & (out["classes"] < 9))
            assert out["centers"].shape == (PROPOSALS, 2) and np.all((out["centers"] >= 0) & (out["centers"] < SIZE // 8))
            ids = np.unique(panoptic)
            assert np.all((ids == 0) | ((ids // LABEL_DIVISOR >= 1) & (ids // LABEL_DIVISOR <= 9)))
        big = np.asarray(generate_scene(5, 0, 100).image)  # any size goes through the letterbox policy
        assert runner.predict(big).panoptic.shape == (100, 100)


@pytest.mark.parametrize("name", ["ort", "ort-mobile"])
def test_fp32_variants_equal_pytorch(built: Path, name: str) -> None:
    with backends.open_runner("torch", model_dir=built) as ref, backends.open_runner(name, model_dir=built) as cand:
        for image in _images(3, seed=8):
            want, got = ref.infer(image), cand.infer(image)
            for key in ("classes", "centers"):
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
            # a pixel whose mask probability sits exactly at the hard-sigmoid's 0 may flip between runtimes
            assert np.mean(got["panoptic"] == want["panoptic"]) >= 0.999
            np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-4)


def test_mobile_raw_graph_returns_raw_outputs(built: Path) -> None:
    with backends.open_runner("ort-mobile", model_dir=built, graph="raw") as mobile, \
            backends.open_runner("ort", model_dir=built, graph="raw") as desktop:  # fmt: skip
        image = _images(1, seed=2)[0]
        got, want = mobile.infer(image), desktop.infer(image)
        assert set(got) == {"heatmap", "mask_logits", "scores", "classes", "centers"}
        assert got["heatmap"].shape == (9, SIZE // 8, SIZE // 8)
        np.testing.assert_allclose(got["heatmap"], want["heatmap"], atol=1e-4)
        np.testing.assert_array_equal(got["classes"], want["classes"])


def _float_producers(model: onnx.ModelProto) -> dict[str, str]:
    return {out: node.op_type for node in model.graph.node for out in node.output}


@pytest.mark.parametrize("name", ["ort-int8-static", "ort-int8-dynamic"])
def test_int8_keeps_the_post_processing_and_head_outputs_in_float(built: Path, name: str) -> None:
    source = onnx.load(str(ModelDir(built).onnx_path()))
    post = {n.name for n in source.graph.node if n.name in ort_backend.float_nodes(source) and n.op_type != "Conv"}
    model = onnx.load(str(ModelDir(built).artifact_path(name)))
    producer = _float_producers(model)
    ops = {n.op_type for n in model.graph.node}
    assert "DequantizeLinear" in ops and ("QuantizeLinear" in ops) == (name == "ort-int8-static")
    checked = set()
    for node in model.graph.node:
        if node.name in post:  # the post-processing reads float tensors that no QDQ pair rounded
            assert all(producer.get(i) != "DequantizeLinear" for i in node.input if i), (node.name, node.op_type)
            checked.add(node.op_type)
    assert set(POST_OPS) <= checked
    readers = {i: n.op_type for n in model.graph.node for i in n.input}
    heads = [n for n in model.graph.node if n.op_type == "Conv" and "/predict/" in n.name]
    assert len(heads) == 3
    for conv in heads:  # the heads' last convolutions: float weights, float outputs (their input may be rounded)
        assert producer.get(conv.input[1]) != "DequantizeLinear", conv.name
        assert all(readers.get(o) != "QuantizeLinear" for o in conv.output), conv.name
    inner = [n for n in model.graph.node if n.op_type == "Conv" and "/predict/" not in n.name]
    quantized = sum(producer.get(n.input[1]) == "DequantizeLinear" for n in inner)
    assert quantized == len(inner)
    meta = next(p.value for p in model.metadata_props if p.key == METADATA_KEY)
    assert json.loads(meta)["input_size"] == [SIZE, SIZE]


def test_float_nodes_are_found_by_graph_structure(built: Path) -> None:
    model = onnx.load(str(ModelDir(built).onnx_path()))
    keep = ort_backend.float_nodes(model)
    kinds = [n.op_type for n in model.graph.node if n.name in keep]
    assert {"Sigmoid", "MaxPool", "TopK", "ArgMax", "MatMul", "HardSigmoid"} <= set(kinds)
    mlp = [n.name for n in model.graph.node if n.name.startswith("/mlp/") and n.op_type in ("MatMul", "Gemm")]
    assert len(mlp) == 2 and set(mlp) <= keep  # the MLP's two layers (MatMul + Add after onnxsim, or Gemm) stay float
    assert kinds.count("Conv") == 3 and kinds.count("TopK") == 1
    assert sum(n.op_type == "Conv" for n in model.graph.node) > 50


def test_weight_only_int8_round_trips_within_half_a_step() -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g", [x], [y],
                              [numpy_helper.from_array(weight, "w")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    stats = ort_backend.weight_only_int8(model, keep_float=set())
    assert stats["quantized_nodes"] == 1
    onnx.checker.check_model(model)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q, scale = arrays["w__int8"], arrays["w__int8_scale"]
    assert q.dtype == np.int8 and scale.shape == (4,)
    restored = q.astype(np.float32) * scale[:, None, None, None]
    assert np.all(np.abs(restored - weight) <= scale[:, None, None, None] / 2 + 1e-7)
    assert np.allclose(np.abs(q).reshape(4, -1).max(axis=1), 127)  # per output channel, full range


# ---------------------------------------------------------------------------------------------------------------
# Listing, stale artifacts
# ---------------------------------------------------------------------------------------------------------------
def test_list_shows_every_artifact(built: Path) -> None:
    result = CliRunner().invoke(app, ["list", "--model-dir", str(built), "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    found = {(r["backend"], r["graph"]): r for r in listing["artifacts"]}
    for name in VARIANTS:
        assert found[(name, "panoptic")]["source_ok"] is True and found[(name, "panoptic")]["bytes"] > 0
    assert ("ort-mobile", "raw") in found and ("torch", "all") in found and ("ort", "raw") in found
    assert listing["input_size"] == [SIZE, SIZE] and listing["graphs"] == ["panoptic", "raw"]
    table = CliRunner().invoke(app, ["list", "--model-dir", str(built)])
    assert table.exit_code == 0 and "ort-mobile.ort" in table.output


def test_an_artifact_from_another_export_is_refused(built: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(built, folder)
    record = record_path(folder / "ort-int8-dynamic.onnx")
    data = json.loads(record.read_text())
    data["source_onnx_sha256"] = "0" * 64
    record.write_text(json.dumps(data))
    with pytest.raises(UserError, match="was built from another export of model.onnx") as info:
        backends.open_runner("ort-int8-dynamic", model_dir=folder)
    assert "--force" in _one_line(info.value)
    rows = {(r["backend"], r["graph"]): r for r in ModelDir(folder).artifacts()}
    assert rows[("ort-int8-dynamic", "panoptic")]["source_ok"] is False


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image",
    [np.zeros((SIZE, SIZE + 8, 3), np.uint8), np.zeros((SIZE, SIZE, 4), np.uint8), np.zeros((SIZE, SIZE), np.uint8),
     np.zeros((SIZE, SIZE, 3), np.float32)],
    ids=["wrong-size", "four-channels", "gray", "float"],
)
def test_wrong_image_to_a_runner_is_one_line(built: Path, image: np.ndarray) -> None:
    with backends.open_runner("ort-mobile", model_dir=built) as runner:
        with pytest.raises(UserError) as info:
            runner.infer(image)
    assert info.value.exit_code == 2
    assert f"expected a uint8 image of shape ({SIZE}, {SIZE}, 3)" in _one_line(info.value)


def _model_copy(built: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.json", "model.onnx", "model.raw.onnx", "reference.pt"):
        shutil.copy(built / name, folder / name)
    return folder


def test_truncated_and_foreign_onnx_are_one_line_exit_2(built: Path, tmp_path: Path) -> None:
    folder = _model_copy(built, tmp_path)
    graph = folder / "model.onnx"
    graph.write_bytes((built / "model.onnx").read_bytes()[: 1 << 20])
    runner = CliRunner()
    result = runner.invoke(app, ["compile", "--model-dir", str(folder), "--backend", "ort-mobile", "--graph", "panoptic"])
    line = one_line_exit_2(result)
    assert str(graph) in line and "truncated or corrupt" in line

    foreign = onnx.load(str(built / "model.onnx"))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(graph))
    result = runner.invoke(app, ["compile", "--model-dir", str(folder), "--backend", "ort-int8-dynamic",
                                 "--graph", "panoptic"])  # fmt: skip
    line = one_line_exit_2(result)
    assert str(graph) in line and "not a maskconver graph: no 'maskconver' metadata" in line
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.raw.onnx", "reference.pt"]
    with pytest.raises(UserError, match="no such ONNX file"):
        ort_backend.compile_onnx(tmp_path / "absent.onnx", tmp_path / "x.ort", "ort-mobile")


def test_calibration_problems_are_one_line_exit_2(built: Path, tmp_path: Path) -> None:
    folder = _model_copy(built, tmp_path)
    empty = tmp_path / "calibration" / "empty"
    empty.mkdir(parents=True)
    runner = CliRunner()
    base = ["compile", "--model-dir", str(folder), "--backend", "ort", "--precision", "int8-static"]
    line = one_line_exit_2(runner.invoke(app, [*base, "--calib", str(empty)]))
    assert str(empty) in line and "empty calibration folder" in line
    line = one_line_exit_2(runner.invoke(app, base))
    assert "needs a calibration set: pass --calib" in line
    line = one_line_exit_2(runner.invoke(app, [*base, "--calib", str(tmp_path / "nowhere")]))
    assert "no such calibration folder" in line
    with pytest.raises(UserError, match="needs a calibration set"):
        ort_backend.compile_onnx(folder / "model.onnx", folder / "ort-int8-static.onnx", "ort-int8-static")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.raw.onnx", "reference.pt"]


def test_names_the_backend_does_not_offer_are_one_line(built: Path) -> None:
    runner = CliRunner()
    line = one_line_exit_2(runner.invoke(app, ["compile", "--model-dir", str(built), "--backend", "ort-mobile",
                                                    "--precision", "int8-dynamic"]))  # fmt: skip
    assert "does not offer precision int8-dynamic" in line and "ort-mobile-int8-static" in line
    line = one_line_exit_2(runner.invoke(app, ["compile", "--model-dir", str(built), "--backend",
                                                    "ort-int8-static", "--precision", "fp32"]))  # fmt: skip
    assert "already says int8-static" in line
    with pytest.raises(UserError, match="no ort-int8-static artifact for the raw graph") as info:
        backends.open_runner("ort-int8-static", model_dir=built, graph="raw")
    assert "maskconver compile --model-dir" in _one_line(info.value) and "--graph raw" in str(info.value)
    with pytest.raises(UserError, match="needs --model-dir"):
        backends.open_runner("ort", checkpoint=built / "reference.pt")


# ---------------------------------------------------------------------------------------------------------------
# --force, and failures half-way through a build
# ---------------------------------------------------------------------------------------------------------------
def test_existing_artifacts_are_replaced_only_with_force(built: Path, tmp_path: Path) -> None:
    folder = _model_copy(built, tmp_path)
    for name in ("ort-int8-dynamic.onnx", "ort-int8-dynamic.onnx.json"):
        shutil.copy(built / name, folder / name)
    before = sha256_file(folder / "ort-int8-dynamic.onnx")
    (folder / "ort-int8-dynamic.onnx").write_bytes(b"an older build")
    runner = CliRunner()
    args = ["compile", "--model-dir", str(folder), "--backend", "ort-int8-dynamic", "--graph", "panoptic"]
    line = one_line_exit_2(runner.invoke(app, args))
    assert "ort-int8-dynamic.onnx: already exists; pass --force to overwrite it" in line
    assert (folder / "ort-int8-dynamic.onnx").read_bytes() == b"an older build"
    done = runner.invoke(app, [*args, "--force", "--json"])
    assert done.exit_code == 0, done.output
    assert sha256_file(folder / "ort-int8-dynamic.onnx") == before  # deterministic rebuild
    (config := folder / "ort-mobile.required_operators.config").write_text("# kept\n")
    line = one_line_exit_2(runner.invoke(app, ["compile", "--model-dir", str(folder), "--backend", "ort-mobile",
                                                    "--graph", "panoptic"]))  # fmt: skip
    assert "required_operators.config: already exists" in line and config.read_text() == "# kept\n"
    assert not (folder / "ort-mobile.ort").exists()


def _broken_graph(built: Path, path: Path) -> Path:
    """Our graph with one convolution weight stored as float64: it parses and carries our metadata, but ONNX
    Runtime refuses to build a session from it (a type error)."""
    model = onnx.load(str(built / "model.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(t for t in model.graph.initializer if t.name == conv.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    onnx.save(model, str(path))
    return path


def _failing_graph(built: Path, path: Path) -> Path:
    """Our graph with one convolution weight cut to the wrong channel count: ONNX Runtime loads it, and fails when
    it runs it, i.e. in the middle of a build (calibration, or the check after the conversion)."""
    model = onnx.load(str(built / "model.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(t for t in model.graph.initializer if t.name == conv.input[1])
    weight = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight[:, :1]), init.name))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name", ["ort-mobile", "ort-int8-static", "ort-int8-dynamic"])
def test_a_failure_half_way_leaves_nothing(built: Path, tmp_path: Path, calib_dir: Path, name: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    source = _failing_graph(built, folder / "model.onnx")
    with pytest.raises(UserError, match="ONNX Runtime fails to run it") as info:
        ort_backend.compile_onnx(source, ort_backend.artifact_path(folder, name), name, calib=calib_dir)
    assert "Conv" in _one_line(info.value)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]  # no artifact, config, record or temp file


@pytest.mark.parametrize("name", ["ort", "ort-mobile", "ort-int8-static"])
def test_a_graph_the_runtime_refuses_is_one_line(built: Path, tmp_path: Path, calib_dir: Path, name: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    source = _broken_graph(built, folder / "model.onnx")
    with pytest.raises(UserError, match="ONNX Runtime cannot load it") as info:
        ort_backend.compile_onnx(source, ort_backend.artifact_path(folder, name), name, calib=calib_dir)
    assert str(source) in _one_line(info.value)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]


def test_a_failure_during_calibration_leaves_nothing(built: Path, tmp_path: Path, calib_dir: Path) -> None:
    """A calibration image that is corrupt on disk (its manifest hash updated, so the set loads) stops the build in
    the middle of ONNX Runtime's calibration pass: no artifact, record or temporary file is left."""
    from maskconver_deploy.calibration import MANIFEST_NAME

    calib = tmp_path / "calibration"
    shutil.copytree(calib_dir, calib)
    manifest = json.loads((calib / MANIFEST_NAME).read_text())
    victim = calib / manifest["images"][5]["file"]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated photo
    manifest["images"][5]["sha256"] = sha256_file(victim)
    (calib / MANIFEST_NAME).write_text(json.dumps(manifest))
    folder = _model_copy(built, tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(UserError, match="cannot decode image") as info:
        ModelDir(folder).compile("ort-int8-static", calib=calib)
    assert str(victim) in _one_line(info.value)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_ctrl_c_during_a_compile_leaves_nothing(built: Path, tmp_path: Path) -> None:
    """SIGINT to `maskconver compile --backend ort-mobile` while the converter runs: exit 130, the model folder as
    it was, the scratch folder removed. The tiny model converts in well under a second, so the signal can come
    after the compile has finished; that attempt proves nothing and is made again (at most 5 times)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    for attempt in range(5):
        (tmp_path / f"attempt{attempt}").mkdir()
        folder = _model_copy(built, tmp_path / f"attempt{attempt}")
        before = sorted(p.name for p in folder.iterdir())
        scratch_root = tmp_path / f"tmp{attempt}"
        scratch_root.mkdir()
        env = {**os.environ, "TMPDIR": str(scratch_root)}
        command = [sys.executable, "-m", "maskconver_deploy", "compile", "--model-dir", str(folder), "--backend",
                   "ort-mobile", "--graph", "panoptic"]  # fmt: skip
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any((p / "ort").exists() or any(p.glob("*.onnx")) for p in scratch_root.glob("maskconver-ort-*")):
                break  # the scratch copy is there: the conversion is under way
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue  # the compile won the race: nothing was interrupted
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert sorted(p.name for p in folder.iterdir()) == before
        assert not list(scratch_root.glob("maskconver-*"))
        return
    pytest.fail("the compile finished before the interrupt in all 5 attempts")


def test_unavailable_runtime_is_reported_not_raised() -> None:
    status = ort_backend.availability("ort-mobile")
    assert status.ok and status.reason == ""
    with pytest.raises(BackendUnavailable):
        backends.require_backend("tensorrt") if not backends.backend_module("tensorrt").availability("tensorrt").ok \
            else pytest.skip("TensorRT runs here")  # fmt: skip

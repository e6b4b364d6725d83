"""Export: the fused graph is checked, tagged and verified; ONNX Runtime equals PyTorch at two input sizes; the
model folder is written atomically and replaced only with --force; bad input is one line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from maskconver_deploy import backends
from maskconver_deploy import export as export_mod
from maskconver_deploy.cli import app
from maskconver_deploy.data.preprocess import load_image
from maskconver_deploy.data.synthetic import generate_scene
from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import sha256_file
from maskconver_deploy.modeldir import ModelDir, onnx_meta
from maskconver_deploy.types import LABEL_DIVISOR, METADATA_KEY, OUTPUT_NAMES

from tests.conftest import one_line_exit_2

SIZE = 64
PROPOSALS = 10


def _images(size: int) -> list[np.ndarray]:
    """A synthetic scene, noise, and a real photo (center crop) when ../shared/data is present.

    No flat images: a flat area gives exactly equal heatmap values at many positions, and the order of exact ties
    in TopK is the runtime's choice, so such inputs have no single right top-N order.
    """
    from PIL import Image

    rng = np.random.default_rng(7)
    images = [np.ascontiguousarray(generate_scene(3, 1, size).image),
              rng.integers(0, 256, (size, size, 3), dtype=np.uint8)]  # fmt: skip
    photos = sorted((Path(__file__).resolve().parents[3] / "shared" / "data").rglob("*.jpg"))
    if photos:
        photo = load_image(photos[0])
        side = min(photo.shape[:2])
        top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        square = Image.fromarray(np.ascontiguousarray(photo[top : top + side, left : left + side]))
        images.append(np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8))
    return images


# ---------------------------------------------------------------------------------------------------------------
# The exported folder and graph
# ---------------------------------------------------------------------------------------------------------------
def test_model_folder_contents_and_record(tiny_model_dir: Path, tiny_checkpoint: Path) -> None:
    folder = ModelDir(tiny_model_dir)
    assert folder.graphs() == ["panoptic", "raw"]
    assert sorted(p.name for p in tiny_model_dir.iterdir() if p.is_file()) >= ["model.json", "model.onnx",
                                                                                  "model.raw.onnx", "reference.pt"]
    record = folder.record
    assert record["opset"] == 17 and "dynamo=False" in record["exporter"]
    assert record["simplifier"].startswith("onnxsim ")
    assert {"torch", "onnx", "onnxruntime", "onnxsim"} <= set(record["versions"])
    assert "Constant" not in record["graphs"]["panoptic"]["ops"]  # constants are initializers
    assert record["checkpoint"]["sha256"] == sha256_file(tiny_checkpoint) == folder.meta.checkpoint_sha256
    assert record["reference"]["same_as_checkpoint"] is True
    assert sha256_file(folder.reference_path()) == sha256_file(tiny_checkpoint)
    assert record["input"] == {"name": "image", "shape": [1, SIZE, SIZE, 3], "dtype": "uint8", "layout": "NHWC",
                               "color": "RGB"}
    for graph in ("panoptic", "raw"):
        entry = record["graphs"][graph]
        assert entry["sha256"] == sha256_file(folder.onnx_path(graph))
        assert entry["ops"]["TopK"] == 1 and entry["ops"]["Conv"] > 50
        assert sum(entry["ops"].values()) == entry["nodes"]
        check = record["verification"][graph]
        assert check["images"] == 2 and check["classes_equal"] == 1.0 and check["centers_equal"] == 1.0
        assert check["scores_max_abs_diff"] <= 1e-4
    assert record["verification"]["panoptic"]["panoptic_equal"] == 1.0
    assert {"ArgMax", "Gather", "Resize", "HardSigmoid", "MaxPool"} <= set(record["graphs"]["panoptic"]["ops"])
    assert folder.meta.input_size == (SIZE, SIZE) and folder.meta.num_proposals == PROPOSALS
    assert folder.meta.output == "panoptic" and len(folder.meta.categories) == 9


@pytest.mark.parametrize("graph", ["panoptic", "raw"])
def test_graph_is_checked_static_tagged_and_convertible(tiny_model_dir: Path, graph: str) -> None:
    path = ModelDir(tiny_model_dir).onnx_path(graph)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert export_mod.graph_problems(model) == []
    (image,) = model.graph.input
    assert image.name == "image" and image.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_value for d in image.type.tensor_type.shape.dim] == [1, SIZE, SIZE, 3]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES[graph])
    for output in model.graph.output:
        assert all(d.dim_value > 0 for d in output.type.tensor_type.shape.dim), output.name
    ops = {n.op_type for n in model.graph.node}
    assert not ops & export_mod.FORBIDDEN_OPS
    if graph == "panoptic":
        assert "ArgMax" in ops and "ReduceMax" not in ops  # the merge is ArgMax + Gather, one pass
    (topk,) = [n for n in model.graph.node if n.op_type == "TopK"]
    assert export_mod._constant(model, topk.input[1]).reshape(-1).tolist() == [PROPOSALS]
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    meta = onnx_meta(model)
    assert meta is not None and meta.output == graph and meta.input_size == (SIZE, SIZE)
    assert json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))["num_proposals"] == PROPOSALS


def test_comparison_rules_for_ties_and_boundary_pixels() -> None:
    scores = np.array([[0.9, 0.5, 0.5 + 1e-6, 0.2]], np.float32)
    want = {"scores": scores, "classes": np.array([[1, 2, 3, 4]]), "panoptic": np.zeros((1, 40, 40), np.int32)}
    swapped = {"scores": scores, "classes": np.array([[1, 3, 2, 4]]), "panoptic": want["panoptic"].copy()}
    swapped["panoptic"][0, 0, 0] = 1001  # one boundary pixel of 1600
    result = export_mod.compare_outputs(want, swapped)
    assert result["classes"]["ok"] and result["classes"]["differing_slots"] == 2  # a tie: either order is right
    assert result["panoptic"]["ok"] and result["panoptic"]["equal"] == 1 - 1 / 1600  # one boundary pixel
    swapped["panoptic"][0, 0, 1:3] = 1001  # three of 1600: below 99.9%
    assert not export_mod.compare_outputs(want, swapped)["panoptic"]["ok"]
    wrong = {**swapped, "classes": np.array([[2, 1, 3, 4]])}
    assert not export_mod.compare_outputs(want, wrong)["classes"]["ok"]  # 0.9 and 0.5 do not tie


def test_graph_problems_names_what_converters_refuse() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outs = [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("nz", "idx")]
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
             helper.make_node("TopK", ["x", "k"], ["vals", "idx"], name="top")]  # fmt: skip
    model = helper.make_model(helper.make_graph(nodes, "g", [x, k], outs))
    problems = "; ".join(export_mod.graph_problems(model))
    assert "op NonZero (nz)" in problems and "TopK top has a K computed at run time" in problems
    assert "x has a dynamic shape" in problems and "nz has a dynamic shape" in problems


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime equals PyTorch, at two input sizes (fused post-processing must not depend on the traced size)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def variant_96(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("variant") / "s96-n7"
    export_mod.export_variant(ModelDir(tiny_model_dir), target, input_size=(96, 96), num_proposals=7)
    return target


def test_variant_keeps_the_weights_and_changes_the_shape(tiny_model_dir: Path, variant_96: Path) -> None:
    source, variant = ModelDir(tiny_model_dir), ModelDir(variant_96)
    assert variant.meta.input_size == (96, 96) and variant.meta.num_proposals == 7
    assert variant.meta.checkpoint_sha256 == source.meta.checkpoint_sha256
    assert variant.record["variant_of"] == str(source.path)
    assert variant.record["reference"]["same_as_checkpoint"] is False  # saved with the 96x96 spec
    assert variant.record["verification"]["panoptic"]["panoptic_equal"] == 1.0


@pytest.mark.parametrize("which", ["native-64", "variant-96"])
def test_onnxruntime_equals_pytorch(tiny_model_dir: Path, variant_96: Path, which: str) -> None:
    folder = tiny_model_dir if which == "native-64" else variant_96
    size = ModelDir(folder).meta.input_size[0]
    with backends.open_runner("torch", model_dir=folder, threads=2) as ref, \
            backends.open_runner("ort", model_dir=folder, threads=2) as ort:  # fmt: skip
        segments = 0
        for image in _images(size):
            want, got = ref.infer(image), ort.infer(image)
            # a pixel whose mask probability sits exactly at the hard-sigmoid's 0 may flip between runtimes
            assert np.mean(got["panoptic"] == want["panoptic"]) >= 0.999
            np.testing.assert_array_equal(got["classes"], want["classes"])
            np.testing.assert_array_equal(got["centers"], want["centers"])
            np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-4)
            assert got["panoptic"].shape == (size, size) and got["panoptic"].dtype == np.int32
            ids = np.unique(got["panoptic"])
            assert np.all((ids == 0) | ((ids // LABEL_DIVISOR >= 1) & (ids // LABEL_DIVISOR <= 9)))
            segments += int((ids > 0).sum())
        assert segments > 0  # the maps hold real segments, not only VOID
    with backends.open_runner("torch", model_dir=folder, graph="raw") as ref, \
            backends.open_runner("ort", model_dir=folder, graph="raw") as ort:  # fmt: skip
        image = _images(size)[0]
        want, got = ref.infer(image), ort.infer(image)
        assert got["heatmap"].shape == (9, size // 8, size // 8)
        np.testing.assert_allclose(got["heatmap"], want["heatmap"], atol=1e-3, rtol=1e-4)
        scale = max(1.0, float(np.abs(want["mask_logits"]).max()))
        assert float(np.abs(got["mask_logits"] - want["mask_logits"]).max()) <= 1e-4 * scale
        np.testing.assert_array_equal(got["classes"], want["classes"])


CASES = (((96, 64), 13, ("panoptic", "semantic")), ((64, 64), 5, ("panoptic",)), ((64, 96), 7, ("panoptic",)))
MERGE_CASES = [
    pytest.param("input", CASES[:1]), pytest.param("feature", CASES[1:2]), pytest.param("official", CASES[2:]),
    pytest.param("input-legacy", CASES[1:2]),
    *(pytest.param(m, CASES, marks=pytest.mark.slow, id=f"{m}-all") for m in ("input", "feature", "official")),
]  # the default run: one size and count per path (one export is ~10-50 s here); slow: every case for each


@pytest.mark.parametrize(("merge", "cases"), MERGE_CASES)
def test_each_merge_path_exports_at_several_sizes_and_counts(tiny_checkpoint: Path, tmp_path: Path, merge: str,
                                                             cases: tuple) -> None:  # fmt: skip
    """Each path exports, verifies (ONNX Runtime = PyTorch) and records itself; the torch reference reads it back."""
    for size, proposals, graphs in cases:
        folder = export_mod.export(tiny_checkpoint, tmp_path / f"{merge}-{size[0]}-{proposals}", size=size,
                                   proposals=proposals, graphs=graphs, merge=merge)  # fmt: skip
        meta, record = folder.meta, folder.record
        assert (meta.merge, meta.input_size, meta.num_proposals) == (merge, size, proposals)
        assert meta.mask_activation == ("sigmoid" if merge == "official" else "hard-sigmoid")
        assert record["merge"]["path"] == merge
        assert record["merge"]["resolution"] == ([size[0] // 8, size[1] // 8] if merge == "feature" else list(size))
        assert onnx_meta(onnx.load(str(folder.onnx_path()))).merge == merge
        for graph in graphs:
            assert record["verification"][graph][f"{graph}_equal"] == 1.0
        ops = record["graphs"]["panoptic"]["ops"]
        assert ("ScatterElements" in ops) == (merge != "input-legacy")  # owner histogram instead of N x H x W Equal
        assert export_mod.graph_problems(onnx.load(str(folder.onnx_path()))) == []
        with backends.open_runner("torch", model_dir=folder.path) as ref:
            assert ref._deploy.merge == merge  # noqa: SLF001 - the path the reference computes


def test_unknown_merge_or_activation_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    for args, word in ((["--merge", "nearest"], "merge"), (["--mask-activation", "relu"], "activation")):
        result = CliRunner().invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--out",
                                          str(tmp_path / "x"), *args])  # fmt: skip
        assert word in one_line_exit_2(result)


# ---------------------------------------------------------------------------------------------------------------
# Command line: --force, bad input, interruption
# ---------------------------------------------------------------------------------------------------------------
def test_export_command_force_and_graph_choice(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "tiny"
    out.mkdir(parents=True)
    (out / "model.json").write_text("{}")
    (out / "ort-int8-static.onnx").write_bytes(b"compiled from an older export")
    runner = CliRunner()
    refused = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                                  "--output", "semantic"])  # fmt: skip
    line = one_line_exit_2(refused)
    assert "already holds an exported model (model.json)" in line and "--force" in line
    assert (out / "model.json").read_text() == "{}"

    done = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--output",
                               "semantic", "--proposals", "6", "--force", "--json"])  # fmt: skip
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output[done.output.index("{"):])
    assert list(summary["export"]["graphs"]) == ["semantic"]
    folder = ModelDir(out)
    assert folder.graphs() == ["semantic"] and folder.meta.num_proposals == 6
    assert (out / "model.semantic.onnx").is_file() and not (out / "model.onnx").exists()
    assert (out / "ort-int8-static.onnx").is_file()  # other files in the folder are left alone
    assert folder.record["verification"]["semantic"]["semantic_equal"] == 1.0
    assert not [p for p in tmp_path.rglob(".maskconver-tmp-*")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "100"], "multiple of the output stride 16"),
        (["--proposals", "5000"], "--proposals 5000: must be in 1..576"),
        (["--output", "panoptic,depth"], "unknown graph 'depth'"),
    ],
)
def test_export_bad_options_are_one_line(tiny_checkpoint: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "m"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), *args])
    assert message in one_line_exit_2(result)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_bad_checkpoints_are_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:4096])
    for path, message in ((truncated, "truncated"), (tmp_path / "absent.pt", "no such checkpoint")):
        result = CliRunner().invoke(app, ["export", "--checkpoint", str(path), "--out", str(tmp_path / "m")])
        line = one_line_exit_2(result)
        assert str(path) in line and message in line
    assert not (tmp_path / "m").exists()


def test_interrupted_export_leaves_the_folder_as_it_was(tiny_model_dir: Path, tiny_checkpoint: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()}

    def interrupt(model):  # Ctrl-C arrives while the first graph is being simplified
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_simplify", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export(tiny_checkpoint, folder, force=True)
    assert {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind
    with pytest.raises(KeyboardInterrupt):
        export_mod.export(tiny_checkpoint, tmp_path / "new", force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_model_dir_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such model folder"):
        ModelDir(tmp_path / "absent")
    with pytest.raises(UserError, match="not a model folder: no model.json"):
        ModelDir(tmp_path)
    (tmp_path / "model.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        ModelDir(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not a model sidecar"):
        ModelDir(tmp_path)

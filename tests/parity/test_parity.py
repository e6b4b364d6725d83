"""Parity on the tiny model with real runtimes: every ORT artifact against the PyTorch reference, out-of-domain
inputs, a second input size, a really faulty artifact (and bisection to its node), and the command's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maskconver_deploy.cli import app
from maskconver_deploy.data import load_split
from maskconver_deploy.data.synthetic import write_dataset
from maskconver_deploy.modeldir import ModelDir
from maskconver_deploy.parity import bisect_onnx, bisect_support, run_parity
from maskconver_deploy.results import load_parity
from maskconver_deploy.types import INPUT_NAME

from tests.parity import artifacts

FP32 = ("ort", "ort-mobile")
INT8 = ("ort-int8-dynamic", "ort-int8-static")
# Measured on the tiny random-weight model and its 4 val scenes (pixel agreement / top-N match / PQ with the
# reference's answers as ground truth): int8-dynamic 60.4 / 60.0 / 30.0, int8-static 63.6 / 42.5 / 31.7.
TINY_INT8_FLOORS = {
    "ort-int8-dynamic": {"pixel": 50.0, "topn": 45.0, "pq_vs_reference": 20.0},
    "ort-int8-static": {"pixel": 50.0, "topn": 30.0, "pq_vs_reference": 20.0},
}


def _by_name(result: dict) -> dict[str, dict]:
    return {c["backend"]: c for c in result["candidates"]}


def _assert_fp32_pass(entry: dict) -> None:
    assert entry["verdict"] == "pass", entry["reason"]
    assert entry["decision"]["pixel_agreement"] >= 99.9
    assert abs(entry["metric"]["delta_pq"]) < 0.005


def test_fp32_pass_and_int8_report_their_numbers(parity_model_dir: Path, parity_val: Path, tmp_path: Path) -> None:
    meta, records = load_split(parity_val, "val")
    result = run_parity(parity_model_dir, [*FP32, *INT8], records=records, meta=meta, threads=1)
    found = _by_name(result)
    assert result["n_images"] == artifacts.VAL_IMAGES and result["reference"] == "torch"
    for name in FP32:
        entry = found[name]
        _assert_fp32_pass(entry)
        tensor = entry["tensor"]
        assert tensor["available"] and tensor["aligned_proposals"] == tensor["reference_proposals"] > 0
        assert tensor["heatmap"]["max_abs_err"] < 1e-3 and tensor["heatmap"]["cosine"] > 0.99999
        assert tensor["mask_logits"]["cosine"] > 0.99999
        assert entry["decision"]["topn_match"] == 100.0
        check = entry["decision"]["merge_check"]  # the fused merge on its own tensors = the reference merge
        assert check["available"] and check["pixels"] > 0 and check["pixels_differ"] == 0, check
        assert "merge check: 0 of" in entry["reason"]
        metric = entry["metric"]  # mask AP (things) from the same images: an exact runtime changes nothing
        assert metric["mask_ap_reference"] is not None and metric["delta_mask_ap"] == 0.0
    for name in INT8:
        entry = found[name]
        decision = entry["decision"]
        # the tiny model has random weights: int8 keeps the answer only in part, and the verdict says so (the
        # agreement floors of the shipped model fail here although ΔPQ is 0: PQ against this ground truth is 0)
        assert entry["verdict"] == "fail" and "pixel agreement" in entry["reason"], entry["reason"]
        floor = TINY_INT8_FLOORS[name]  # measured on this model, minus a margin: a broken quantiser falls below
        assert decision["pixel_agreement"] >= floor["pixel"] and decision["topn_match"] >= floor["topn"], decision
        assert entry["metric"]["pq_vs_reference"] >= floor["pq_vs_reference"], entry["metric"]
        assert entry["tensor"]["available"]
        assert entry["tensor"]["heatmap"]["max_abs_err"] > 1e-3  # quantised: really a different computation
        for key in ("pq", "pq_reference", "delta_pq", "pq_vs_reference"):
            assert isinstance(entry["metric"][key], float)
    assert found["ort-int8-static"]["build"]["calibration_manifest_hash"]
    assert "calibration_manifest_hash" not in (found["ort-int8-dynamic"]["build"] or {})
    path = tmp_path / "parity.json"
    path.write_text(json.dumps(result))
    rows = {r.backend: r for r in load_parity(path)}
    assert rows["ort"].verdict == "pass" and rows["ort-int8-static"].delta_pq is not None


def test_int8_pq_drop_on_a_set_labelled_by_the_reference(parity_model_dir: Path, parity_val: Path, tmp_path: Path) -> None:
    """Ground truth = the reference's own answers: the reference scores PQ 100, and an int8 candidate's PQ drop is
    exactly its disagreement. A failing int8 candidate with --bisect is told why bisection does not apply."""
    from maskconver_deploy import backends
    from maskconver_deploy.data import load_example

    meta, records = load_split(parity_val, "val")
    images = [load_example(r)[0] for r in records]
    with backends.open_runner("torch", model_dir=parity_model_dir) as torch_runner:
        answers = [torch_runner.predict(image) for image in images]
        categories = list(torch_runner.meta.categories)
    data = artifacts.images_dataset(tmp_path / "labelled", images, categories, answers)
    meta, records = load_split(data, "val")
    result = run_parity(parity_model_dir, ["ort", *INT8], records=records, meta=meta, threads=1, bisect=True)
    found = _by_name(result)
    assert result["reference_pq"]["all"]["pq"] == pytest.approx(100.0) and result["reference_pq"]["all"]["n"] > 0
    _assert_fp32_pass(found["ort"])
    assert found["ort"]["metric"]["pq"] == pytest.approx(100.0)
    assert found["ort"]["bisect"]["ran"] is False  # it passed: nothing to bisect
    for name in INT8:
        entry = found[name]
        # the ground truth is the reference's answers: the drop is exactly the candidate's disagreement
        assert entry["metric"]["pq_vs_reference"] == pytest.approx(entry["metric"]["pq"])
        assert entry["metric"]["delta_pq"] == pytest.approx(entry["metric"]["pq"] - 100.0)
        assert entry["metric"]["delta_pq"] < -1.0  # random weights: int8 changes the answer beyond the budget
        assert entry["verdict"] == "fail" and "|ΔPQ|" in entry["reason"]
        assert entry["bisect"]["ran"] is False and "quantised" in entry["bisect"]["reason"]


def test_parity_on_noise_and_a_real_photo(parity_model_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    from maskconver_deploy.data import load_image

    rng = np.random.default_rng(7)
    photo = load_image(sorted((shared_data / "coco_panoptic_sample" / "input_images").glob("*.jpg"))[0])
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (50, 90, 3), dtype=np.uint8), photo]
    categories = ModelDir(parity_model_dir).meta.categories
    data = artifacts.images_dataset(tmp_path / "unseen", images, categories)
    meta, records = load_split(data, "val")
    result = run_parity(parity_model_dir, list(FP32), records=records, meta=meta, threads=1)
    for entry in result["candidates"]:
        _assert_fp32_pass(entry)
        assert entry["metric"]["labelled"] is False and "note" in entry["metric"]  # no ground-truth segments
        assert "PQ vs the reference's answers 100.000 > 99.995" in entry["reason"]  # judged against the reference
        assert entry["decision"]["segments_reference"] > 0  # the model did answer something on these images


def test_parity_at_a_second_input_size(parity_model_dir: Path, tmp_path: Path) -> None:
    """A second export at 64x96 (non-square: the letterbox pads on the right). Not 96x96: there this random-weight
    model saturates many scores to exactly 1.0, where torch.topk orders the ties differently from ONNX TopK (lower
    index first), the merge then breaks mask ties by slot, and parity rightly reports the disagreement."""
    from maskconver_deploy import export as export_mod

    folder = export_mod.export(ModelDir(parity_model_dir).reference_path(), tmp_path / "m64x96", size=(64, 96), force=True)
    assert tuple(folder.meta.input_size) == (64, 96)
    folder.compile("ort-mobile")
    data = write_dataset(tmp_path / "d96", n=6, size=96, seed=3, val_fraction=0.5).out
    meta, records = load_split(data, "val")
    result = run_parity(folder.path, list(FP32), records=records, meta=meta, threads=1)
    assert result["model"]["input_size"] == [64, 96]
    found = _by_name(result)
    _assert_fp32_pass(found["ort"])
    _assert_fp32_pass(found["ort-mobile"])
    assert found["ort"]["decision"]["segments_reference"] > 0
    assert found["ort"]["tensor"]["available"] and not found["ort-mobile"]["tensor"]["available"]  # no .raw.ort built
    assert "maskconver compile" in found["ort-mobile"]["tensor"]["reason"]


def test_cli_table_json_out_and_no_overwrite(parity_model_dir: Path, parity_val: Path, tmp_path: Path) -> None:
    out = tmp_path / "parity.json"
    args = ["parity", "--model-dir", str(parity_model_dir), "--candidates", "ort,ort-mobile", "--data", str(parity_val),
            "--threads", "1", "--json-out", str(out)]  # fmt: skip
    runner = CliRunner()
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "pass" in done.output and "ort-mobile" in done.output and "ΔPQ" in done.output
    saved = json.loads(out.read_text())
    assert [c["backend"] for c in saved["candidates"]] == ["ort", "ort-mobile"]
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    as_json = runner.invoke(app, [*args[:-2], "--json"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)["data"]["generated"] is False


def test_cli_generates_data_when_none_is_given(parity_model_dir: Path) -> None:
    done = CliRunner().invoke(app, ["parity", "--model-dir", str(parity_model_dir), "--candidates", "ort", "--n", "2", "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["n_images"] == 2 and result["data"]["generated"] is True and result["data"]["seed"] == 1
    assert result["candidates"][0]["verdict"] == "pass"


@pytest.fixture(scope="module")
def perturbed(parity_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    return artifacts.perturbed_model_dir(parity_model_dir, tmp_path_factory.mktemp("perturbed") / "model")


def test_a_perturbed_artifact_fails_and_bisect_names_its_node(perturbed: tuple[Path, str, str], parity_val: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    folder, weight, node = perturbed
    out = tmp_path / "parity.json"
    done = CliRunner().invoke(app, ["parity", "--model-dir", str(folder), "--candidates", "ort", "--data", str(parity_val),
                                    "--threads", "1", "--bisect", "--json-out", str(out)])  # fmt: skip
    assert done.exit_code == 1, done.output
    assert "failed parity" in done.output and "Traceback" not in done.output
    entry = json.loads(out.read_text())["candidates"][0]
    assert entry["verdict"] == "fail" and entry["decision"]["pixel_agreement"] < 99.9
    bisect = entry["bisect"]
    assert bisect["ran"] and bisect["first_node"]["name"] == node
    assert bisect["first_node"]["changed_inputs"] == [weight]
    assert [c["name"] for c in bisect["changed_initializers"]] == [weight]
    assert "fresh export" in bisect["source_note"]  # model.onnx no longer matches its export record
    assert "".join(f"first node outside tolerance: {node}".split()) in "".join(done.output.split())


def test_bisect_onnx_finds_the_node_and_nothing_on_an_intact_graph(perturbed: tuple[Path, str, str],
                                                                   parity_model_dir: Path) -> None:  # fmt: skip
    folder, weight, node = perturbed
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    source = parity_model_dir / "model.onnx"
    found = bisect_onnx(folder / "model.onnx", source, {INPUT_NAME: image}, threads=1, batch=40)
    assert found["first_node"]["name"] == node and found["first_node"]["op_type"] == "Conv"
    assert found["tensors_compared"] < found["tensors_paired"]  # it stopped at the fault
    intact = bisect_onnx(source, source, {INPUT_NAME: image}, threads=1)
    assert intact["first_node"] is None and intact["tensors_compared"] == intact["tensors_paired"] > 100
    assert intact["changed_initializers"] == []


def test_bisect_support_says_why_not() -> None:
    assert bisect_support("ort") == (True, "")
    for name, words in [("ort-mobile", "ORT-format"), ("tflite", "onnx2tf"), ("tensorrt", "TensorRT"),
                        ("ort-int8-static", "quantised"), ("torch", "PyTorch")]:  # fmt: skip
        ok, why = bisect_support(name)
        assert not ok and words in why, why


def test_explicit_candidates_that_cannot_run_are_skipped_with_reasons_and_exit_2(parity_model_dir: Path,
                                                                                 parity_val: Path) -> None:  # fmt: skip
    done = CliRunner().invoke(app, ["parity", "--model-dir", str(parity_model_dir), "--candidates",
                                    "ort,ort-mobile-int8-static,tensorrt", "--data", str(parity_val), "--json"])  # fmt: skip
    assert done.exit_code == 2, done.output
    result = json.loads(done.stdout)
    found = _by_name(result)
    assert found["ort"]["verdict"] == "pass"
    assert found["ort-mobile-int8-static"]["verdict"] == "skipped"
    assert "maskconver compile" in found["ort-mobile-int8-static"]["reason"]
    assert found["tensorrt"]["verdict"] == "skipped" and found["tensorrt"]["reason"]
    assert done.stderr.strip().splitlines()[-1].startswith("error: requested candidates could not run")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model-dir", "/nonexistent/model"], "no such model folder"),
        (["--candidates", "ort-int4"], "unknown backend 'ort-int4'"),
        (["--data", "/nonexistent/data"], "no such data folder"),
        (["--candidates", "torch"], "no candidates"),
    ],
)
def test_bad_input_is_one_line_exit_2(parity_model_dir: Path, parity_val: Path, args: list[str], words: str) -> None:
    base = {"--model-dir": str(parity_model_dir), "--candidates": "ort", "--data": str(parity_val)}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    done = CliRunner().invoke(app, ["parity", *[x for kv in base.items() for x in kv]])
    assert done.exit_code == 2, done.output
    assert words in done.output and "Traceback" not in done.output
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")


def test_merge_check_reproduces_the_fused_merge_and_fails_on_another_path(parity_model_dir: Path,
                                                                          parity_val: Path) -> None:  # fmt: skip
    """The reference merge of ORT's own raw tensors gives ORT's panoptic map exactly; the same tensors merged by
    another path (a post-processing that computes something else) differ, so the check can fail."""
    import dataclasses

    from maskconver_deploy import backends
    from maskconver_deploy.data.coco_panoptic import load_example
    from maskconver_deploy.data.preprocess import letterbox
    from maskconver_deploy.parity import merge_raw_tensors

    meta = ModelDir(parity_model_dir).meta
    assert meta.merge == "input"
    panoptic = backends.open_runner("ort", model_dir=parity_model_dir, threads=1, graph="panoptic")
    raw = backends.open_runner("ort", model_dir=parity_model_dir, threads=1, graph="raw")
    panoptic.open()
    raw.open()
    _, records = load_split(parity_val, "val")
    other = dataclasses.replace(meta, merge="feature")
    differ = 0
    try:
        for record in records:
            boxed, _ = letterbox(load_example(record)[0], tuple(meta.input_size))
            fused = np.asarray(panoptic.infer(boxed)["panoptic"]).reshape(boxed.shape[:2])
            tensors = raw.infer(boxed)
            assert np.array_equal(merge_raw_tensors(tensors, meta), fused)
            differ += int(np.count_nonzero(merge_raw_tensors(tensors, other) != fused))
    finally:
        panoptic.close()
        raw.close()
    assert differ > 0

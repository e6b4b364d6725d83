"""A verdict must be able to fail: artifacts that exist but are broken make `parity --candidates all`, `bench` and
`pipeline` exit 1 with the reason, while artifacts that are merely not built here stay skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maskconver_deploy.cli import app
from maskconver_deploy.modeldir import record_path

from tests.parity import artifacts

TRUNCATED, STALE, RAISES = "ort-mobile", "ort-int8-static", "ort-int8-dynamic"


@pytest.fixture(scope="module")
def broken(parity_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model folder with three broken artifacts and the rest intact:
    - ort-mobile.ort truncated to half its bytes (it cannot be loaded);
    - ort-int8-static.onnx's build record names another export of model.onnx (stale);
    - ort-int8-dynamic.onnx given an extra output that ONNX Runtime's Reshape kernel rejects when it runs: the
      graph loads, and raises on every image."""
    base = tmp_path_factory.mktemp("broken")
    folder = base / "model"
    shutil.copytree(parity_model_dir, folder)
    mobile = folder / "ort-mobile.ort"
    data = mobile.read_bytes()
    mobile.write_bytes(data[: len(data) // 2])
    record = record_path(folder / "ort-int8-static.onnx")
    content = json.loads(record.read_text())
    content["source_onnx_sha256"] = "0" * 64
    record.write_text(json.dumps(content))
    _raise_at_run_time(folder / "ort-int8-dynamic.onnx")
    return folder


def _raise_at_run_time(path: Path) -> None:
    """Add `Reshape(image, [max(image) + 7777, -1])` as an output: the shape is data-dependent, so the graph loads,
    and no divisor of 64 * 64 * 3 = 12288 lies in 7777..8032, so every run fails inside ONNX Runtime."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    name = model.graph.input[0].name
    nodes = [
        helper.make_node("Cast", [name], ["bad_i64"], to=TensorProto.INT64),
        helper.make_node("ReduceMax", ["bad_i64"], ["bad_max"], keepdims=1),
        helper.make_node("Add", ["bad_max", "bad_offset"], ["bad_rows"]),
        helper.make_node("Reshape", ["bad_rows", "bad_one"], ["bad_rows1"]),
        helper.make_node("Concat", ["bad_rows1", "bad_rest"], ["bad_shape"], axis=0),
        helper.make_node("Reshape", [name, "bad_shape"], ["bad_output"]),
    ]
    model.graph.initializer.extend([
        helper.make_tensor("bad_offset", TensorProto.INT64, [1, 1, 1, 1], [7777]),
        helper.make_tensor("bad_one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("bad_rest", TensorProto.INT64, [1], [-1]),
    ])  # fmt: skip
    model.graph.node.extend(nodes)
    model.graph.output.append(helper.make_tensor_value_info("bad_output", TensorProto.UINT8, None))
    onnx.save(model, str(path))


def _by_name(result: dict) -> dict[str, dict]:
    return {c["backend"]: c for c in result["candidates"]}


def test_parity_all_fails_on_broken_artifacts_and_skips_unbuilt_ones(broken: Path, parity_val: Path,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "parity.json"
    done = CliRunner().invoke(app, ["parity", "--model-dir", str(broken), "--candidates", "all", "--data",
                                    str(parity_val), "--threads", "1", "--json-out", str(out)])  # fmt: skip
    assert done.exit_code == 1, done.output
    assert "3 of" in done.output and "failed parity" in done.output and "Traceback" not in done.output
    found = _by_name(json.loads(out.read_text()))
    assert found[TRUNCATED]["verdict"] == "error" and "cannot be loaded" in found[TRUNCATED]["reason"]
    assert found[STALE]["verdict"] == "fail" and "another export" in found[STALE]["reason"]
    assert found[RAISES]["verdict"] == "error" and "on image" in found[RAISES]["reason"]
    assert found["ort"]["verdict"] == "pass"
    # not built here: skipped with the command that builds it, or with why the runtime cannot run
    assert found["ort-mobile-int8-static"]["verdict"] == "skipped"
    assert "maskconver compile" in found["ort-mobile-int8-static"]["reason"]
    for name in (TRUNCATED, STALE, RAISES):  # the table shows the reason too
        assert name in done.output


def test_bench_exits_1_on_broken_artifacts(broken: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = CliRunner().invoke(app, ["bench", "--model-dir", str(broken), "--backends",
                                    f"ort,{TRUNCATED},{STALE},{RAISES},ort-mobile-int8-static", "--threads", "1",
                                    "--quick", "--no-network", "--json-out", str(out)])  # fmt: skip
    assert done.exit_code == 1, done.output
    assert "3 backend(s) failed" in done.output and "Traceback" not in done.output
    entries = {e["backend"]: e for e in json.loads(out.read_text())["entries"]}
    for name in (TRUNCATED, STALE, RAISES):
        assert entries[name]["status"] == "failed" and entries[name]["reason"], entries[name]
    assert "another export" in entries[STALE]["reason"]
    assert entries["ort"]["status"] == "ok" and entries["torch"]["status"] == "ok"
    assert entries["ort-mobile-int8-static"]["status"] == "skipped"  # not built: not a failure


def test_a_bad_calibration_set_fails_the_pipeline_after_the_report(tmp_path: Path) -> None:
    """A calibration set whose image no longer matches its manifest: the int8 build fails (a build this machine
    can do), the run goes on, writes the report naming the failure, and exits 1."""
    from maskconver_deploy.calibration import make_calibration

    from tests.bench import tinymodel

    checkpoint = tinymodel.make_checkpoint(tmp_path / "tiny.pt")
    calib = tmp_path / "calib"
    make_calibration(artifacts.val_data(tmp_path), calib, n=2, split="train", force=True)
    image = sorted((calib / "images").iterdir())[0]
    image.write_bytes(image.read_bytes()[:-7] + b"garbage")
    out = tmp_path / "reports" / "broken"
    done = CliRunner().invoke(app, ["pipeline", "--checkpoint", str(checkpoint), "--backends", "torch,ort,ort-int8-static",
                                    "--out", str(out), "--work", str(tmp_path / "work"), "--quick", "--n", "2",
                                    "--calib", str(calib)])  # fmt: skip
    assert done.exit_code == 1, done.output
    record = json.loads((out / "results" / "pipeline.json").read_text())
    states = {b["backend"]: b for b in record["backends"]}
    assert states["ort-int8-static"]["status"] == "failed" and states["ort"]["status"] == "ok"
    assert [line for line in record["failures"] if line.startswith("build ")] == record["failures"]
    assert record["failures"][0].startswith("build ort-int8-static") and "sha256" in record["failures"][0]
    report = (out / "report.md").read_text()
    assert "1 failure(s) in this run" in report and "build ort-int8-static" in report


def test_a_step_that_raises_is_a_failure_not_a_skip() -> None:
    from maskconver_deploy.pipeline import Steps

    steps = Steps(lambda message: None)

    def broken_import() -> str:
        raise ImportError("No module named 'maskconver_deploy.nothing'")

    steps.run("parity", broken_import)
    assert steps.records[0]["status"] == "failed" and "ImportError" in steps.records[0]["detail"]
    with pytest.raises(Exception, match="pipeline step export failed"):
        steps.run("export", broken_import)  # nothing can run after a failed export: the run stops

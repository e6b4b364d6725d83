"""The TFLite post-processing converter (backends/tflite/tail.py) on small hand-made ONNX graphs, converted by the
real TFLite converter and run by the real LiteRT interpreter (XNNPACK) in the onnx2tf environment (a subprocess:
that environment pins numpy 1 and TensorFlow). Checks exact values at the edges of each rewrite."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maskconver_deploy.backends import tflite
from maskconver_deploy.model.postprocess import half_threshold

from tests.conftest import require_runtime

# Runs in the onnx2tf environment: tail graph -> TensorFlow (TailConverter) -> .tflite -> LiteRT on the given inputs.
_SCRIPT = r"""
import json, sys
import numpy as np, onnx, tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from maskconver_deploy.backends.tflite.tail import TailConverter

model = onnx.load(sys.argv[1])
stored = np.load(sys.argv[2])
names, outs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
runs = sorted({int(key.split("__")[0]) for key in stored.files})
feeds = [{n: stored[f"{r}__{n}"] for n in names} for r in runs]
tail = TailConverter(model)
specs = [tf.TensorSpec(feeds[0][n].shape, tf.as_dtype(feeds[0][n].dtype), n) for n in names]
fn = tf.function(lambda *xs: [tf.convert_to_tensor(tail(dict(zip(names, xs)))[o]) for o in outs], input_signature=specs)
conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
interp = Interpreter(model_content=conv.convert(), num_threads=2)
interp.allocate_tensors()
got = sorted(interp.get_output_details(), key=lambda d: d["name"])
results = {}
for r, feed in zip(runs, feeds):
    for detail, name in zip(interp.get_input_details(), names):
        interp.set_tensor(detail["index"], feed[name])
    interp.invoke()
    results.update({f"{r}__{i}": interp.get_tensor(d["index"]) for i, d in enumerate(got)})
np.savez(sys.argv[3], **results)
print(json.dumps([op["op_name"] for op in interp._get_ops_details()]))
"""


def run_in_litert(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], tmp_path: Path,
                  op_list: bool = False) -> tuple[list, Any]:  # fmt: skip
    """(per feed: outputs in the order of the model's outputs; the set of op names in the .tflite, or with `op_list`
    every op's name in order) of a post-processing graph (float32 inputs) converted by TailConverter and run by
    LiteRT, in the onnx2tf environment."""
    import os

    require_runtime("ai_edge_litert", "the LiteRT interpreter", tflite.HINT_LITERT)
    executable, where = tflite.find_onnx2tf()
    if executable is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and onnx2tf is not installed ({where})", pytrace=False)
        pytest.skip(f"onnx2tf is not installed ({where}; {tflite.HINT_ONNX2TF})")
    python = tflite._python_of(executable)
    package_dir = Path(tflite.__file__).resolve().parents[2]
    shim = tmp_path / "pkg"
    shim.mkdir(parents=True)
    (shim / package_dir.name).symlink_to(package_dir, target_is_directory=True)
    onnx.save(model, tmp_path / "tail.onnx")
    np.savez(tmp_path / "feeds.npz", **{f"{r}__{n}": v for r, feed in enumerate(feeds) for n, v in feed.items()})
    (tmp_path / "run.py").write_text(_SCRIPT)
    env = {"PYTHONPATH": str(shim), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(python), str(tmp_path / "run.py"), str(tmp_path / "tail.onnx"),
                           str(tmp_path / "feeds.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    ops = names if op_list else set(names)
    loaded = np.load(tmp_path / "out.npz")
    outputs = range(len(model.graph.output))
    return [[loaded[f"{r}__{i}"] for i in outputs] for r in range(len(feeds))], ops


def _edge_values(c: float) -> np.ndarray:
    """Floats around a threshold c and the extremes: c, its neighbours, 0, -0, denormals, huge values, inf."""
    f = np.float32
    c32 = f(c)
    near = [np.nextafter(c32, f(np.inf)), np.nextafter(c32, f(-np.inf)), c32]
    for _ in range(3):
        near += [np.nextafter(near[-3], f(np.inf)), np.nextafter(near[-2], f(-np.inf))]
    extremes = [0.0, -0.0, 1e-45, -1e-45, 1e-39, -1e-39, 1.17549435e-38, 3.0e38, -3.0e38, 3.4028235e38, np.inf, -np.inf,
                c32 * f(0.5), c32 * f(2.0), -c32, 1.0, -1.0, 6.0, -6.0]  # fmt: skip
    rng = np.random.default_rng(0)
    return np.concatenate([np.array(near + extremes, dtype=np.float32), rng.normal(0, 3, 4096).astype(np.float32),
                           (c32 + rng.normal(0, 1e-6, 4096)).astype(np.float32)])  # fmt: skip


def test_greater_then_cast_to_float_is_exact_and_runs_in_xnnpack(tmp_path: Path) -> None:
    """Greater(x, c) read only by Cast(float) becomes arithmetic (no GREATER / CAST op, XNNPACK runs it) with exactly
    the 0.0 / 1.0 of the comparison, for the merge's half thresholds and other constants; a Greater read as a bool
    stays a GREATER."""
    thresholds = [half_threshold("hard-sigmoid"), half_threshold("sigmoid"), 0.5, -0.75, 3.0, 1e-20]
    values = np.concatenate([_edge_values(c) for c in thresholds])
    nodes, outputs, inits = [], [], []
    for i, c in enumerate(thresholds):
        inits.append(helper.make_tensor(f"c{i}", TensorProto.FLOAT, [], [c]))
        nodes += [helper.make_node("Greater", ["x", f"c{i}"], [f"g{i}"]),
                  helper.make_node("Cast", [f"g{i}"], [f"y{i}"], to=TensorProto.FLOAT)]  # fmt: skip
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [values.size]))
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [values.size])],
                              outputs, inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (got,), ops = run_in_litert(model, [{"x": values}], tmp_path)
    for c, out in zip(thresholds, got, strict=True):
        np.testing.assert_array_equal(out, (values > np.float32(c)).astype(np.float32), err_msg=f"threshold {c}")
    assert not {"GREATER", "CAST"} & ops, ops


def test_a_greater_read_as_bool_stays_a_comparison(tmp_path: Path) -> None:
    values = _edge_values(0.25)
    init = helper.make_tensor("c", TensorProto.FLOAT, [], [0.25])
    nodes = [helper.make_node("Greater", ["x", "c"], ["g"]),
             helper.make_node("Cast", ["g"], ["y"], to=TensorProto.FLOAT),
             helper.make_node("Where", ["g", "x", "c"], ["w"])]  # fmt: skip
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [values.size]) for n in ("w", "y")]
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [values.size])],
                              outputs, [init])  # fmt: skip
    (got,), ops = run_in_litert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                [{"x": values}], tmp_path)  # fmt: skip
    np.testing.assert_array_equal(got[0], np.where(values > np.float32(0.25), values, np.float32(0.25)))
    np.testing.assert_array_equal(got[1], (values > np.float32(0.25)).astype(np.float32))
    assert "GREATER" in ops


@pytest.mark.parametrize("weights", ["non-negative", "any sign"])
def test_hard_sigmoid_matches_the_onnx_definition(tmp_path: Path, weights: str) -> None:
    """HardSigmoid (then a Mul by per-slot weights, as in the merge) equals max(0, min(1, alpha x + beta)) * w."""
    rng = np.random.default_rng(1)
    x = np.concatenate([_edge_values(-3.0), _edge_values(3.0), rng.normal(0, 4, 2000).astype(np.float32)])
    x = x[np.isfinite(x)][: 8 * 1024].reshape(8, 1024)  # (inf * alpha + beta is inf; NaN-free cases only)
    signs = np.ones(1024) if weights == "non-negative" else rng.choice([-1.0, 1.0], 1024)
    w = (rng.random(1024) * signs).astype(np.float32)
    alpha, beta = 1.0 / 6.0, 0.5
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=alpha, beta=beta),
             helper.make_node("Mul", ["h", "w"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
                                              helper.make_tensor_value_info("w", TensorProto.FLOAT, [1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])  # fmt: skip
    (got,), _ = run_in_litert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                              [{"x": x, "w": w}], tmp_path)  # fmt: skip
    f = np.float32
    expected = np.maximum(f(0), np.minimum(f(1), x * f(alpha) + f(beta))) * w
    np.testing.assert_array_equal(got[0], expected)


def test_round_is_half_to_even_like_onnx(tmp_path: Path) -> None:
    """Round (the merge's P > 0.5 count: Round of probabilities in [0, 1]) gives ONNX's round half to even in LiteRT,
    at every half and at the probabilities' edges."""
    halves = np.arange(-8, 8, dtype=np.float32) + np.float32(0.5)
    f = np.float32
    edges = [f(0.5), np.nextafter(f(0.5), f(1)), np.nextafter(f(0.5), f(0)), f(0), f(1), f(-0.0), f(1.5), f(2.5)]
    x = np.concatenate([halves, np.array(edges, dtype=np.float32), np.random.default_rng(2).random(2000).astype(np.float32)])
    graph = helper.make_graph([helper.make_node("Round", ["x"], ["y"])], "tail",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.size])])  # fmt: skip
    (got,), ops = run_in_litert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), [{"x": x}], tmp_path)
    np.testing.assert_array_equal(got[0], np.round(x))  # numpy rounds half to even too
    assert got[0][halves.size] == 0.0 and got[0][halves.size + 1] == 1.0  # 0.5 -> 0, its successor -> 1
    assert "ROUND" in ops


def _pixel_count_graph(height: int, width: int, slots: int, first_row: np.ndarray) -> onnx.ModelProto:
    """The merge's per-slot pixel count: ones[1, W] @ reshape(ones[1, H] @ reshape(X, [H, W*S]), [W, S])."""
    inits = [numpy_helper.from_array(first_row, "r"), numpy_helper.from_array(np.ones((1, width), np.float32), "c"),
             numpy_helper.from_array(np.array([height, width * slots], np.int64), "s1"),
             numpy_helper.from_array(np.array([width, slots], np.int64), "s2")]  # fmt: skip
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"]), helper.make_node("MatMul", ["r", "a"], ["b"]),
             helper.make_node("Reshape", ["b", "s2"], ["d"]), helper.make_node("MatMul", ["c", "d"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [height, width, slots])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, slots])], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_pixel_count_becomes_one_sum_over_the_pixels(tmp_path: Path) -> None:
    """The two ones-row MatMuls of the pixel count become one SUM over both pixel axes (same counts); with a first
    row that is not all ones the pattern does not apply and the MatMuls are converted as written."""
    height, width, slots = 24, 20, 7
    x = (np.random.default_rng(3).random((height, width, slots)) > 0.4).astype(np.float32)
    (got,), ops = run_in_litert(_pixel_count_graph(height, width, slots, np.ones((1, height), np.float32)), [{"x": x}],
                                tmp_path / "ones", op_list=True)  # fmt: skip
    np.testing.assert_array_equal(got[0], x.sum(axis=(0, 1))[None])
    assert ops.count("SUM") == 1 and not {"BATCH_MATMUL", "FULLY_CONNECTED"} & set(ops), ops  # (as written: 2 ops)
    row = np.ones((1, height), np.float32)
    row[0, 5] = 2.0  # a weighted count: not the pattern
    (got,), ops = run_in_litert(_pixel_count_graph(height, width, slots, row), [{"x": x}], tmp_path / "weighted",
                                op_list=True)  # fmt: skip
    assert len([op for op in ops if op in ("SUM", "BATCH_MATMUL", "FULLY_CONNECTED")]) == 2, ops
    np.testing.assert_array_equal(got[0], (row @ x.reshape(height, -1)).reshape(width, slots).sum(axis=0)[None])

"""optimize's clip_runtime_bounds pass: a Clip bound computed at run time -> Sub / Relu / Add."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import make_model, ops, rand
from optimize_util import apply, assert_same_outputs

from espstream.optimize import optimize_model
from espstream.optimize.clip_runtime_bounds import clip_runtime_bounds

SHAPE = [1, 5, 8]


def top_db(lo: str = "m", hi: str = "") -> onnx.ModelProto:
    """torchaudio's AmplitudeToDB top_db: clamp(x, min=x.max() - 3), and a run-time max
    x.min() + 2 where `hi` is "M"; "c" / "C" name constant bounds."""
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
             helper.make_node("Sub", ["mx", "three"], ["m"]),
             helper.make_node("ReduceMin", ["x"], ["mn"], keepdims=0),
             helper.make_node("Add", ["mn", "two"], ["M"]),
             helper.make_node("Clip", ["x", lo, hi], ["y"])]
    inits = {"three": np.array(3, np.float32), "two": np.array(2, np.float32),
             "c": np.array(-0.5, np.float32), "C": np.array(0.75, np.float32)}
    return make_model(nodes, {"x": SHAPE}, {"y": SHAPE}, inits)


def x_feed(seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": rand(*SHAPE, seed=seed) * 2}


@pytest.mark.parametrize("lo,hi,expected", [
    ("m", "", ["Sub", "Relu", "Add"]),
    ("", "M", ["Sub", "Relu", "Sub"]),
    ("m", "M", ["Sub", "Relu", "Add", "Sub", "Relu", "Sub"]),
    ("m", "C", ["Sub", "Relu", "Add", "Clip"]),
    ("c", "M", ["Clip", "Sub", "Relu", "Sub"]),
])
def test_run_time_bounds_become_sub_relu_add(lo, hi, expected):
    model = top_db(lo, hi)
    changed, out = apply(clip_runtime_bounds, model)
    assert changed
    # the Clip (named after its output y) replaced by nodes named y/...
    assert [n.op_type for n in out.graph.node if n.name.startswith("y/")] == expected
    assert out.graph.output[0].name == "y"
    for seed in range(3):  # values below, inside and above the bounds
        assert_same_outputs(model, out, x_feed(seed))


def test_constant_bounds_are_left_to_clip():
    model = top_db("c", "C")
    changed, out = apply(clip_runtime_bounds, model)
    assert not changed and ops(out).count("Clip") == 1


def test_min_above_max_gives_the_max_as_clip_does():
    # Clip(x, 5 + max(x), max(x) - 5): every output is the max bound (ONNX's order)
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
             helper.make_node("Add", ["mx", "five"], ["lo"]),
             helper.make_node("Sub", ["mx", "five"], ["hi"]),
             helper.make_node("Clip", ["x", "lo", "hi"], ["y"])]
    model = make_model(nodes, {"x": SHAPE}, {"y": SHAPE}, {"five": np.array(5, np.float32)})
    changed, out = apply(clip_runtime_bounds, model)
    assert changed and "Clip" not in ops(out)
    feed = x_feed()
    assert_same_outputs(model, out, feed)
    from onnx_builders import run
    np.testing.assert_allclose(run(out, feed)[0], np.full(SHAPE, feed["x"].max() - 5),
                               rtol=1e-6)


def test_integer_clip_is_left_alone():
    x = helper.make_tensor_value_info("x", TensorProto.INT32, SHAPE)
    y = helper.make_tensor_value_info("y", TensorProto.INT32, SHAPE)
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
             helper.make_node("Clip", ["x", "mx"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    changed, _ = apply(clip_runtime_bounds, model)
    assert not changed


def test_optimize_runs_it_and_its_check_passes():
    model = top_db("m", "M")
    result = optimize_model(model)
    assert "Clip" not in ops(result.model)
    assert result.applied.get("clip_runtime_bounds") == 1
    assert result.check.passed


def test_written_around_x_so_x_keeps_its_step_where_the_bound_does_not_bite():
    # y = x + Relu(m - x), not m + Relu(x - m): with m far below x (top_db's floor) the
    # second form quantizes a difference of two large numbers (openWakeWord's mel front end
    # fell to -0.1 dB int8 SQNR that way, 23.8 dB this way)
    changed, out = apply(clip_runtime_bounds, top_db("m", "M"))
    nodes = {n.name: n for n in out.graph.node}
    assert list(nodes["y/min_minus_x"].input) == ["m", "x"]
    assert list(nodes["y/at_least_min"].input) == ["x", "y/relu_min"]
    assert list(nodes["y/x_minus_max"].input) == ["y/at_least_min", "M"]
    assert list(nodes["y/at_most_max"].input) == ["y/at_least_min", "y/relu_max"]

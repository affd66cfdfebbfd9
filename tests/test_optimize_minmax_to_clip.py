"""optimize's minmax_to_clip pass: Max / Min against a scalar constant -> Clip."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx_builders import make_model, ops, rand
from optimize_util import apply, assert_same_outputs

from espstream.optimize.minmax_to_clip import minmax_to_clip


def model_of(nodes, inits, shape=(1, 4, 6), opset=13):
    return make_model(nodes, {"x": list(shape)}, {"y": list(shape)}, inits, opset=opset)


def clip_bounds(model: onnx.ModelProto, node: onnx.NodeProto) -> list[float | None]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for name in list(node.input[1:3]) + [""] * (3 - len(node.input)):
        out.append(None if not name else float(inits[name]))
        if name:
            assert inits[name].ndim == 0  # Clip's bounds are scalars
    return out


@pytest.mark.parametrize("op,order,c", [("Max", 0, [0.5]), ("Max", 1, 0.0), ("Min", 0, [[[6.0]]]),
                                        ("Min", 1, -0.25)])
def test_max_min_by_a_scalar_becomes_clip(op, order, c):
    ins = ["x", "c"] if order == 0 else ["c", "x"]
    model = model_of([helper.make_node(op, ins, ["y"])], {"c": np.array(c, np.float32)})
    changed, out = apply(minmax_to_clip, model)
    assert changed and ops(out) == ["Clip"]
    v = float(np.asarray(c).reshape(-1)[0])
    assert clip_bounds(out, out.graph.node[0]) == ([v, None] if op == "Max" else [None, v])
    assert_same_outputs(model, out, {"x": rand(1, 4, 6)})


def test_relu6_written_as_max_then_min_is_one_clip():
    model = model_of([helper.make_node("Max", ["x", "lo"], ["t"]),
                      helper.make_node("Min", ["t", "hi"], ["y"])],
                     {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
    changed, out = apply(minmax_to_clip, model)
    assert changed and ops(out) == ["Clip"]
    assert clip_bounds(out, out.graph.node[0]) == [0.0, 6.0]
    assert_same_outputs(model, out, {"x": rand(1, 4, 6) * 8})


def test_disjoint_bounds_stay_two_clips():
    # min(max(x, 2), 1) is 1 everywhere; one Clip(2, 1) would be too, but ONNX leaves min > max
    # to the implementation, so the pair is kept
    model = model_of([helper.make_node("Max", ["x", "lo"], ["t"]),
                      helper.make_node("Min", ["t", "hi"], ["y"])],
                     {"lo": np.array(2, np.float32), "hi": np.array(1, np.float32)})
    changed, out = apply(minmax_to_clip, model)
    assert changed and ops(out) == ["Clip", "Clip"]
    assert_same_outputs(model, out, {"x": rand(1, 4, 6) * 4})


@pytest.mark.parametrize("c", [np.ones((1, 4, 1), np.float32),  # per channel: not a scalar
                               np.ones((1, 1, 1, 1), np.float32)])  # would add an axis
def test_leaves_what_clip_cannot_say(c):
    shape = (1, 4, 6)
    out_shape = list(np.broadcast_shapes(shape, c.shape))
    model = make_model([helper.make_node("Max", ["x", "c"], ["y"])], {"x": list(shape)},
                       {"y": out_shape}, {"c": c})
    changed, out = apply(minmax_to_clip, model)
    assert not changed and ops(out) == ["Max"]


def test_leaves_two_runtime_inputs_and_three_input_max():
    m2 = make_model([helper.make_node("Max", ["x", "z"], ["y"])], {"x": [2, 3], "z": [2, 3]},
                    {"y": [2, 3]})
    m3 = model_of([helper.make_node("Max", ["x", "a", "b"], ["y"])],
                  {"a": np.array(0, np.float32), "b": np.array(1, np.float32)})
    for m in (m2, m3):
        changed, out = apply(minmax_to_clip, m)
        assert not changed and ops(out) == ["Max"]

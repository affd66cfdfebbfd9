"""optimize's fold_expand pass: Expand / Tile of constants."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx_builders import make_model, ops, rand
from optimize_util import apply, assert_same_outputs

from espstream.optimize import optimize_model
from espstream.optimize.fold_expand import fold_expand


def inits_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def expand_as_model(op: str = "Expand", reader: str = "Mul", const_shape: bool = False):
    """`x * c.expand_as(x)` as torch.onnx writes it (the shape from Shape(x))."""
    c = rand(1, 4, 1, seed=3)
    if op == "Expand":
        shape_nodes = [] if const_shape else [helper.make_node("Shape", ["x"], ["sh"])]
        grow = helper.make_node("Expand", ["c", "shc" if const_shape else "sh"], ["ce"])
    else:
        shape_nodes = []
        grow = helper.make_node("Tile", ["c", "reps"], ["ce"])
    nodes = shape_nodes + [grow, helper.make_node(reader, ["x", "ce"], ["y"])]
    inits = {"c": c, "shc": np.array([1, 4, 6], np.int64), "reps": np.array([1, 1, 6], np.int64)}
    return make_model(nodes, {"x": [1, 4, 6]}, {"y": [1, 4, 6]}, inits)


@pytest.mark.parametrize("op,const_shape", [("Expand", False), ("Expand", True), ("Tile", True)])
def test_broadcast_reader_reads_the_small_constant(op, const_shape):
    model = expand_as_model(op, const_shape=const_shape)
    result = optimize_model(model)
    assert ops(result.model) == ["Mul"]
    consts = [v for v in inits_of(result.model).values() if v.dtype == np.float32]
    assert [v.shape for v in consts] == [(1, 4, 1)]  # not folded to [1, 4, 6]
    assert result.check.passed
    assert_same_outputs(model, result.model, {"x": rand(1, 4, 6)})


def test_non_broadcasting_reader_gets_the_computed_constant():
    model = make_model([helper.make_node("Expand", ["c", "shc"], ["ce"]),
                        helper.make_node("Concat", ["x", "ce"], ["y"], axis=1)],
                       {"x": [1, 4, 6]}, {"y": [1, 8, 6]},
                       {"c": rand(1, 4, 1), "shc": np.array([1, 4, 6], np.int64)})
    changed, out = apply(fold_expand, model)
    assert changed and ops(out) == ["Concat"]
    assert [v.shape for v in inits_of(out).values()] == [(1, 4, 6)]
    assert_same_outputs(model, out, {"x": rand(1, 4, 6)})


def test_tile_of_real_values_is_computed_not_dropped():
    c = rand(1, 4, 2)
    model = make_model([helper.make_node("Tile", ["c", "reps"], ["ce"]),
                        helper.make_node("Add", ["x", "ce"], ["y"])],
                       {"x": [1, 4, 6]}, {"y": [1, 4, 6]},
                       {"c": c, "reps": np.array([1, 1, 3], np.int64)})
    changed, out = apply(fold_expand, model)
    assert changed and ops(out) == ["Add"]
    assert [v.shape for v in inits_of(out).values()] == [(1, 4, 6)]
    assert_same_outputs(model, out, {"x": rand(1, 4, 6)})


def test_expand_that_grows_the_readers_output_is_computed():
    # x [1, 4, 1] * expand(c, [1, 4, 6]): the Mul's output is [1, 4, 6] only through the Expand
    model = make_model([helper.make_node("Expand", ["c", "shc"], ["ce"]),
                        helper.make_node("Mul", ["x", "ce"], ["y"])],
                       {"x": [1, 4, 1]}, {"y": [1, 4, 6]},
                       {"c": rand(1, 4, 1), "shc": np.array([1, 4, 6], np.int64)})
    changed, out = apply(fold_expand, model)
    assert changed and [v.shape for v in inits_of(out).values()] == [(1, 4, 6)]
    assert_same_outputs(model, out, {"x": rand(1, 4, 1)})


def test_runtime_shape_is_left():
    model = make_model([helper.make_node("Expand", ["c", "s"], ["y"])], {"s": [3]}, {"y": None},
                       {"c": rand(1, 4, 1)})
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    changed, _ = apply(fold_expand, model)
    assert not changed

"""optimize's inline_if pass, and fold_constants on models with If subgraphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import make_model, ops, rand
from optimize_util import apply, assert_same_outputs

from espstream.optimize import optimize_model
from espstream.optimize.fold_constants import fold_constants
from espstream.optimize.inline_if import inline_if


def _branch(name: str, nodes: list, outputs: list[str]) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])


def two_output_if(cond_from_shape: bool) -> onnx.ModelProto:
    """An If whose taken branch returns a Constant node's output: onnx-graphsurgeon's
    flattening leaves that If output without a producer (the crash met on Silero VAD)."""
    def const(name: str, v: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, TensorProto.FLOAT, [1], [v]))
    then = _branch("then", [helper.make_node("Sigmoid", ["h"], ["t_y"]), const("t_c", 2.0)],
                   ["t_y", "t_c"])
    other = _branch("else", [helper.make_node("Neg", ["h"], ["e_y"]), const("e_c", 3.0)],
                    ["e_y", "e_c"])
    nodes = [helper.make_node("Relu", ["x"], ["h"])]
    inits = {}
    if cond_from_shape:  # Equal(Size(Shape(x)), 3): constant once shapes fold
        nodes += [helper.make_node("Shape", ["x"], ["sh"]),
                  helper.make_node("Size", ["sh"], ["rank"]),
                  helper.make_node("Equal", ["rank", "three"], ["c"])]
        inits["three"] = np.array(3, np.int64)
    else:
        inits["c"] = np.array(False)
    nodes += [helper.make_node("If", ["c"], ["a", "b"], then_branch=then, else_branch=other),
              helper.make_node("Add", ["a", "b"], ["ab"]),
              helper.make_node("Mul", ["ab", "a"], ["y"])]
    return make_model(nodes, {"x": [1, 4, 5]}, {"y": [1, 4, 5]}, inits)


@pytest.mark.parametrize("cond_from_shape", [False, True])
def test_optimize_inlines_the_taken_branch(cond_from_shape):
    model = two_output_if(cond_from_shape)
    result = optimize_model(model)
    assert "If" not in ops(result.model)
    assert ("Sigmoid" if cond_from_shape else "Neg") in ops(result.model)
    assert "Identity" not in ops(result.model)
    assert result.check.passed
    assert_same_outputs(model, result.model, {"x": rand(1, 4, 5)})


def test_inline_if_rewires_every_output_and_renames_branch_tensors():
    model = two_output_if(False)
    changed, out = apply(inline_if, model)
    assert changed
    assert "If" not in ops(out) and ops(out).count("Identity") == 2
    neg = next(n for n in out.graph.node if n.op_type == "Neg")
    assert neg.output[0] == "a/e_y"  # the If has no name: its first output's name prefixes
    assert_same_outputs(model, out, {"x": rand(1, 4, 5)})


def test_inline_if_leaves_a_runtime_condition():
    then = _branch("then", [helper.make_node("Relu", ["x"], ["t"])], ["t"])
    other = _branch("else", [helper.make_node("Neg", ["x"], ["e"])], ["e"])
    model = make_model([
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
    ], {"x": [1, 4]}, {"y": [1, 4]}, {"zero": np.array(0, np.float32)})
    changed, out = apply(inline_if, model)
    assert not changed and "If" in ops(out)
    result = optimize_model(model)  # fold_constants and the others leave subgraphs working
    assert "If" in ops(result.model) and result.check.passed


def test_fold_constants_no_longer_flattens_ifs_itself():
    model = two_output_if(True)
    changed, out = apply(fold_constants, model)
    assert changed and "If" in ops(out)  # the condition folded; the If is inline_if's
    assert_same_outputs(model, out, {"x": rand(1, 4, 5)})


def test_nested_if_is_inlined_level_by_level():
    inner = helper.make_node("If", ["k"], ["t_in"],
                             then_branch=_branch("it", [helper.make_node("Relu", ["x"], ["r"])],
                                                 ["r"]),
                             else_branch=_branch("ie", [helper.make_node("Neg", ["x"], ["n"])],
                                                 ["n"]))
    outer = helper.make_node("If", ["c"], ["y"],
                             then_branch=_branch("ot", [inner], ["t_in"]),
                             else_branch=_branch("oe", [helper.make_node("Abs", ["x"], ["a"])],
                                                 ["a"]))
    model = make_model([outer], {"x": [2, 3]}, {"y": [2, 3]},
                       {"c": np.array(True), "k": np.array([0], np.int64) == 0})
    result = optimize_model(model)
    assert ops(result.model) == ["Relu"]
    assert_same_outputs(model, result.model, {"x": rand(2, 3)})


def if_after_if() -> onnx.ModelProto:
    """Silero VAD's `half` export in small: the second If's condition is a Shape of the first
    If's output, whose branches return different shapes (so the output's shape is unknown
    until the first If is inlined and shapes are inferred again)."""
    then = _branch("then", [helper.make_node("Relu", ["x"], ["t_y"])], ["t_y"])
    other = _branch("else", [helper.make_node("Concat", ["x", "x"], ["e_y"], axis=1)], ["e_y"])
    then2 = _branch("then2", [helper.make_node("Sigmoid", ["g"], ["t2"])], ["t2"])
    other2 = _branch("else2", [helper.make_node("Neg", ["g"], ["e2"])], ["e2"])
    nodes = [helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Size", ["sx"], ["rank"]),
             helper.make_node("Equal", ["rank", "two"], ["c1"]),
             helper.make_node("If", ["c1"], ["h"], then_branch=then, else_branch=other),
             helper.make_node("Tanh", ["h"], ["g"]),  # keeps h's unknown shape once inlined
             helper.make_node("Shape", ["g"], ["sh"]),
             helper.make_node("Gather", ["sh", "one"], ["width"], axis=0),
             helper.make_node("Equal", ["width", "four"], ["c2"]),
             helper.make_node("If", ["c2"], ["y"], then_branch=then2, else_branch=other2)]
    inits = {"two": np.array(2, np.int64), "one": np.array(1, np.int64),
             "four": np.array(4, np.int64)}
    return make_model(nodes, {"x": [1, 4]}, {"y": [1, 4]}, inits)


def test_optimize_infers_shapes_again_until_a_later_if_folds():
    model = if_after_if()
    shapes = onnx.shape_inference.infer_shapes(model)
    g = next(v for v in shapes.graph.value_info if v.name == "g")
    assert not g.type.tensor_type.shape.dim[1].HasField("dim_value")  # unknown at first
    result = optimize_model(model)
    assert "If" not in ops(result.model)
    assert ops(result.model) == ["Relu", "Tanh", "Sigmoid"]
    assert result.check.passed
    assert_same_outputs(model, result.model, {"x": rand(1, 4)})

"""optimize's remove_cast pass: a Cast to the type its input already has."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper
from onnx_builders import make_model, ops, rand
from optimize_util import apply, assert_same_outputs

from espstream.optimize import optimize_model
from espstream.optimize.remove_cast import remove_cast


def test_cast_to_own_type_becomes_identity_then_goes():
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Cast", ["r"], ["c"], to=TensorProto.FLOAT),
                        helper.make_node("Neg", ["c"], ["y"])], {"x": [2, 3]}, {"y": [2, 3]})
    changed, out = apply(remove_cast, model)
    assert changed and ops(out) == ["Relu", "Identity", "Neg"]
    result = optimize_model(model)
    assert ops(result.model) == ["Relu", "Neg"] and result.check.passed


def test_castlike_of_the_same_type_and_a_cast_to_the_graph_output():
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("CastLike", ["r", "x"], ["y"])],
                       {"x": [2, 3]}, {"y": [2, 3]}, opset=15)
    result = optimize_model(model)
    assert ops(result.model) == ["Relu"] and result.model.graph.output[0].name == "y"
    assert_same_outputs(model, result.model, {"x": rand(2, 3)})


def test_real_casts_stay():
    model = make_model([helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
                        helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)],
                       {"x": [2, 3]}, {"y": [2, 3]})
    changed, out = apply(remove_cast, model)
    assert not changed and ops(out) == ["Cast", "Cast"]
    result = optimize_model(model)  # float -> int32 -> float truncates: not a no-op
    assert ops(result.model) == ["Cast", "Cast"]
    x = np.array([[1.7, -2.2, 0.5], [3.0, 4.9, -0.1]], np.float32)
    assert_same_outputs(model, result.model, {"x": x})

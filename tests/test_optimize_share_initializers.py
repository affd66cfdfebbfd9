"""share_initializers: a 0-d scalar and a 1-element 1-D constant are not the same constant."""

from __future__ import annotations

import numpy as np
from onnx import helper
from onnx_builders import make_model, rand
from optimize_util import apply, assert_same_outputs

from espstream.optimize import optimize_model
from espstream.optimize.share_initializers import share_initializers


def gather_model():
    """Gather by a 0-d index drops the axis; by a 1-element 1-D index it keeps it."""
    return make_model([helper.make_node("Gather", ["x", "i0"], ["a"]),
                       helper.make_node("Gather", ["x", "i1"], ["b"]),
                       helper.make_node("Gather", ["x", "i2"], ["c"])],
                      {"x": [3, 4]}, {"a": [4], "b": [1, 4], "c": [4]},
                      {"i0": np.array(0, np.int64), "i1": np.array([0], np.int64),
                       "i2": np.array(0, np.int64)})


def test_scalar_and_one_element_vector_stay_apart():
    model = gather_model()
    changed, out = apply(share_initializers, model)
    assert changed  # i2 is i0's twin
    gathers = [n.input[1] for n in out.graph.node]
    assert gathers[0] == gathers[2] != gathers[1]
    assert_same_outputs(model, out, {"x": rand(3, 4)})
    result = optimize_model(model)
    assert result.check.passed

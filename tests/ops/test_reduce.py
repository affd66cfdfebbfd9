"""espstream/ops/reduce.py: reductions streamed in float off the time axis, refused over it."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model, refused

from espstream.errors import UserError
from espstream.stream.streamify import streamify_model


def test_reduce_mean_over_channels_streams() -> None:
    m = model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)], [1, 4, 8],
              opset=13, out_shape=[1, 1, 8])
    res = streamify_model(m, 2, axes={"x": 2})
    assert "ReduceMean" in {n.op_type for n in res.model.graph.node}


def test_reduce_over_time_is_refused() -> None:
    m = model([helper.make_node("ReduceMax", ["x"], ["y"], axes=[2], keepdims=1)], [1, 4, 8],
              opset=13, out_shape=[1, 4, 1])
    with pytest.raises(UserError, match="reduces over the time axis"):
        streamify_model(m, 2, axes={"x": 2})


def test_reduce_sum_is_refused_by_calibrate() -> None:
    def case():
        return model([helper.make_node("Relu", ["x"], ["r"]),
                      helper.make_node("ReduceSum", ["r", "a"], ["y"], keepdims=1)], [1, 4, 8],
                     {"a": np.asarray([1], np.int64)}, out_shape=[1, 1, 8]), set()
    refused(case, "calibrate", "operator ReduceSum is not supported by calibrate")

"""The operator modules whose operators streamify carries in float but calibrate refuses yet:
quantize (Q / DQ: the contract, refused in a float model), reduce, recurrent, norm,
float_pointwise. Each is checked to be refused by calibrate with one line naming it, and
streamed by the rule its module registers (their streaming rules have their own tests in
tests/test_stream_rules.py and tests/test_stream_models.py)."""

from __future__ import annotations

import pytest
from onnx import helper
from op_harness import model, refused

from espstream.ops import registry
from espstream.stream.streamify import streamify_model

MODULES = ("quantize", "float_pointwise")  # recurrent lowers GRU / LSTM now
ONE_INPUT = sorted(s.onnx for s in registry.all_ops() if s.module == "float_pointwise"
                   and s.stream is not None and s.stream.__name__ == "rule_unary"
                   and s.onnx not in ("Not", "IsNaN", "IsInf", "Cast", "CastLike", "Dropout",
                                      "Shrink", "Mish"))


@pytest.mark.parametrize("op", ONE_INPUT)
def test_pointwise_float_ops_stream_and_are_refused_by_calibrate(op: str) -> None:
    def case():
        return model([helper.make_node("Relu", ["x"], ["r"]),
                      helper.make_node(op, ["r"], ["y"])], [1, 4, 8]), set()
    m, _ = case()
    res = streamify_model(m, 2, axes={"x": 2})
    assert op in {n.op_type for n in res.model.graph.node}
    refused(case, "calibrate", f"operator {op} is not supported by calibrate")


def test_reduce_mean_over_channels_streams() -> None:
    m = model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)], [1, 4, 8],
              opset=13, out_shape=[1, 1, 8])
    res = streamify_model(m, 2, axes={"x": 2})
    assert "ReduceMean" in {n.op_type for n in res.model.graph.node}


def test_erf_is_refused_by_calibrate() -> None:
    def case():
        return model([helper.make_node("Relu", ["x"], ["r"]),
                      helper.make_node("Erf", ["r"], ["y"])], [1, 4, 8]), set()
    refused(case, "calibrate", "operator Erf is not supported by calibrate")


def test_stream_only_modules_register_no_lowering() -> None:
    specs = [s for s in registry.all_ops() if s.module in MODULES]
    assert specs and all(s.lower is None and s.stream is not None for s in specs)

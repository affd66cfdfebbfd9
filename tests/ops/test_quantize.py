"""espstream/ops/quantize.py: Q / DQ are the QDQ contract (a float model holding them is
refused by calibrate); RequantizeLinear is simulated as a rounding shift."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model

from espstream.errors import UserError
from espstream.intgraph import IntGraph, Node, ValueInfo
from espstream.quant.plan import check_float_model
from espstream.sim import Simulator


def test_a_qdq_model_is_not_a_float_model() -> None:
    m = model([helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
               helper.make_node("DequantizeLinear", ["q", "s"], ["y"])], [1, 4],
              {"s": np.float32(0.5)})
    with pytest.raises(UserError, match="already quantized"):
        check_float_model(m)


@pytest.mark.parametrize(("target", "want"), [("esp32p4", [0, 2, 2, -2]),
                                              ("esp32s3", [1, 2, 3, -1])])
def test_requantize_rounds_ties_by_target(target: str, want: list[int]) -> None:
    # q [1, 3, 5, -3] at 2^-2 -> 2^-1: halves 0.5, 1.5, 2.5, -1.5 (worked by hand)
    g = IntGraph(name="rq", target=target)
    g.inputs.append(ValueInfo("x", np.dtype(np.int8), [4], [-2]))
    g.outputs.append(ValueInfo("y", np.dtype(np.int8), [4], [-1]))
    g.value_infos["x"] = g.inputs[0]
    g.value_infos["y"] = g.outputs[0]
    g.nodes.append(Node("RequantizeLinear", "rq", ["x"], ["y"], {}))
    y = Simulator(g).run({"x": np.asarray([1, 3, 5, -3], np.int8)})["y"]
    assert y.tolist() == want

"""espstream/ops/compare.py: Equal, Greater, GreaterOrEqual, Less, LessOrEqual through
calibrate, export and the simulator (bool outputs), the constant's rounding rule, and the
alignment of inputs at different exponents (the ops suite's files judge the kernels:
tests/test_ops_suite.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from op_harness import _data

from espstream.errors import UserError
from espstream.export import export_model, quantize_input
from espstream.ops import compare
from espstream.quant import calibrate_model
from espstream.sim import Simulator

OPS = sorted(compare.OPS)
NP = {"Equal": np.equal, "Greater": np.greater, "GreaterOrEqual": np.greater_equal,
      "Less": np.less, "LessOrEqual": np.less_equal}


def _model(nodes, inits=None, shape=(1, 4, 8), out_shape=None) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "cmp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    return m


def _const_case(op: str, const_first: bool = False):
    def case():
        c = np.array([-0.3, 0.0, 0.3, 1.07], np.float32).reshape(1, 4, 1)
        ins = ["c", "x"] if const_first else ["x", "c"]
        return _model([helper.make_node(op, ins, ["y"])], {"c": c}), {op}
    return case


def _two_case(op: str):
    def case():  # x against 0.5 * x: two activations at different exponents
        nodes = [helper.make_node("Mul", ["x", "h"], ["m"]),
                 helper.make_node(op, ["x", "m"], ["y"])]
        return _model(nodes, {"h": np.array(0.5, np.float32)}), {op, "RequantizeLinear"}
    return case


CASES = {op: _const_case(op) for op in OPS}
NOT_LOWERED: dict[str, str] = {}


def _run(case, target="esp32p4", bits=8, n=3):
    m, kinds = case()
    data, x = _data(m)
    qdq = calibrate_model(m, data, target=target, bits=bits, report_samples=0).model
    onnx.checker.check_model(qdq)
    res = export_model(qdq)
    assert kinds <= {nd.op_type for nd in res.graph.nodes}
    sess = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    sim = Simulator(res.graph)
    out = []
    for k in range(n):
        want = sess.run(None, {"x": x[k:k + 1]})[0]
        got = sim.run({"x": quantize_input(res.graph, "x", x[k:k + 1])})["y"]
        assert got.dtype == np.bool_
        perm = json.loads(res.graph.metadata["espstream.layout"]).get("y", list(range(got.ndim)))
        got = np.transpose(got, np.argsort(perm))
        assert got.shape == want.shape
        out.append((got, want, qdq, res))
    return out


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_constant_through_every_stage(op: str, target: str, bits: int) -> None:
    """Rule 3: with the constant floored / ceiled onto the input's grid, the chip's integer
    comparison equals onnxruntime's float comparison of the quantized input, exactly."""
    for got, want, _, _ in _run(_const_case(op), target, bits):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("op", ["Greater", "LessOrEqual", "GreaterOrEqual"])
def test_constant_first(op: str) -> None:
    for got, want, _, _ in _run(_const_case(op, const_first=True)):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("op", OPS)
def test_two_activations_aligned_to_the_larger_exponent(op: str) -> None:
    """Rules 1-2: the finer input is requantized to the coarser grid, so results differ from the
    QDQ model's only where the two values are within one coarse step of each other."""
    for got, want, _, res in _run(_two_case(op)):
        e = max(vi.exponents[0] for name, vi in res.graph.value_infos.items()
                if vi.dtype == np.int8 and name != "y")
        assert np.mean(got == want) > 0.8
        assert e > min(vi.exponents[0] for vi in res.graph.value_infos.values()
                       if vi.dtype == np.int8)


def test_output_feeding_another_node_refused() -> None:
    nodes = [helper.make_node("Greater", ["x", "c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["y"])]
    m = _model(nodes, {"c": np.array(0.1, np.float32)})
    data, _ = _data(m)
    qdq = calibrate_model(m, data, target="esp32p4", bits=8, report_samples=0).model
    with pytest.raises(UserError, match="bool output feeds other operators"):
        export_model(qdq)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(OPS), st.floats(-3.875, 3.875, width=32), st.integers(-7, -5),
       st.booleans())
def test_constant_rule_matches_float_comparison(op: str, c: float, e: int, first: bool) -> None:
    """Rule 3 over every code of the grid: integer result == float result on the grid (at an
    exponent the constant fits, as rule 1 chooses)."""
    e = max(e, compare.fit_exponent(np.float32(c), np.dtype(np.int8)))
    q = np.arange(-128, 128)
    how = compare.OPS[op][1 + first]
    qc = compare.quantize_const(np.float32(c), e, how, np.dtype(np.int8)).astype(np.int64)
    xs = q * 2.0 ** e
    cf = float(np.float32(c))
    want = NP[op](cf, xs) if first else NP[op](xs, cf)
    got = NP[op](qc, q) if first else NP[op](q, qc)
    if op == "Equal" and cf / 2.0 ** e != round(cf / 2.0 ** e):
        assert not want.any()  # off the grid: never equal; the nearest code is used instead
        return
    assert np.array_equal(got, want)


def test_sim_compares_codes_and_broadcasts() -> None:
    from espstream.intgraph import IntGraph, Node, ValueInfo

    g = IntGraph("cmp")
    g.inputs = [ValueInfo("a", np.dtype(np.int8), [2, 3], [-4]),
                ValueInfo("b", np.dtype(np.int8), [1, 3], [-4])]
    for vi in g.inputs:
        g.value_infos[vi.name] = vi
    g.value_infos["y"] = ValueInfo("y", np.dtype(np.bool_), [2, 3], [0])
    g.outputs = [g.value_infos["y"]]
    g.nodes = [Node("GreaterOrEqual", "ge", ["a", "b"], ["y"], {"quant_type": "S8"})]
    a = np.int8([[1, 2, 3], [-128, 0, 127]])
    b = np.int8([[2, 2, 2]])
    y = Simulator(g, target="c").run({"a": a, "b": b})["y"]
    assert y.dtype == np.bool_ and y.tolist() == [[False, True, True], [False, False, True]]


def test_fit_exponent() -> None:
    assert compare.fit_exponent(np.float32([1.0]), np.dtype(np.int8)) == -6  # 64 <= 127
    assert compare.fit_exponent(np.float32([100.0]), np.dtype(np.int8)) == 0
    assert compare.fit_exponent(np.float32([1.0]), np.dtype(np.int16)) == -14


@pytest.mark.parametrize("op", OPS)
def test_streams_equal_to_offline(op: str) -> None:
    """Streamify's broadcast rule: the chunked model (bool output) equals the offline one."""
    from espstream.stream.streamify import streamify_model
    from espstream.verify import verify_models

    m, _ = CASES[op]()
    r = streamify_model(m, 2, axes={"x": 2})
    assert op in {n.op_type for n in r.model.graph.node}
    v = verify_models(m, r.model, random=2)
    assert v.ok, v.failure()

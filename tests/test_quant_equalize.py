"""espstream.quant.equalize: same float function, equal ranges, which pairs it takes."""

from __future__ import annotations

import copy

import numpy as np
from onnx import helper, numpy_helper
from ptq_util import OFF, arrays, data, ds_block, graph, only, run, sqnr

from espstream.quant import calibrate_model
from espstream.quant.equalize import _pairs, equalize_model


def _w(m, name):
    return next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == name)


def test_function_unchanged_and_ranges_equal():
    m = ds_block(0, spread=100.0)
    x = arrays(data(m, 4, 1))
    eq, pairs = equalize_model(copy.deepcopy(m))
    assert pairs == 2  # conv1 -> dw, dw -> pw
    assert np.allclose(run(eq, x), run(m, x), rtol=1e-4, atol=1e-5)
    # after the sweeps, conv1's rows and dw's rows (its input columns) have equal ranges
    r1 = np.abs(_w(eq, "w1").reshape(16, -1)).max(axis=1)
    r2 = np.abs(_w(eq, "w2").reshape(16, -1)).max(axis=1)
    assert np.allclose(r1, r2, rtol=0.05)
    before = np.abs(_w(m, "w1").reshape(16, -1)).max(axis=1)
    assert before.max() / before.min() > 20 and r1.max() / r1.min() < 5


def test_gemm_pair():
    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((6, 4)) * np.geomspace(0.01, 1, 6)[:, None],
             "b1": rng.standard_normal(6), "w2": rng.standard_normal((3, 6)),
             "b2": rng.standard_normal(3)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="g1", transB=1),
             helper.make_node("Relu", ["g1"], ["r"], name="r"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="g2", transB=1)]
    m = graph(nodes, inits, [1, 4])
    x = rng.standard_normal((5, 4)).astype(np.float32)
    eq, pairs = equalize_model(copy.deepcopy(m))
    assert pairs == 1
    assert np.allclose(run(eq, x), run(m, x), rtol=1e-4, atol=1e-5)
    assert not np.allclose(_w(eq, "w1"), _w(m, "w1"))


def _two_convs(between: list, out: str = "y", extra_out: bool = False):
    rng = np.random.default_rng(4)
    inits = {"w1": rng.standard_normal((4, 4, 1)), "w2": rng.standard_normal((4, 4, 1))}
    src = between[-1].output[0] if between else "c1"
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="a", kernel_shape=[1]),
             *between, helper.make_node("Conv", [src, "w2"], [out], name="b", kernel_shape=[1])]
    m = graph(nodes, inits, [1, 4, 5])
    if extra_out:
        m.graph.output.append(helper.make_tensor_value_info("c1", 1, None))
    return m


def test_which_pairs():
    assert len(_pairs(_two_convs([]))) == 1
    assert len(_pairs(_two_convs([helper.make_node("Relu", ["c1"], ["r"], name="r")]))) == 1
    # not positive homogeneous: no pair
    assert _pairs(_two_convs([helper.make_node("Sigmoid", ["c1"], ["s"], name="s")])) == []
    # the tensor between them is a graph output: no pair
    assert _pairs(_two_convs([], extra_out=True)) == []
    # a second consumer of A's output: no pair
    m = _two_convs([])
    m.graph.node.append(helper.make_node("Relu", ["c1"], ["z"], name="z"))
    assert _pairs(m) == []
    # a broadcast Gemm bias cannot be scaled per channel: left alone
    rng = np.random.default_rng(5)
    g = graph([helper.make_node("Gemm", ["x", "w1", "b1"], ["g"], name="g1", transB=1),
               helper.make_node("Gemm", ["g", "w2"], ["y"], name="g2", transB=1)],
              {"w1": rng.standard_normal((3, 2)) * [[1], [10], [100]], "b1": np.ones(1),
               "w2": rng.standard_normal((2, 3))}, [1, 2])
    before = _w(g, "w1").copy()
    equalize_model(g)
    assert np.array_equal(_w(g, "w1"), before)


def test_per_tensor_target_gains_on_unbalanced_channels():
    m = ds_block(0, spread=100.0)
    d, held = data(m, 16, 0), data(m, 32, 9)
    x = arrays(held)
    ref = run(m, x)
    off = calibrate_model(m, d, target="esp32s3", report_samples=0, **OFF)
    on = calibrate_model(m, d, target="esp32s3", report_samples=0, **only("equalize"))
    assert any("equalization: 2 layer pair" in n for n in on.notes)
    assert sqnr(ref, run(on.model, x)) > sqnr(ref, run(off.model, x)) + 3.0

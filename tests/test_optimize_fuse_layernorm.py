"""optimize's fuse_layernorm pass: the decomposed layer norm older exporters write."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnx_builders import make_model, ops, rand
from optimize_util import apply, assert_same_outputs

from espstream.optimize import optimize_model
from espstream.optimize.fuse_layernorm import fuse_layernorm


def decomposed(shape=(1, 6, 8), axes=(-1,), gamma=True, beta=True, square="Pow", opset=13,
               eps_first=False, extra_reader=False, gamma_shape=None):
    """What torch.onnx (opset < 17) writes for nn.LayerNorm, or a variant of it."""
    axes_kw = {"axes": list(axes)} if opset < 18 else {}
    mean_in = ["x"] if opset < 18 else ["x", "axes"]
    nodes = [helper.make_node("ReduceMean", mean_in, ["m"], **axes_kw),
             helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["s"]) if square == "Pow"
             else helper.make_node("Mul", ["d", "d"], ["s"]),
             helper.make_node("ReduceMean", ["s"] + mean_in[1:], ["v"], **axes_kw),
             helper.make_node("Add", ["eps", "v"] if eps_first else ["v", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"])]
    norm_shape = tuple(shape[len(shape) + min(axes):])
    inits = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32)}
    if opset >= 18:
        inits["axes"] = np.array(axes, np.int64)
    last = "n"
    if gamma:
        inits["g"] = rand(*(gamma_shape or norm_shape), seed=1)
        nodes.append(helper.make_node("Mul", [last, "g"], ["ng"]))
        last = "ng"
    if beta:
        inits["b"] = rand(*norm_shape, seed=2)
        nodes.append(helper.make_node("Add", [last, "b"], ["nb"]))
        last = "nb"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    outputs = {"y": list(shape)}
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["d"], ["z"]))
        outputs["z"] = list(shape)
    return make_model(nodes, {"x": list(shape)}, outputs, inits, opset=opset)


@pytest.mark.parametrize("kw", [
    {}, {"gamma": False, "beta": False}, {"beta": False}, {"square": "Mul"}, {"eps_first": True},
    {"shape": (2, 3, 4, 5), "axes": (-2, -1)}, {"shape": (2, 3, 4, 5), "axes": (2, 3)},
    {"opset": 18}, {"opset": 17}, {"gamma_shape": (1, 1, 8)},
])
def test_fuses_into_one_layernormalization(kw):
    model = decomposed(**kw)
    changed, out = apply(fuse_layernorm, model)
    assert changed
    assert ops(out) == ["LayerNormalization", "Relu"]
    ln = out.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in ln.attribute}
    rank = len(kw.get("shape", (1, 6, 8)))
    assert attrs["axis"] == min(a % rank for a in kw.get("axes", (-1,)))
    assert abs(attrs["epsilon"] - 1e-5) < 1e-12
    assert len(ln.input) == (3 if kw.get("beta", True) else 2)
    assert out.opset_import[0].version == max(17, kw.get("opset", 13))
    assert_same_outputs(model, out, {"x": rand(*kw.get("shape", (1, 6, 8)), seed=5) * 3 + 1},
                        rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [
    {"axes": (1,)},  # not the trailing axes
    {"shape": (2, 3, 4, 5), "axes": (1, 3)},  # not contiguous
    {"extra_reader": True},  # d read outside the pattern
    {"opset": 12},  # Squeeze & co changed meaning at 13: not raised
])
def test_leaves_what_is_not_a_layernorm(kw):
    model = decomposed(**kw)
    changed, out = apply(fuse_layernorm, model)
    assert not changed and "LayerNormalization" not in ops(out)


def test_gamma_varying_outside_the_normalized_axes_stays_a_mul():
    model = decomposed(gamma_shape=(6, 1), beta=False)
    changed, out = apply(fuse_layernorm, model)
    assert changed and ops(out) == ["LayerNormalization", "Mul", "Relu"]
    assert_same_outputs(model, out, {"x": rand(1, 6, 8)}, rtol=1e-4, atol=1e-5)


def test_optimize_stage_fuses_and_checks():
    model = decomposed()
    result = optimize_model(model)
    assert ops(result.model) == ["LayerNormalization", "Relu"] and result.check.passed

"""espstream/ops/conv_transpose.py: ConvTranspose as InsertZeros + Conv; InsertZeros' kernel
against a NumPy oracle of the transposed convolution."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, refused, run_case

from espstream.ops.conv_transpose import insert_zeros

RNG = np.random.default_rng(7)


def _w(*s):
    return (RNG.standard_normal(s) * 0.4).astype(np.float32)


def _ct(nd: int = 1, stride: int = 2, k: int = 3, pads=None, relu: bool = False,
        out_pad: int = 0, dil: int = 1, bias: bool = True, **extra):
    def case():
        shape = [1, 4, 6] if nd == 1 else [1, 3, 4, 5]
        p = pads if pads is not None else [1] * (2 * nd)
        ins = ["x", "w", "b"] if bias else ["x", "w"]
        out = "c" if relu else "y"
        nodes = [helper.make_node("ConvTranspose", ins, [out], kernel_shape=[k] * nd,
                                  strides=[stride] * nd, pads=p, dilations=[dil] * nd,
                                  output_padding=[out_pad] * nd, **extra)]
        if relu:
            nodes.append(helper.make_node("Relu", ["c"], ["y"]))
        inits = {"w": _w(shape[1], 5, *[k] * nd)}
        if bias:
            inits["b"] = _w(5)
        want = {"InsertZeros", "Conv"} if stride > 1 or out_pad else {"Conv"}
        return model(nodes, shape, inits), want
    return case


CASES = {"ConvTranspose": _ct()}
MORE = {"stride1": _ct(stride=1), "2d": _ct(nd=2), "relu": _ct(relu=True),
        "outpad_dil": _ct(stride=3, k=2, out_pad=1, dil=2, pads=[0, 1]),
        "2d_asym": _ct(nd=2, k=3, pads=[0, 1, 2, 0], bias=False)}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize("name", ["ConvTranspose", *MORE])
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(name: str, target: str, bits: int) -> None:
    run_case({**CASES, **MORE}[name], target, bits)


@pytest.mark.parametrize(("kw", "words"), [
    ({"group": 2}, "group 2"),
    ({"pads": [3, 0]}, "pads .* exceed"),
])
def test_refusals(kw, words) -> None:
    def case():
        g = kw.get("group", 1)
        attrs = {"kernel_shape": [2], "strides": [2], "pads": kw.get("pads", [0, 0]), "group": g}
        return model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)],
                     [1, 4, 6], {"w": _w(4, 4 // g, 2)}), set()
    refused(case, "export", words)


def _oracle_conv_transpose_1d(x, w, s, p0, p1, d, op):
    """ONNX ConvTranspose 1-D, batch 1, by scattering each input frame (definition)."""
    cin, t = x.shape
    k = w.shape[2]
    full = (t - 1) * s + d * (k - 1) + 1 + op
    y = np.zeros((w.shape[1], full))
    for u in range(t):
        for j in range(k):
            y[:, u * s + j * d] += x[:, u] @ w[:, :, j]
    return y[:, p0:full - p1]


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 6), s=st.integers(1, 4), k=st.integers(1, 4), d=st.integers(1, 3),
       op=st.integers(0, 2), data=st.data())
def test_insert_zeros_then_conv_is_conv_transpose(t, s, k, d, op, data) -> None:
    """The decomposition (rule 1) with `insert_zeros` equals the definition, in float."""
    op = min(op, max(s, d) - 1)
    full = d * (k - 1)
    p0 = data.draw(st.integers(0, full))
    p1 = data.draw(st.integers(0, full))
    rng = np.random.default_rng(t * 100 + s)
    x = rng.standard_normal((3, t))
    w = rng.standard_normal((3, 2, k))
    want = _oracle_conv_transpose_1d(x, w, s, p0, p1, d, op)
    z = insert_zeros(x.T[None], [s], [op])[0].T  # [C, T']
    zp = np.pad(z, ((0, 0), (full - p0, full - p1)))
    wf = np.flip(w, 2)
    n_out = zp.shape[1] - full
    got = np.stack([sum(wf[:, :, j].T @ zp[:, i + j * d] for j in range(k))
                    for i in range(n_out)], axis=1) if n_out > 0 else np.zeros((2, 0))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_insert_zeros_2d_places_values() -> None:
    x = np.arange(1, 7, dtype=np.int8).reshape(1, 2, 3, 1)
    y = insert_zeros(x, [2, 3], [1, 0])
    assert y.shape == (1, 4, 7, 1)
    assert y[0, ::2, ::3, 0].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert int(np.count_nonzero(y)) == 6

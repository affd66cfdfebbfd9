"""espstream.quant.patches: rows times patches is the layer (onnxruntime judges), moments."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from ptq_util import graph, run

from espstream.quant.patches import Moments, from_rows, layout, patches, to_rows


def _inits(m):
    return {t.name: t for t in m.graph.initializer}


CONVS = [
    # (x shape, weight shape, attrs)
    ([1, 6, 17], [4, 6, 3], dict(kernel_shape=[3], pads=[1, 1])),
    ([1, 6, 17], [4, 6, 3], dict(kernel_shape=[3], pads=[4, 0], dilations=[2], strides=[2])),
    ([1, 6, 17], [6, 1, 5], dict(kernel_shape=[5], pads=[2, 2], group=6)),
    ([1, 6, 17], [4, 3, 2], dict(kernel_shape=[2], group=2)),
    ([1, 3, 9, 8], [5, 3, 3, 2], dict(kernel_shape=[3, 2], pads=[1, 0, 1, 1], strides=[2, 1])),
    ([1, 4, 7, 7], [4, 1, 3, 3], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=4,
                                      dilations=[1, 2])),
]


@pytest.mark.parametrize("xs,ws,attrs", CONVS)
def test_conv_rows_times_patches_is_the_conv(xs, ws, attrs):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(ws).astype(np.float32)
    m = graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c", **attrs)], {"w": w}, xs)
    x = rng.standard_normal((3, *xs[1:])).astype(np.float32)
    want = run(m, x)  # [n, cout, *out]
    lay = layout(m.graph.node[0], _inits(m))
    p = patches(lay, x)  # [g, n*out, K]
    rows = to_rows(lay, w)
    got = np.einsum("gpk,gck->gpc", p, rows.reshape(lay.groups, -1, lay.k))
    got = got.transpose(1, 0, 2).reshape(x.shape[0], *want.shape[2:], -1)  # [n, *out, cout]
    assert np.allclose(np.moveaxis(got, -1, 1), want, atol=1e-4)
    assert np.array_equal(from_rows(lay, rows), w)


@pytest.mark.parametrize("op,trans_b", [("Gemm", 1), ("Gemm", 0), ("MatMul", None)])
def test_gemm_and_matmul_rows(op, trans_b):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 7) if trans_b else (7, 5)).astype(np.float32)
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    shape = [1, 7] if op == "Gemm" else [1, 3, 7]
    m = graph([helper.make_node(op, ["x", "w"], ["y"], name="g", **attrs)], {"w": w}, shape)
    x = rng.standard_normal((2, *shape[1:])).astype(np.float32)
    lay = layout(m.graph.node[0], _inits(m))
    rows = to_rows(lay, w)
    got = patches(lay, x)[0] @ rows.T
    assert np.allclose(got, run(m, x).reshape(-1, 5), atol=1e-5)
    assert np.array_equal(from_rows(lay, rows), w)


def test_moments_are_the_patch_moments():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 2, 3)).astype(np.float32)
    m = graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[3],
                                pads=[1, 1], group=2)], {"w": w}, [1, 4, 10])
    lay = layout(m.graph.node[0], _inits(m))
    mo = Moments(lay)
    xs = [rng.standard_normal((1, 4, 10)) + 2.0 for _ in range(3)]
    for x in xs:
        mo.update(x)
    p = np.concatenate([patches(lay, x) for x in xs], axis=1)
    assert mo.count == p.shape[1] == 30
    assert np.allclose(mo.mean, p.mean(axis=1))
    assert np.allclose(mo.second, np.einsum("gpi,gpj->gij", p, p) / 30)
    # padding counts as zeros: the first patch of group 0 starts with the pad value
    assert np.all(patches(lay, xs[0])[0, 0, [0, 3]] == 0)


def test_layouts_it_cannot_take_are_none():
    w = np.ones((2, 2, 3), np.float32)
    ct = graph([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="t",
                                 kernel_shape=[3])], {"w": w}, [1, 2, 5])
    ap = graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[3],
                                 auto_pad="SAME_UPPER")], {"w": w}, [1, 2, 5])
    mm = graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="m")],
               {"w": np.ones((2, 3, 4), np.float32)}, [2, 5, 3])
    for m in (ct, ap, mm):
        assert layout(m.graph.node[0], _inits(m)) is None


@pytest.mark.parametrize("xs,ws,attrs", CONVS)
def test_means_without_patches_equal_the_patch_means(xs, ws, attrs):
    rng = np.random.default_rng(4)
    w = rng.standard_normal(ws).astype(np.float32)
    m = graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c", **attrs)], {"w": w}, xs)
    lay = layout(m.graph.node[0], _inits(m))
    x = rng.standard_normal((3, *xs[1:])) + 1.0
    full, means = Moments(lay), Moments(lay, second=False)
    full.update(x, 2 * x)
    means.update(x, 2 * x)
    assert means.count == full.count
    assert np.allclose(means.mean, full.mean) and np.allclose(means.mean_ref, full.mean_ref)

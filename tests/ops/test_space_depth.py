"""espstream/ops/space_depth.py: DepthToSpace (CRD, DCR) and SpaceToDepth; ESP-DL's kernels
against ONNX's definitions (hypothesis), the lowering's channel reorder through every stage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, run_case

from espstream.errors import UserError
from espstream.ops.space_depth import (
    espdl_depth_to_space,
    espdl_space_to_depth,
    onnx_depth_to_space,
    onnx_space_to_depth,
)
from espstream.stream.streamify import streamify_model


def _case(op: str, shape, **attrs):
    def case():
        nodes = [helper.make_node("Relu", ["x"], ["r"]),
                 helper.make_node(op, ["r"], ["y"], **attrs)]
        return model(nodes, list(shape)), {op}
    return case


CASES = {
    "DepthToSpace": _case("DepthToSpace", (1, 8, 2, 3), blocksize=2, mode="CRD"),
    "SpaceToDepth": _case("SpaceToDepth", (1, 3, 4, 6), blocksize=2),
}
MORE = {
    "d2s_dcr_c_eq_b": _case("DepthToSpace", (1, 8, 2, 3), blocksize=2, mode="DCR"),
    "d2s_dcr_reorder": _case("DepthToSpace", (1, 12, 2, 2), blocksize=2, mode="DCR"),
    "d2s_dcr_one_channel": _case("DepthToSpace", (1, 9, 2, 2), blocksize=3, mode="DCR"),
    "s2d_one_channel": _case("SpaceToDepth", (1, 1, 6, 3), blocksize=3),
}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize("name", [*CASES, *MORE])
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(name: str, target: str, bits: int) -> None:
    run_case({**CASES, **MORE}[name], target, bits)


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), co=st.integers(1, 4), h=st.integers(1, 3), w=st.integers(1, 3),
       n=st.integers(1, 2))
def test_espdl_crd_is_onnx_crd(b, co, h, w, n) -> None:
    x = np.random.default_rng(b * 7 + co).integers(-128, 128, (n, co * b * b, h, w), np.int8)
    assert np.array_equal(espdl_depth_to_space(_nhwc(x), b, "CRD"),
                          _nhwc(onnx_depth_to_space(x, b, "CRD")))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), w=st.integers(1, 3))
def test_espdl_dcr_is_onnx_dcr_when_channels_equal_blocksize(b, h, w) -> None:
    x = np.random.default_rng(b + h).integers(-128, 128, (1, b ** 3, h, w), np.int8)
    assert np.array_equal(espdl_depth_to_space(_nhwc(x), b, "DCR"),
                          _nhwc(onnx_depth_to_space(x, b, "DCR")))


def test_espdl_dcr_refuses_other_shapes() -> None:
    with pytest.raises(UserError, match="right only when they are equal"):
        espdl_depth_to_space(np.zeros((1, 2, 2, 12), np.int8), 2, "DCR")


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 3), w=st.integers(1, 3))
def test_espdl_space_to_depth_is_onnx_after_the_reorder(b, c, h, w) -> None:
    """ESP-DL writes channel c * b^2 + k; ONNX k * C + c (the lowering's rule 3)."""
    x = np.random.default_rng(c * 5 + b).integers(-128, 128, (1, c, h * b, w * b), np.int8)
    got = espdl_space_to_depth(_nhwc(x), b)
    n_, oh, ow, _ = got.shape
    reordered = got.reshape(n_, oh, ow, c, b * b).transpose(0, 1, 2, 4, 3).reshape(got.shape)
    assert np.array_equal(reordered, _nhwc(onnx_space_to_depth(x, b)))


def test_onnx_oracles_against_a_hand_example() -> None:
    # ONNX's DepthToSpace DCR example (operator docs): [1, 8, 2, 3], blocksize 2
    x = np.arange(48).reshape(1, 8, 2, 3)
    y = onnx_depth_to_space(x, 2, "DCR")
    assert y[0, 0, 0].tolist() == [0, 12, 1, 13, 2, 14]
    assert y[0, 1, 3].tolist() == [33, 45, 34, 46, 35, 47]
    assert onnx_space_to_depth(y, 2).tolist() == x.tolist()


def test_time_axis_is_refused_by_streamify() -> None:
    m, _ = _case("DepthToSpace", (1, 8, 2, 6), blocksize=2, mode="CRD")()
    with pytest.raises(UserError, match=r"\(DepthToSpace\) moves values between the time axis"):
        streamify_model(m, 2, axes={"x": 3})

"""espstream/ops/resize.py: Resize (int8; nearest asymmetric / floor, linear half_pixel or
align_corners); ESP-DL's float32 arithmetic against ONNX's definition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, refused, run_case

from espstream.errors import UserError
from espstream.ops.resize import espdl_resize, espdl_scales, onnx_resize_oracle
from espstream.stream.streamify import streamify_model


def _case(shape=(1, 3, 4, 5), scales=(1, 1, 2, 3), mode="nearest", ctm="asymmetric",
          nearest_mode="floor", sizes=None):
    def case():
        inits = {}
        if sizes is None:
            ins = ["r", "", "sc"]
            inits["sc"] = np.asarray(scales, np.float32)
        else:
            ins = ["r", "", "", "sz"]
            inits["sz"] = np.asarray(sizes, np.int64)
        nodes = [helper.make_node("Relu", ["x"], ["r"]),
                 helper.make_node("Resize", ins, ["y"], mode=mode,
                                  coordinate_transformation_mode=ctm, nearest_mode=nearest_mode)]
        return model(nodes, list(shape), inits, opset=13), {"Resize"}
    return case


CASES = {"Resize": _case()}
MORE = {
    "nearest_2x2": _case(scales=(1, 1, 2, 2)),
    "nearest_1d": _case((1, 4, 6), (1, 1, 3)),
    "linear_half_pixel": _case(scales=(1, 1, 2, 2), mode="linear", ctm="half_pixel"),
    "linear_align": _case((1, 4, 5), (1, 1, 3), mode="linear", ctm="align_corners"),
    "sizes": _case(sizes=(1, 3, 7, 10), mode="linear", ctm="align_corners"),
}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize("name", [*CASES, *MORE])
@pytest.mark.parametrize("target", ["esp32p4", "esp32s3", "c"])
def test_through_every_stage(name: str, target: str) -> None:
    run_case({**CASES, **MORE}[name], target, 8)


@pytest.mark.parametrize(("kw", "words"), [
    ({"ctm": "half_pixel"}, "nearest is asymmetric with floor only"),
    ({"mode": "linear", "ctm": "asymmetric"}, "linear with asymmetric"),
    ({"mode": "cubic"}, "mode cubic"),
    ({"scales": (1, 2, 1, 1)}, "batch or channel axis"),
])
def test_refusals(kw, words) -> None:
    refused(_case(**kw), "export", words)


def test_int16_is_refused() -> None:
    from op_harness import _data

    from espstream.export import export_model
    from espstream.quant import calibrate_model

    m, _ = _case()()
    data, _ = _data(m)
    qdq = calibrate_model(m, data, target="esp32p4", bits=16, report_samples=0).model
    with pytest.raises(UserError, match="int8 only"):
        export_model(qdq)


def test_resizing_time_is_refused_by_streamify() -> None:
    m, _ = _case((1, 4, 6), (1, 1, 2))()
    with pytest.raises(UserError, match=r"\(Resize\) resizes the time axis"):
        streamify_model(m, 2, axes={"x": 2})


@settings(max_examples=60, deadline=None)
@given(h=st.integers(2, 5), w=st.integers(2, 6), sh=st.integers(1, 3), sw=st.integers(1, 4),
       linear=st.booleans(), align=st.booleans(), one_d=st.booleans())
def test_espdl_resize_is_onnx_within_one_step(h, w, sh, sw, linear, align, one_d) -> None:
    """ESP-DL's float32 kernel, against ONNX's definition in float64: nearest exact, linear
    within one output step (float32 weights, one rounding)."""
    rng = np.random.default_rng(h * 10 + w)
    shape = (1, 3, w) if one_d else (1, 3, h, w)
    q = rng.integers(-128, 128, shape).astype(np.int8)
    scales = [1.0, 1.0, float(sw)] if one_d else [1.0, 1.0, float(sh), float(sw)]
    mode = "linear" if linear else "nearest"
    ctm = ("align_corners" if align else "half_pixel") if linear else "asymmetric"
    sc, out_sp = espdl_scales(list(shape[2:]), np.asarray(scales, np.float32), None)
    rt = np.moveaxis(q, 1, -1)
    got = np.moveaxis(espdl_resize(rt, -5, -5, mode, align and linear, sc, out_sp, "half_even"),
                      -1, 1)
    want = onnx_resize_oracle(q.astype(np.float64), mode, ctm, scales[2:], out_sp)
    tol = 0 if not linear else 0.5 + 1e-4  # linear: one rounding of a float32 value
    assert got.shape == want.shape
    assert np.abs(got - np.clip(want, -128, 127)).max() <= tol

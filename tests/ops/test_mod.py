"""espstream/ops/mod.py: Mod (fmod=1) through calibrate, export and the simulator; the integer
path against a scalar reading of dl_base_mod.cpp (the ops suite's files judge both widths:
tests/test_ops_suite.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, refused, run_case

from espstream.ops._elemwise import float_binary
from espstream.ops.mod import fmod0
from espstream.sim import round_float


def _case(fmod: int = 1):
    def case():
        nodes = [helper.make_node("Mod", ["x", "c"], ["y"], fmod=fmod)]
        c = np.array([0.7, 1.0, 1.5, -0.9], np.float32).reshape(1, 4, 1)
        return model(nodes, [1, 4, 8], {"c": c}, opset=13), {"Mod"}
    return case


CASES = {"Mod": _case()}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(target: str, bits: int) -> None:
    run_case(CASES["Mod"], target, bits)


def test_fmod0_refused() -> None:
    refused(_case(0), "calibrate", "fmod=0")


def _oracle(a: int, b: int, e0: int, e1: int, eo: int, rounding: str, lo: int, hi: int) -> int:
    x, y = a * 2.0 ** e0, b * 2.0 ** e1  # exact in float64 and float32
    r = 0.0 if y == 0 else math.fmod(x, y)  # fmod is exact: no float32 rounding to model
    return int(min(max(round_float(np.float64(r * 2.0 ** -eo), rounding), lo), hi))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 1), st.integers(-8, -2), st.integers(-8, -2), st.integers(-9, -2),
       st.sampled_from(["half_even", "half_up"]), st.integers(0, 2**31 - 1))
def test_kernel_matches_scalar_oracle(b16, e0, e1, eo, rounding, seed) -> None:
    dtype = np.dtype(np.int16 if b16 else np.int8)
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    a = rng.integers(info.min, info.max + 1, (4, 6)).astype(dtype)
    b = rng.integers(info.min, info.max + 1, (4, 1)).astype(dtype)
    b[0] = 0
    got = float_binary(a, b, e0, e1, eo, fmod0, rounding, dtype)
    want = [[_oracle(int(x), int(b[i, 0]), e0, e1, eo, rounding, info.min, info.max)
             for x in row] for i, row in enumerate(a)]
    assert got.tolist() == want


def test_sign_follows_dividend() -> None:
    f = np.float32
    assert fmod0(f([-7.0, 7.0, 5.0]), f([3.0, -3.0, 0.0])).tolist() == [-1.0, 1.0, 0.0]


def test_streams_equal_to_offline() -> None:
    """Streamify's broadcast rule: the chunked model equals the offline one (verify)."""
    from espstream.stream.streamify import streamify_model
    from espstream.verify import verify_models

    m, _ = CASES["Mod"]()
    r = streamify_model(m, 2, axes={"x": 2})
    assert "Mod" in {n.op_type for n in r.model.graph.node}
    v = verify_models(m, r.model, random=2)
    assert v.ok, v.failure()

"""espstream/ops/pow.py: Pow with a constant exponent through calibrate, export and the
simulator; the integer path against a scalar reading of dl_base_pow.cpp (the ops suite's
float32 Pow files judge the float path: tests/test_ops_suite.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, refused, run_case

from espstream.ops._elemwise import float_binary
from espstream.sim import round_float

F32 = np.float32


def _case(exponent: float):
    def case():
        nodes = [helper.make_node("Pow", ["x", "c"], ["y"])]
        return model(nodes, [1, 4, 8], {"c": np.array(exponent, np.float32)}), {"Pow"}
    return case


def _tensor_exponent():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Pow", ["r", "x"], ["y"])]
    return model(nodes, [1, 4, 8]), {"Pow"}


CASES = {"Pow": _case(2.0)}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(target: str, bits: int) -> None:
    run_case(CASES["Pow"], target, bits)


def test_cube() -> None:
    run_case(_case(3.0))


def test_tensor_exponent_refused() -> None:
    refused(_tensor_exponent, "calibrate", "the exponent must be a constant")


def _oracle(a: int, b: int, e0: int, e1: int, eo: int, rounding: str, lo: int, hi: int) -> int:
    base, ex = F32(a) * F32(2.0 ** e0), F32(b) * F32(2.0 ** e1)
    with np.errstate(all="ignore"):
        y = F32(F32(base ** ex) * F32(2.0 ** -eo))
    if np.isnan(y):
        return 0
    if np.isinf(y):
        return hi if y > 0 else lo
    return int(min(max(round_float(np.float64(y), rounding), lo), hi))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 1), st.integers(-8, -4), st.integers(-6, -3), st.integers(-8, -2),
       st.sampled_from(["half_even", "half_up"]), st.integers(0, 2**31 - 1))
def test_kernel_matches_scalar_oracle(b16, e0, e1, eo, rounding, seed) -> None:
    dtype = np.dtype(np.int16 if b16 else np.int8)
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    a = rng.integers(info.min, info.max + 1, (3, 8)).astype(dtype)
    b = rng.integers(info.min, info.max + 1, (1, 8)).astype(dtype)
    got = float_binary(a, b, e0, e1, eo, np.power, rounding, dtype)
    want = [[_oracle(int(x), int(y), e0, e1, eo, rounding, info.min, info.max)
             for x, y in zip(row, b[0], strict=True)] for row in a]
    assert got.tolist() == want


def test_hand_values() -> None:
    # (24 * 2**-4)**2 = 2.25 -> 9 at e_out -2; (-3 * 2**-1)**2 = 2.25 -> 2.25 * 2 = 4.5: a tie
    q = float_binary(np.int8([24]), np.int8([64]), -4, -5, -2, np.power, "half_up", np.int8)
    assert q.tolist() == [9]
    for rounding, want in (("half_up", 5), ("half_even", 4)):
        q = float_binary(np.int8([-3]), np.int8([64]), -1, -5, -1, np.power, rounding, np.int8)
        assert q.tolist() == [want]


def test_streams_equal_to_offline() -> None:
    """Streamify's broadcast rule: the chunked model equals the offline one (verify)."""
    from espstream.stream.streamify import streamify_model
    from espstream.verify import verify_models

    m, _ = CASES["Pow"]()
    r = streamify_model(m, 2, axes={"x": 2})
    assert "Pow" in {n.op_type for n in r.model.graph.node}
    v = verify_models(m, r.model, random=2)
    assert v.ok, v.failure()

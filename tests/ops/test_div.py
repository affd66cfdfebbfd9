"""espstream/ops/div.py: Div through calibrate, export and the simulator; ESP-DL's arithmetic
against a scalar reading of dl_base_div.cpp (the ops suite's files judge both:
tests/test_ops_suite.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, run_case

from espstream.ops import div
from espstream.ops._elemwise import inner_d0
from espstream.sim import round_float

F32 = np.float32


def _case_const():
    nodes = [helper.make_node("Div", ["x", "c"], ["y"])]
    c = np.linspace(0.5, 2.0, 4, dtype=np.float32).reshape(1, 4, 1)
    return model(nodes, [1, 4, 8], {"c": c}), {"Div"}


def _case_two():
    # a divisor bounded away from zero: Relu(x) + 1
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "one"], ["d"]),
             helper.make_node("Div", ["x", "d"], ["y"])]
    return model(nodes, [1, 4, 8], {"one": np.ones(1, np.float32)}), {"Div"}


def _case_scalar(first: bool):
    def case():  # a one-element operand: ESP-DL's int8 table path (rule 3)
        ins = ["c", "x"] if first else ["x", "c"]
        nodes = [helper.make_node("Div", ins, ["y"])]
        c = np.array([1.7 if first else 0.6], np.float32)
        return model(nodes, [1, 4, 8], {"c": c}), {"Div"}
    return case


CASES = {"Div": _case_const}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(target: str, bits: int) -> None:
    run_case(CASES["Div"], target, bits)


def test_two_activations() -> None:
    run_case(_case_two)


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("c", 16)])
def test_scalar_operand(first: bool, target: str, bits: int) -> None:
    run_case(_case_scalar(first), target, bits)


def _oracle(a: int, b: int, shift: int, rounding: str, bits: int, mode: str) -> int:
    """One element as the C code computes it, written from scratch with Python scalars."""
    lo, hi = (-128, 127) if bits == 8 else (-32768, 32767)
    if a == 0:
        return 0
    if b == 0:
        return hi if a > 0 else lo
    rs = F32(2.0 ** shift)
    y = F32(a) * F32(rs / F32(b)) if mode == "n_1" else F32(F32(a) * rs) / F32(b)
    return int(min(max(round_float(np.float64(y), rounding), lo), hi))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 1), st.sampled_from(["n_n", "n_1", "1_n"]), st.integers(-6, 6),
       st.sampled_from(["half_even", "half_up"]), st.integers(0, 2**31 - 1))
def test_kernel_matches_scalar_oracle(b16: int, mode: str, shift: int, rounding: str,
                                      seed: int) -> None:
    bits = 16 if b16 else 8
    dtype = np.int16 if b16 else np.int8
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    a = rng.integers(info.min, info.max + 1, 40).astype(dtype)
    b = rng.integers(info.min, info.max + 1, 40).astype(dtype)
    a[:3], b[3:6] = 0, 0  # the zero rules
    got = div.div_int(a, b, shift, rounding, np.dtype(dtype), mode)
    want = [_oracle(int(x), int(y), shift, rounding, bits, mode) for x, y in zip(a, b, strict=True)]
    assert got.tolist() == want


@settings(max_examples=40, deadline=None)
@given(st.integers(-128, 127), st.integers(-6, 6), st.sampled_from(["half_even", "half_up"]))
def test_tables(first: int, shift: int, rounding: str) -> None:
    """Rule 3: the n_1 table equals the n_1 function except at q0 = 0 (both 0); the 1_n table
    equals the 1_n function except where the divisor is 0 with q0 = 0 (the table says -128)."""
    i = np.arange(-128, 128).astype(np.int8)
    f = np.full(256, first, np.int8)
    t = div.div_table(first, shift, rounding, "n_1")
    assert t.tolist() == div.div_int(i, f, shift, rounding, np.dtype(np.int8), "n_1").tolist()
    t = div.div_table(first, shift, rounding, "1_n")
    ref = div.div_int(f, i, shift, rounding, np.dtype(np.int8), "1_n")
    if first == 0:
        ref[128] = -128
    assert t.tolist() == ref.tolist()


def test_hand_values() -> None:
    # 3 / 2 at R = 1 is 1.5: a tie (up on esp32s3 / c, to even on esp32p4)
    assert div.div_int(np.int8([3]), np.int8([2]), 0, "half_up", np.dtype(np.int8), "n_n") == 2
    assert div.div_int(np.int8([5]), np.int8([2]), 0, "half_even", np.dtype(np.int8), "n_n") == 2
    assert div.div_int(np.int8([-5, 5, 0]), np.int8([0, 0, 0]), 0, "half_up",
                       np.dtype(np.int8), "n_n").tolist() == [-128, 127, 0]
    assert div.div_int(np.int16([100]), np.int16([3]), 2, "half_up", np.dtype(np.int16),
                       "n_n") == 133  # 400 / 3


def test_inner_function_choice() -> None:
    """ESP-DL's axis merge: a trailing broadcast axis makes d0 == 1 for that input."""
    assert inner_d0([2, 48], [1], [2, 48]) == (96, 1, 96)
    assert inner_d0([1, 4, 5, 1], [1, 4, 5, 16], [1, 4, 5, 16]) == (1, 16, 16)
    assert inner_d0([5], [2, 3, 4, 5], [2, 3, 4, 5]) == (5, 5, 5)
    assert inner_d0([2, 3], [2, 3], [2, 3]) == (6, 6, 6)


def test_streams_equal_to_offline() -> None:
    """Streamify's broadcast rule: the chunked model equals the offline one (verify)."""
    from espstream.stream.streamify import streamify_model
    from espstream.verify import verify_models

    m, _ = CASES["Div"]()
    r = streamify_model(m, 2, axes={"x": 2})
    assert "Div" in {n.op_type for n in r.model.graph.node}
    v = verify_models(m, r.model, random=2)
    assert v.ok, v.failure()

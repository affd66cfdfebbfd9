"""espstream/ops/neg.py: Neg through every stage, and its saturating arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, run_case

from espstream.ops.neg import neg


def _tanh_neg():
    # Neg shares its input's exponent: a Tanh in front gives it one (both signs)
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Neg", ["t"], ["y"])]
    return model(nodes, [1, 4, 8]), {"Neg"}


CASES = {"Neg": _tanh_neg}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 16), ("c", 8)])
def test_neg(target: str, bits: int) -> None:
    run_case(CASES["Neg"], target, bits)


@given(st.lists(st.integers(-32768, 32767), min_size=1, max_size=64), st.sampled_from([8, 16]))
def test_neg_saturates_like_espdl(values: list[int], bits: int) -> None:
    dtype = np.int8 if bits == 8 else np.int16
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    q = np.clip(np.asarray(values), lo, hi).astype(dtype)
    # dl_module_neg.hpp: INT_MIN -> INT_MAX, every other value its negation
    want = [hi if v == lo else -int(v) for v in q]
    assert neg(q).tolist() == want
    assert neg(q).dtype == dtype

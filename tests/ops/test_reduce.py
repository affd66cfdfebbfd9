"""espstream/ops/reduce.py: the ten ESP-DL reductions through every stage, their kernel against
a plain loop, the merged-axis patterns ESP-DL refuses, and reductions over time refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, refused, run_case

from espstream.errors import UserError
from espstream.ops.reduce import pattern_problem, reduce_kernel
from espstream.stream.streamify import streamify_model

REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
              "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")
# positive inputs for the logarithm and a product of modest terms
POSITIVE = {"ReduceLogSum", "ReduceProd"}


def _reduce(op: str, axes: list[int], keepdims: int = 1, shape: list[int] | None = None):
    shape = shape or [1, 4, 8]

    def case():
        front = "Sigmoid" if op in POSITIVE else "Tanh"
        out = [d if k not in axes else 1 for k, d in enumerate(shape)] if keepdims else \
            [d for k, d in enumerate(shape) if k not in axes]
        nodes = [helper.make_node(front, ["x"], ["t"]),
                 helper.make_node(op, ["t", "axes"], ["y"], keepdims=keepdims)]
        return model(nodes, shape, {"axes": np.asarray(axes, np.int64)}, opset=18,
                     out_shape=out), {op}

    return case


CASES = {op: _reduce(op, [1]) for op in REDUCE_OPS}
NOT_LOWERED = {"ArgMax": "calibrate", "ArgMin": "calibrate", "CumSum": "calibrate"}


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 16), ("c", 8)])
def test_reduce_over_channels(op: str, target: str, bits: int) -> None:
    run_case(CASES[op], target, bits)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceSum"])
def test_reduce_2d_kept_axes_and_keepdims_0(op: str) -> None:
    run_case(_reduce(op, [1], keepdims=0, shape=[1, 4, 3, 5]), "esp32p4", 8)
    run_case(_reduce(op, [2, 3], keepdims=1, shape=[1, 4, 3, 5]), "esp32s3", 8)


def test_reduce_over_channels_streams() -> None:
    m = model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)], [1, 4, 8],
              opset=13, out_shape=[1, 1, 8])
    res = streamify_model(m, 2, axes={"x": 2})
    assert "ReduceMean" in {n.op_type for n in res.model.graph.node}


def test_reduce_over_time_is_refused() -> None:
    m = model([helper.make_node("ReduceMax", ["x"], ["y"], axes=[2], keepdims=1)], [1, 4, 8],
              opset=13, out_shape=[1, 4, 1])
    with pytest.raises(UserError, match="reduces over the time axis"):
        streamify_model(m, 2, axes={"x": 2})


def test_argmax_is_refused_by_calibrate() -> None:
    def case():
        return model([helper.make_node("Relu", ["x"], ["r"]),
                      helper.make_node("ArgMax", ["r"], ["y"], axis=1, keepdims=1)], [1, 4, 8],
                     out_shape=[1, 1, 8]), set()
    refused(case, "calibrate", "operator ArgMax is not supported by calibrate")


def test_unmerged_pattern_is_refused() -> None:
    # reduced, kept, reduced, kept, reduced: ESP-DL has no loop for R K R K R
    assert pattern_problem([True, False, True, False, True])
    assert pattern_problem([False, False]) is not None  # nothing reduced
    for ok in ([True], [False, True], [True, False], [True, False, True], [False, True, False],
               [False, True, False, True], [True, False, True, False]):
        assert pattern_problem(ok) is None, ok


def _loop(op: str, q: np.ndarray, axes: tuple[int, ...], e_in: int, e_out: int) -> np.ndarray:
    """The integer reductions by a plain Python loop: a wide integer sum, then one rounding
    shift (half up) into the output's exponent and saturation; Max / Min unscaled."""
    lo, hi = int(np.iinfo(q.dtype).min), int(np.iinfo(q.dtype).max)
    kept = [a for a in range(q.ndim) if a not in axes]
    out = np.zeros([q.shape[a] if a in kept else 1 for a in range(q.ndim)], np.int64)
    for idx in np.ndindex(*out.shape):
        sel = tuple(slice(None) if a in axes else idx[a] for a in range(q.ndim))
        vals = [int(v) for v in np.ravel(q[sel])]
        if op == "ReduceMax":
            out[idx] = max(vals)
            continue
        if op == "ReduceMin":
            out[idx] = min(vals)
            continue
        s = sum(vals) if op == "ReduceSum" else sum(abs(v) for v in vals) if op == "ReduceL1" \
            else sum(v * v for v in vals)
        shift = e_out - (2 * e_in if op == "ReduceSumSquare" else e_in)
        v = s * 2 ** -shift if shift <= 0 else (s + 2 ** (shift - 1)) // 2 ** shift
        out[idx] = min(max(v, lo), hi)
    return out


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["ReduceSum", "ReduceL1", "ReduceSumSquare", "ReduceMax", "ReduceMin"]),
       st.sampled_from([8, 16]), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from([(1,), (2,), (1, 2), (0, 1)]), st.integers(-6, 2), st.integers(0, 2**31))
def test_integer_reductions_against_a_loop(op, bits, a, b, c, axes, e_in, seed) -> None:
    dtype = np.int8 if bits == 8 else np.int16
    info = np.iinfo(dtype)
    q = np.random.default_rng(seed).integers(info.min, info.max + 1, (a, b, c)).astype(dtype)
    flags = [k in axes for k in range(3)]
    e_out = e_in + (4 if op != "ReduceSumSquare" else 2 * e_in + 9 - e_in)
    if op in ("ReduceMax", "ReduceMin"):
        e_out = e_in
    got = reduce_kernel(op, q, flags, e_in, e_out, 1, "half_up")
    np.testing.assert_array_equal(got.astype(np.int64), _loop(op, q, axes, e_in, e_out))

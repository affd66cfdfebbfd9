"""espstream/ops/norm.py: LayerNormalization, RMSNormalization and LpNormalization through every
stage, their kernels against plain float loops, and normalizations over time refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, refused, run_case

from espstream.errors import UserError
from espstream.ops import norm
from espstream.ops.norm import layernorm_fast, layernorm_kernel, lpnorm_kernel
from espstream.stream.streamify import streamify_model

C, T = 6, 5
RNG = np.random.default_rng(7)
GAMMA = (1.0 + 0.3 * RNG.standard_normal(C)).astype(np.float32)
BETA = (0.2 * RNG.standard_normal(C)).astype(np.float32)


def _frames_last(op: str, inits: dict, opset: int, **attrs):
    """x [1, C, T] -> Transpose -> [1, T, C] -> op over the last axis (features, per frame)."""
    def case():
        nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
                 helper.make_node(op, ["t", *inits], ["y"], **attrs)]
        return model(nodes, [1, C, T], inits, opset=opset, out_shape=[1, T, C]), {op}
    return case


CASES = {
    "LayerNormalization": _frames_last("LayerNormalization", {"g": GAMMA, "b": BETA}, 17,
                                       axis=-1, epsilon=1e-5),
    "RMSNormalization": _frames_last("RMSNormalization", {"g": GAMMA}, 23, axis=-1,
                                     epsilon=1e-5),
    "LpNormalization": lambda: (model([helper.make_node("LpNormalization", ["x"], ["y"], axis=1,
                                                        p=2)], [1, C, T]), {"LpNormalization"}),
}
NOT_LOWERED = {"BatchNormalization": "calibrate", "InstanceNormalization": "calibrate",
               "GroupNormalization": "calibrate", "MeanVarianceNormalization": "calibrate",
               "LRN": "calibrate"}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 16), ("c", 8)])
def test_norm(op: str, target: str, bits: int) -> None:
    run_case(CASES[op], target, bits)


def test_lp1_norm() -> None:
    run_case(lambda: (model([helper.make_node("LpNormalization", ["x"], ["y"], axis=1, p=1)],
                            [1, C, T]), {"LpNormalization"}), "esp32s3", 8)


def test_instance_norm_over_time_is_refused() -> None:
    m = model([helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"])], [1, 4, 8],
              {"s": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}, opset=13)
    with pytest.raises(UserError, match="mixes every frame of the time axis"):
        streamify_model(m, 2, axes={"x": 2})


def test_layernorm_mean_output_used_is_refused() -> None:
    def case():
        nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
                 helper.make_node("LayerNormalization", ["t", "g", "b"], ["n", "m"], axis=-1),
                 helper.make_node("Add", ["n", "m"], ["y"])]
        return model(nodes, [1, C, T], {"g": GAMMA, "b": BETA}, opset=17,
                     out_shape=[1, T, C]), set()
    refused(case, "export", "Mean / InvStdDev")


def _round(v: float) -> int:
    return math.floor(v + 0.5)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 12), st.sampled_from([8, 16]), st.integers(-7, -2),
       st.integers(0, 2**31))
def test_layernorm_kernel_near_float_loop(rows, n, bits, e_in, seed) -> None:
    """Within one step of the exact float LayerNorm (the kernel's float32 and Newton square
    root differ from float64 by far less than half a step at these sizes)."""
    dtype = np.int8 if bits == 8 else np.int16
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    q = rng.integers(info.min // 2, info.max // 2, (rows, n)).astype(dtype)
    e_out = -5 if bits == 8 else -12
    got = layernorm_kernel(q, None, 0, None, 0, 1, 1e-5, e_in, e_out, "half_up")
    for r in range(rows):
        x = [float(v) * 2.0 ** e_in for v in q[r]]
        mean = sum(x) / n
        var = sum((v - mean) ** 2 for v in x) / n
        for k, v in enumerate(x):
            want = min(max(_round((v - mean) / math.sqrt(var + 1e-5) * 2.0 ** -e_out),
                           info.min), info.max)
            assert abs(int(got[r, k]) - want) <= 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.sampled_from([1, 2]), st.sampled_from([8, 16]),
       st.integers(0, 2**31))
def test_lpnorm_kernel_near_float_loop(rows, n, p, bits, seed) -> None:
    dtype = np.int8 if bits == 8 else np.int16
    info = np.iinfo(dtype)
    q = np.random.default_rng(seed).integers(info.min + 1, info.max, (rows, n)).astype(dtype)
    e_out = -7 if bits == 8 else -15
    got = lpnorm_kernel(q, 1, p, e_out, "half_up")
    for r in range(rows):
        v = [float(a) for a in q[r]]
        norm = sum(abs(a) for a in v) if p == 1 else math.sqrt(sum(a * a for a in v))
        for k, a in enumerate(v):
            want = 0 if norm == 0 else min(max(_round(a / norm * 2.0 ** -e_out), info.min),
                                           info.max)
            assert abs(int(got[r, k]) - want) <= 1


EPSILONS = [0.0, 1e-45, 1e-12, 1e-5, 1e-3, 0.5, 3.0]


def _ln_case(seed: int, bits: int, rank: int, long_row: bool, fill: str, consts: str):
    """Random data of a random shape (int8 / int16, full-range, narrow or constant rows) and
    scale / bias of the row's length, of length 1, or absent."""
    rng = np.random.default_rng(seed)
    dtype = np.int8 if bits == 8 else np.int16
    info = np.iinfo(dtype)
    shape = [int(d) for d in rng.integers(1, 7, rank)]
    if long_row:
        shape[-1] = int(rng.integers(100, 400))
    axis = int(rng.integers(-rank, rank))
    if fill == "full":
        q = rng.integers(info.min, info.max, shape, endpoint=True)
    elif fill == "narrow":
        q = rng.integers(-3, 4, shape)
    else:  # every row constant (variance 0), one value per row
        ax = axis % rank
        rows = rng.integers(info.min, info.max, shape[:ax], endpoint=True)
        q = np.broadcast_to(rows.reshape(*shape[:ax], *[1] * (rank - ax)), shape)
    q = np.ascontiguousarray(q).astype(dtype)
    if rng.integers(2):  # a strided view: the kernel takes any layout
        q = np.ascontiguousarray(np.swapaxes(q, 0, -1)).swapaxes(0, -1)
    inner = q.shape[axis % rank:]
    n = int(np.prod(inner))

    def const(kind: str):
        if kind == "none":
            return None, 0
        size = 1 if kind == "one" else n
        return (rng.integers(info.min, info.max, size, endpoint=True).astype(dtype),
                int(rng.integers(-bits - 4, 4)))

    (s, e_s), (b, e_b) = const(consts[0]), const(consts[1])
    if s is not None and s.size == n and rng.integers(2):
        s = s.reshape(inner)  # as a node's initializer has the normalized shape
    return q, s, e_s, b, e_b, axis


_CONST = st.sampled_from(["none", "one", "row"])


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([8, 16]), st.integers(1, 4), st.booleans(),
       st.sampled_from(["full", "narrow", "constant"]), st.tuples(_CONST, _CONST),
       st.sampled_from(EPSILONS), st.integers(-16, 4), st.integers(-16, 4),
       st.sampled_from(["half_up", "half_even"]))
def test_layernorm_fast_is_the_numpy_kernel(seed, bits, rank, long_row, fill, consts, eps, e_in,
                                            e_out, rounding) -> None:
    """The C rows (`layernorm_fast`) give the NumPy kernel's bits: int8 / int16, any shape and
    axis, scale / bias present or absent, both roundings, epsilon 0 to 3, constant rows."""
    q, s, e_s, b, e_b, axis = _ln_case(seed, bits, rank, long_row, fill, consts)
    args = (s, e_s, b, e_b, axis, eps, e_in, e_out, rounding)
    with np.errstate(all="ignore"):
        want = layernorm_kernel(q, *args)
        got = layernorm_fast(q, *args)  # NaN results: the NumPy kernel again (its warnings)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_layernorm_fast_runs_c(monkeypatch) -> None:
    """Ordinary rows, constant rows with epsilon > 0 and long int16 rows take the C loop (the
    NumPy kernel, its fallback, is not called) and match a NumPy result taken beforehand."""
    cases = []
    for seed, (bits, fill, long_row) in enumerate([(8, "full", False), (8, "constant", False),
                                                   (16, "full", True), (16, "constant", True)]):
        q, s, e_s, b, e_b, axis = _ln_case(seed, bits, 3, long_row, fill, ("row", "row"))
        for rounding in ("half_up", "half_even"):
            args = (s, e_s, b, e_b, axis, 1e-5, -4, -5, rounding)
            cases.append((q, args, layernorm_kernel(q, *args)))

    def refuse(*a, **k):
        raise AssertionError("the NumPy kernel ran")

    monkeypatch.setattr(norm, "layernorm_kernel", refuse)
    for q, args, want in cases:
        np.testing.assert_array_equal(layernorm_fast(q, *args), want)

"""The Cython kernels against their NumPy oracle, and the oracle against hand-worked values and
onnxruntime's float Conv.

Property tests draw shapes and parameters with hypothesis and the data from a seeded NumPy
generator in one of three styles: full range, small values, or only the two extremes (which
saturates most outputs).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from espstream import kernels as fast
from espstream.kernels import reference as ref

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (np.int8, np.int16)


def _data(rng: np.random.Generator, shape, dtype, style: str) -> np.ndarray:
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    if style == "small":
        return rng.integers(-3, 4, shape).astype(dtype)
    if style == "extreme":
        return rng.choice(np.array([lo, hi], dtype), shape)
    return rng.integers(lo, hi + 1, shape, dtype=dtype)


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- strategies


@st.composite
def conv_cases(draw, big: bool = False):
    """A conv call: (x, w, bias, keyword arguments)."""
    nd = draw(st.sampled_from([1, 2]))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "depthwise_multiplier"]))
    top = 12 if big else 5
    if kind == "dense":
        groups, cig, cog = 1, draw(st.integers(1, 3 * top)), draw(st.integers(1, 2 * top))
    elif kind == "grouped":
        groups, cig, cog = (
            draw(st.integers(2, 4)),
            draw(st.integers(1, top)),
            draw(st.integers(1, top)),
        )
    elif kind == "depthwise":
        groups, cig, cog = draw(st.integers(1, 4 * top)), 1, 1
    else:
        groups, cig, cog = draw(st.integers(1, 2 * top)), 1, draw(st.integers(2, 3))
    kmax = 5 if big else 4
    k = (1 if nd == 1 else draw(st.integers(1, kmax)), draw(st.integers(1, kmax)))
    s = (1 if nd == 1 else draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (1 if nd == 1 else draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (
        [0, 0] + [draw(st.integers(0, 3)) for _ in range(2)]
        if nd == 1
        else [draw(st.integers(0, 3)) for _ in range(4)]
    )
    size = []
    for axis in range(2):
        extent = d[axis] * (k[axis] - 1) + 1
        least = max(1, extent - p[2 * axis] - p[2 * axis + 1])
        size.append(
            1 if (nd == 1 and axis == 0) else draw(st.integers(least, least + (20 if big else 8)))
        )
    c_in, c_out = groups * cig, groups * cog
    style = draw(st.sampled_from(["full", "small", "extreme"]))
    x = _data(rng, (size[0], size[1], c_in), dtype, style)
    w = _data(
        rng, (c_out, k[0], k[1], cig), dtype, draw(st.sampled_from(["full", "small", "extreme"]))
    )
    if nd == 1:
        x, w = x[0], w[:, 0]
        if draw(st.booleans()):
            x = x[None]
    elif draw(st.booleans()):
        x = x[None]
    bias = None
    if draw(st.booleans()):
        bmax = 2**31 - 1 if dtype == np.int8 else 2**46
        bmax = draw(st.sampled_from([100, 2**20, bmax]))
        bias = rng.integers(-bmax, bmax, c_out).astype(np.int32 if dtype == np.int8 else np.int64)
    smax = 20 if dtype == np.int8 else 40
    if draw(st.booleans()):
        shift = draw(st.integers(-4, smax))
    else:
        shift = rng.integers(-4, smax + 1, c_out)
    kwargs = dict(
        stride=s if nd == 2 else s[1],
        dilation=d if nd == 2 else (d[1],),
        pads=tuple(p) if nd == 2 else tuple(p[2:]),
        groups=groups,
        shift=shift,
        rounding=draw(st.sampled_from(ref.ROUNDINGS)),
        relu=draw(st.booleans()),
    )
    return x, w, bias, kwargs


@st.composite
def pool_cases(draw, big: bool = False):
    """A pool call: (x, kernel, keyword arguments)."""
    nd = draw(st.sampled_from([1, 2]))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kmax = 5 if big else 4
    k = (1 if nd == 1 else draw(st.integers(1, kmax)), draw(st.integers(1, kmax)))
    s = (1 if nd == 1 else draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (1 if nd == 1 else draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    p = (
        [0, 0] + [draw(st.integers(0, 3)) for _ in range(2)]
        if nd == 1
        else [draw(st.integers(0, 3)) for _ in range(4)]
    )
    size = []
    for axis in range(2):
        extent = d[axis] * (k[axis] - 1) + 1
        least = max(1, extent - p[2 * axis] - p[2 * axis + 1])
        size.append(
            1 if (nd == 1 and axis == 0) else draw(st.integers(least, least + (20 if big else 8)))
        )
    c = draw(st.integers(1, 40 if big else 20))
    x = _data(
        rng, (size[0], size[1], c), dtype, draw(st.sampled_from(["full", "small", "extreme"]))
    )
    if nd == 1:
        x = x[0]
        kernel = k[1] if draw(st.booleans()) else (k[1],)
        kwargs = dict(stride=s[1], dilation=d[1], pads=tuple(p[2:]))
    else:
        kernel = k
        kwargs = dict(stride=s, dilation=d, pads=tuple(p))
    if draw(st.booleans()):
        x = x[None]
    return x, kernel, kwargs


# ----------------------------------------------------------------------------- fast == reference


def _check_conv(case) -> None:
    x, w, bias, kwargs = case
    _assert_same(fast.conv(x, w, bias, **kwargs), ref.conv(x, w, bias, **kwargs))


@FAST
@given(conv_cases())
def test_conv_matches_reference(case):
    _check_conv(case)


def _check_avgpool(case, e_in: int, e_out: int, rounding: str) -> None:
    x, kernel, kwargs = case
    got = fast.avgpool(x, kernel, e_in=e_in, e_out=e_out, rounding=rounding, **kwargs)
    want = ref.avgpool(x, kernel, e_in=e_in, e_out=e_out, rounding=rounding, **kwargs)
    _assert_same(got, want)


@FAST
@given(pool_cases(), st.integers(-30, 20), st.integers(-30, 20), st.sampled_from(ref.ROUNDINGS))
def test_avgpool_matches_reference(case, e_in, e_out, rounding):
    _check_avgpool(case, e_in, e_out, rounding)


@FAST
@given(pool_cases())
def test_maxpool_matches_reference(case):
    x, kernel, kwargs = case
    _assert_same(fast.maxpool(x, kernel, **kwargs), ref.maxpool(x, kernel, **kwargs))


@FAST
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([np.int8, np.int16, np.int32]),
    st.sampled_from(DTYPES),
    st.integers(-40, 70),
    st.sampled_from(ref.ROUNDINGS),
    st.sampled_from(["full", "small", "extreme"]),
)
def test_requantize_matches_reference(seed, src, dst, shift, rounding, style):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 6, rng.integers(1, 4)))
    x = _data(rng, shape, src, style)
    got = fast.requantize(x, shift, rounding=rounding, dtype=dst)
    _assert_same(got, ref.requantize(x, shift, rounding=rounding, dtype=dst))



def _broadcast_pair(rng, dtype, style):
    shape = tuple(int(d) for d in rng.integers(1, 6, rng.integers(1, 4)))
    other = tuple(1 if rng.random() < 0.3 else d for d in shape)  # broadcast some axes
    return _data(rng, shape, dtype, style), _data(rng, other, dtype, style)


@FAST
@given(st.integers(0, 2**32 - 1), st.sampled_from(DTYPES),
       st.sampled_from(["full", "small", "extreme"]), st.booleans())
def test_add_sub_match_reference(seed, dtype, style, swap):
    """The narrow-type add / sub (int16 / int32 sums) give the int64 reference's bits."""
    rng = np.random.default_rng(seed)
    a, b = _broadcast_pair(rng, dtype, style)
    if swap:
        a, b = b, a
    _assert_same(fast.add(a, b), ref.add(a, b))
    _assert_same(fast.sub(a, b), ref.sub(a, b))


@FAST
@given(st.integers(0, 2**32 - 1), st.sampled_from(DTYPES), st.sampled_from(DTYPES),
       st.integers(-40, 70), st.sampled_from(ref.ROUNDINGS),
       st.sampled_from(["full", "small", "extreme"]))
def test_mul_matches_reference(seed, src, dst, shift, rounding, style):
    """The int32 int8 product path, every shift and rounding, equals the int64 reference."""
    rng = np.random.default_rng(seed)
    a, b = _broadcast_pair(rng, src, style)
    _assert_same(fast.mul(a, b, shift, rounding=rounding, dtype=dst),
                 ref.mul(a, b, shift, rounding=rounding, dtype=dst))


def test_narrow_elementwise_edges_by_hand():
    """The extremes of each narrow range: sums at +-2 * max, int8 products at 2**14."""
    a = np.array([-128, -128, 127, 127, 0], np.int8)
    b = np.array([-128, 127, 127, -128, -1], np.int8)
    np.testing.assert_array_equal(fast.add(a, b), [-128, -1, 127, -1, -1])
    np.testing.assert_array_equal(fast.sub(a, b), [0, -128, 0, 127, 1])
    # -128 * -128 = 16384; >> 7 = 128 -> 127; << 16 saturates; 127 * -128 = -16256 >> 14 = -0.99
    np.testing.assert_array_equal(fast.mul(a, b, 7), [127, -127, 126, -127, 0])
    np.testing.assert_array_equal(fast.mul(a, b, -16), [127, -128, 127, -128, 0])
    np.testing.assert_array_equal(fast.mul(a, b, 14, rounding="half_even"), [1, -1, 1, -1, 0])
    h = np.array([-32768, 32767], np.int16)
    np.testing.assert_array_equal(fast.add(h, h), [-32768, 32767])
    np.testing.assert_array_equal(fast.sub(h, h[::-1]), [-32768, 32767])
    with pytest.raises(ValueError, match="one dtype"):
        fast.sub(a, h)

@pytest.mark.slow
@SLOW
@given(conv_cases(big=True))
def test_conv_matches_reference_sweep(case):
    _check_conv(case)


@pytest.mark.slow
@SLOW
@given(
    pool_cases(big=True), st.integers(-12, 3), st.integers(-12, 3), st.sampled_from(ref.ROUNDINGS)
)
def test_pools_match_reference_sweep(case, e_in, e_out, rounding):
    _check_avgpool(case, e_in, e_out, rounding)
    x, kernel, kwargs = case
    _assert_same(fast.maxpool(x, kernel, **kwargs), ref.maxpool(x, kernel, **kwargs))


def test_conv_benchmark_shapes_match_reference():
    """The benchmark's three shapes (with padding, per-channel shifts, ReLU), full-range data."""
    rng = np.random.default_rng(7)
    cases = [
        (
            rng.integers(-128, 128, (1000, 64), np.int8),
            rng.integers(-128, 128, (64, 3, 64), np.int8),
            1,
            1,
        ),
        (
            rng.integers(-128, 128, (49, 10, 64), np.int8),
            rng.integers(-128, 128, (64, 3, 3, 1), np.int8),
            64,
            1,
        ),
        (
            rng.integers(-128, 128, (49, 10, 64), np.int8),
            rng.integers(-128, 128, (64, 1, 1, 64), np.int8),
            1,
            0,
        ),
    ]
    for x, w, groups, pads in cases:
        shift = rng.integers(6, 16, w.shape[0])
        bias = rng.integers(-(2**16), 2**16, w.shape[0]).astype(np.int32)
        for rounding in ref.ROUNDINGS:
            kw = dict(groups=groups, pads=pads, shift=shift, rounding=rounding, relu=True)
            _assert_same(fast.conv(x, w, bias, **kw), ref.conv(x, w, bias, **kw))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 70),
    st.integers(1, 80),
    st.sampled_from([(1, 1), (1, 3), (3, 3), (2, 1)]),
    st.sampled_from(ref.ROUNDINGS),
    st.booleans(),
    st.sampled_from(["full", "small", "extreme"]),
)
def test_conv_wide_dense_int8_matches_reference(seed, c_in, c_out, k, rounding, one_shift, style):
    """int8, groups 1, many channels: the all-channel kernel of _hot.h (even C_in) works in
    blocks of 32 output channels (SSE2: 16), so C_out around and past a block, odd C_in (the
    other kernel) and per-channel shifts (the general requantize) are all drawn here."""
    rng = np.random.default_rng(seed)
    hw = (int(rng.integers(k[0], 7)), int(rng.integers(k[1], 9)))
    x = _data(rng, (*hw, c_in), np.int8, style)
    w = _data(rng, (c_out, *k, c_in), np.int8, style)
    bias = rng.integers(-(2**15), 2**15, c_out).astype(np.int32)
    shift = 9 if one_shift else rng.integers(-2, 16, c_out)
    kw = dict(pads=int(rng.integers(0, 2)), stride=int(rng.integers(1, 3)), shift=shift,
              rounding=rounding, relu=bool(rng.integers(0, 2)))  # fmt: skip
    _assert_same(fast.conv(x, w, bias, **kw), ref.conv(x, w, bias, **kw))


@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_kernel_wider_than_input(width, dtype):
    """Padded windows that cover whole input rows: taps of the last column of one row and the
    first column of the next are adjacent in memory but not in the weights."""
    rng = np.random.default_rng(width)
    x = _data(rng, (4, width, 5), dtype, "full")
    w = _data(rng, (7, 3, 3, 5), dtype, "full")
    for pads in [(1, 1, 1, 1), (0, 2, 2, 0), (2, 0, 0, 2)]:
        kw = dict(pads=pads, shift=17 if dtype == np.int8 else 33)
        _assert_same(fast.conv(x, w, **kw), ref.conv(x, w, **kw))


# ----------------------------------------------------------------------------- the oracle by hand


@pytest.mark.parametrize(
    ("v", "s", "half_up", "half_even"),
    [
        (5, 1, 3, 2),  # 2.5
        (-5, 1, -2, -2),  # -2.5: half up goes toward +inf
        (7, 1, 4, 4),  # 3.5
        (-7, 1, -3, -4),  # -3.5
        (6, 2, 2, 2),  # 1.5
        (10, 2, 3, 2),  # 2.5
        (-10, 2, -2, -2),  # -2.5
        (-11, 2, -3, -3),  # -2.75
        (9, 2, 2, 2),  # 2.25
        (3, 0, 3, 3),
        (3, -2, 12, 12),  # left shift
        (-3, -4, -48, -48),
        (1, 40, 0, 0),
        (2**39, 40, 1, 0),  # 0.5
        (3 * 2**39, 40, 2, 2),  # 1.5
    ],
)
def test_round_shift_by_hand(v, s, half_up, half_even):
    assert ref.round_shift(np.array([v]), s, "half_up")[0] == half_up
    assert ref.round_shift(np.array([v]), s, "half_even")[0] == half_even
    # and the Cython requantize agrees (int32 input, int16 output, no saturation here)
    if -(2**31) <= v < 2**31:
        for rounding, want in (("half_up", half_up), ("half_even", half_even)):
            got = fast.requantize(np.array([v], np.int32), s, rounding=rounding, dtype=np.int16)
            assert got[0] == want


def test_requantize_saturates_by_hand():
    x = np.array([1000, -1000, 300, 40], np.int16)
    np.testing.assert_array_equal(ref.requantize(x, 0, dtype=np.int8), [127, -128, 127, 40])
    np.testing.assert_array_equal(ref.requantize(x, 3, dtype=np.int8), [125, -125, 38, 5])
    np.testing.assert_array_equal(
        ref.requantize(x, -40, dtype=np.int16), [32767, -32768, 32767, 32767]
    )


def test_conv_by_hand():
    # 1-D, one channel: x = 1 2 3, w = 1 1 -> sums 3, 5
    x = np.array([[1], [2], [3]], np.int8)
    w = np.array([[[1], [1]]], np.int8)
    np.testing.assert_array_equal(ref.conv(x, w, shift=1).ravel(), [2, 3])  # 1.5, 2.5 half up
    np.testing.assert_array_equal(ref.conv(x, w, shift=1, rounding="half_even").ravel(), [2, 2])
    # bias at e_in + e_w, then the shift: (3 - 8) / 2 = -2.5 and (5 - 8) / 2 = -1.5
    b = np.array([-8], np.int32)
    np.testing.assert_array_equal(ref.conv(x, w, b, shift=1).ravel(), [-2, -1])
    np.testing.assert_array_equal(
        ref.conv(x, w, b, shift=1, rounding="half_even").ravel(), [-2, -2]
    )
    np.testing.assert_array_equal(ref.conv(x, w, b, shift=1, relu=True).ravel(), [0, 0])
    # pads (1, 1): the padded taps add nothing -> 1, 3, 5, 3; stride 2 keeps 1, 5
    np.testing.assert_array_equal(ref.conv(x, w, pads=(1, 1)).ravel(), [1, 3, 5, 3])
    np.testing.assert_array_equal(ref.conv(x, w, pads=(1, 1), stride=2).ravel(), [1, 5])
    # dilation 2: x0 + x2 = 4; left shift by 5 saturates 128 -> 127
    np.testing.assert_array_equal(ref.conv(x, w, dilation=2).ravel(), [4])
    np.testing.assert_array_equal(ref.conv(x, w, dilation=2, shift=-5).ravel(), [127])
    # per-channel shifts, two output channels
    w2 = np.array([[[1], [1]], [[2], [2]]], np.int8)
    np.testing.assert_array_equal(ref.conv(x, w2, shift=[0, 1]), [[3, 3], [5, 5]])
    # depthwise 2-D, two channels, 2x2 kernel of ones on a 2x2 input: the per-channel sums
    x2 = np.array([[[1, 10], [2, 20]], [[3, 30], [4, 40]]], np.int16)
    w3 = np.ones((2, 2, 2, 1), np.int16)
    np.testing.assert_array_equal(ref.conv(x2, w3, groups=2), [[[10, 100]]])
    # int8 grouped: group 0 sees channel 0, group 1 channel 1
    w4 = np.array([[[[1]]], [[[-1]]]], np.int8)
    np.testing.assert_array_equal(ref.conv(x2.astype(np.int8), w4, groups=2)[0, 0], [1, -10])


def test_avgpool_by_hand():
    x = np.array([[1], [2], [1], [0], [-1], [0], [-3], [0]], np.int8)
    # kernel 2 stride 2: sums 3, 1, -1, -3 -> 1.5, 0.5, -0.5, -1.5
    up = ref.avgpool(x, 2, stride=2, e_in=0, e_out=0)
    even = ref.avgpool(x, 2, stride=2, e_in=0, e_out=0, rounding="half_even")
    np.testing.assert_array_equal(up.ravel(), [2, 1, 0, -1])
    np.testing.assert_array_equal(even.ravel(), [2, 0, 0, -2])
    # the full area divides even at the border: pads (1, 1), kernel 3 on 3 3 3 -> 6/3, 9/3, 6/3
    y = np.array([[3], [3], [3]], np.int16)
    np.testing.assert_array_equal(
        ref.avgpool(y, 3, pads=(1, 1), e_in=0, e_out=0).ravel(), [2, 3, 2]
    )
    # exponents: q * 2^e_in / area * 2^-e_out; 6 * 2^-1 / 3 * 2^1 = 2, then 2^-3 -> 0.25 -> 0
    np.testing.assert_array_equal(
        ref.avgpool(y, 3, pads=(1, 1), e_in=-1, e_out=-1).ravel(), [2, 3, 2]
    )
    np.testing.assert_array_equal(
        ref.avgpool(y, 3, pads=(1, 1), e_in=-3, e_out=0).ravel(), [0, 0, 0]
    )
    np.testing.assert_array_equal(
        ref.avgpool(y, 3, pads=(1, 1), e_in=0, e_out=-8).ravel(), [512, 768, 512]
    )
    np.testing.assert_array_equal(
        ref.avgpool(y.astype(np.int8), 3, pads=(1, 1), e_in=0, e_out=-8).ravel(), [127, 127, 127]
    )


def test_maxpool_by_hand():
    x = np.array([[-5, 1], [-7, 2]], np.int8)  # W = 2, C = 2
    # padding never wins, even against negative values
    np.testing.assert_array_equal(ref.maxpool(x, 2, pads=(1, 1)), [[-5, 1], [-5, 2], [-7, 2]])
    # 2-D, stride 2 over a 2x4 input
    x2 = np.arange(8, dtype=np.int16).reshape(2, 4, 1) * -1
    np.testing.assert_array_equal(ref.maxpool(x2, (2, 2), stride=2).ravel(), [0, -2])


def test_add_and_mul_by_hand():
    a = np.array([100, -100, 5], np.int8)
    b = np.array([100, -100, -7], np.int8)
    np.testing.assert_array_equal(ref.add(a, b), [127, -128, -2])
    np.testing.assert_array_equal(fast.add(a, b), [127, -128, -2])
    # 100*100 = 10000 >> 7 = 78.125 -> 78; -35 >> 1 = -17.5 -> -17 (up) / -18 (even)
    np.testing.assert_array_equal(ref.mul(a, b, 7), [78, 78, 0])
    np.testing.assert_array_equal(ref.mul(a[2:], b[2:], 1), [-17])
    np.testing.assert_array_equal(ref.mul(a[2:], b[2:], 1, rounding="half_even"), [-18])
    np.testing.assert_array_equal(ref.mul(a, b, 0), [127, 127, -35])


# ------------------------------------------------------------------------- oracle vs onnxruntime


def _ort_conv(x_nchw, w_oihw, b, attrs: dict, out_shape) -> np.ndarray:
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_nchw.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(w_oihw, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x_nchw})[0]


@settings(max_examples=25, deadline=None)
@given(conv_cases(), st.integers(0, 6), st.integers(0, 2**32 - 1))
def test_reference_conv_matches_onnxruntime_float_conv(case, shift, seed):
    """Small integer data is exact in float32: ORT's float Conv gives the exact sums, which the
    reference must reproduce with shift 0, and round half up with a right shift."""
    x, w, _, kwargs = case
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, x.shape).astype(np.int16)
    w = rng.integers(-4, 5, w.shape).astype(np.int16)
    bias = rng.integers(-50, 51, w.shape[0]).astype(np.int64)
    nd = w.ndim - 2
    x3 = ref.to_hwc(x, nd)
    x_nchw = np.moveaxis(x3, -1, 0)[None].astype(np.float32)  # [1, C, H, W]
    w_oihw = np.moveaxis(w if nd == 2 else w[:, None], -1, 1).astype(np.float32)
    win = ref.resolve_window(
        x3.shape[:2],
        w.shape[1:3] if nd == 2 else w.shape[1],
        nd,
        kwargs["stride"],
        kwargs["dilation"],
        kwargs["pads"],
    )
    t, b_, l_, r_ = win.pads
    attrs = dict(
        group=kwargs["groups"], strides=list(win.stride), dilations=list(win.dilation),
        pads=[t, l_, b_, r_], kernel_shape=list(win.kernel),
    )  # fmt: skip
    out_shape = [1, w.shape[0], *win.out_hw]
    exact = _ort_conv(x_nchw, w_oihw, bias.astype(np.float32), attrs, out_shape)[
        0
    ]  # [C_out, OH, OW]
    exact = np.moveaxis(exact, 0, -1).astype(np.int64)
    want0 = ref.from_hwc(np.clip(exact, -32768, 32767).astype(np.int16), x, nd)
    got0 = ref.conv(
        x,
        w,
        bias,
        stride=kwargs["stride"],
        dilation=kwargs["dilation"],
        pads=kwargs["pads"],
        groups=kwargs["groups"],
    )
    _assert_same(got0, want0)
    want = ref.from_hwc(
        np.floor(exact / 2**shift + 0.5).clip(-32768, 32767).astype(np.int16), x, nd
    )
    got = ref.conv(
        x,
        w,
        bias,
        stride=kwargs["stride"],
        dilation=kwargs["dilation"],
        pads=kwargs["pads"],
        groups=kwargs["groups"],
        shift=shift,
    )
    _assert_same(got, want)


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("impl", [fast, ref], ids=["fast", "reference"])
def test_conv_rejects_bad_arguments(impl):
    x = np.zeros((5, 4), np.int8)
    w = np.zeros((6, 3, 4), np.int8)
    with pytest.raises(ValueError, match="groups"):
        impl.conv(x, w, groups=3)
    with pytest.raises(ValueError, match="dtype"):
        impl.conv(x.astype(np.int16), w)
    with pytest.raises(ValueError, match="pads"):
        impl.conv(x, w, pads=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        impl.conv(x, w, dilation=3)
    with pytest.raises(ValueError, match="shift"):
        impl.conv(x, w, shift=[1, 2])
    with pytest.raises(ValueError, match="bias"):
        impl.conv(x, w, np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="rounding"):
        impl.conv(x, w, rounding="nearest")
    with pytest.raises(ValueError, match="batch 1"):
        impl.conv(np.zeros((2, 5, 4), np.int8), w)
    with pytest.raises(ValueError, match="int8 and int16"):
        impl.conv(x.astype(np.int32), w.astype(np.int32))
    with pytest.raises(ValueError, match="overflow"):
        impl.conv(np.zeros((1, 140000), np.int8), np.zeros((1, 1, 140000), np.int8))
    with pytest.raises(ValueError, match="does not fit"):
        impl.maxpool(x, 7)
    with pytest.raises(ValueError, match="stride"):
        impl.avgpool(x, 2, stride=0, e_in=0, e_out=0)
    with pytest.raises(ValueError, match="exponent"):
        impl.avgpool(x, 2, e_in=-200, e_out=0)


def test_kernels_share_signatures():
    import inspect

    for name in fast.__all__:
        assert inspect.signature(getattr(fast, name)) == inspect.signature(getattr(ref, name)), name


# ----------------------------------------------------------------------------- conv_prepared


@FAST
@given(conv_cases(), st.integers(0, 3))
def test_conv_prepared_matches_conv(case, extra_width):
    """One prepared conv on two input widths (its checks are kept per shape), three calls each,
    fast and reference twin, against `conv` bit for bit."""
    x, w, bias, kwargs = case
    wider = np.concatenate([x, x[..., -1:, :].repeat(extra_width, axis=-2)], axis=-2)
    for impl in (fast, ref):
        run = impl.conv_prepared(w, bias, **kwargs)
        for data in (x, wider, x, wider, x[::-1].copy()):
            _assert_same(run(data), ref.conv(data, w, bias, **kwargs))


@pytest.mark.parametrize("impl", [fast, ref], ids=["fast", "reference"])
def test_conv_prepared_checks_like_conv(impl):
    x = np.zeros((1, 5, 4), np.int8)
    w = np.ones((3, 2, 4), np.int8)
    with pytest.raises(ValueError, match="dtype"):
        impl.conv_prepared(w)(x.astype(np.int16))
    with pytest.raises(ValueError, match="shift"):
        impl.conv_prepared(w, shift=[1, 2])(x)
    with pytest.raises(ValueError, match="does not fit"):
        impl.conv_prepared(w, dilation=5)(x)
    run = impl.conv_prepared(w)
    run(x)  # a shape that fits, then one that does not: still checked
    with pytest.raises(ValueError, match="batch 1"):
        run(np.zeros((2, 5, 4), np.int8))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 40),
    st.sampled_from([(3,), (1,), (5,), (3, 3), (2, 3)]),
    st.integers(1, 6),
    st.sampled_from([np.int8, np.int16]),
    st.booleans(),
    st.booleans(),
)
def test_depthwise_paths_match_reference(seed, c, kernel, width, dtype, plain, per_channel):
    """The AVX2 depthwise loop (16 channels per step, even / odd packed weights, leftover
    channels in C) and the plain-C fallback a CPU without AVX2 runs, against the oracle: channel
    counts around the block, inputs narrower than the kernel, int16 data, per-channel shifts."""
    from espstream.kernels import _int8

    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    shape = (width, c) if len(kernel) == 1 else (width, width + 1, c)
    x = rng.integers(info.min, info.max + 1, shape, dtype=dtype)
    w = rng.integers(info.min, info.max + 1, (c, *kernel, 1), dtype=dtype)
    bias = rng.integers(-(2**12), 2**12, c).astype(np.int32 if dtype == np.int8 else np.int64)
    shift = rng.integers(1, 16, c).tolist() if per_channel else int(rng.integers(1, 16))
    args = dict(groups=c, pads=kernel[-1] // 2, shift=shift, relu=bool(seed % 2))
    want = ref.conv(x, w, bias, **args)
    _int8.set_plain_depthwise(plain)
    try:
        got = fast.conv(x, w, bias, **args)
        prepared = fast.conv_prepared(w, bias, **args)(x)
    finally:
        _int8.set_plain_depthwise(False)
    assert np.array_equal(got, want)
    assert np.array_equal(prepared, want)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 3, 15, 16, 17, 31, 32, 33, 64, 80]),
    st.sampled_from([(3,), (1,), (2,), (5,), (3, 3), (2, 3), (3, 4), (5, 5)]),
    st.integers(1, 21),
    st.integers(1, 3),
    st.integers(1, 2),
    st.booleans(),
)
def test_depthwise_vnni_whole_image_matches_reference(seed, c, kernel, width, dilation, stride,
                                                      no_vnni):
    """int8 depthwise: the AVX-512 VNNI whole-image loop (two column taps per int16 pair,
    16-channel blocks with a masked remainder, 1-8 columns per group, requantized in
    registers) and the per-pixel loop it replaces (forced by set_no_vnni), against the oracle:
    even and odd kernel widths, dilation and stride in both axes (rows read dh apart through
    the loop's ring of input rows), pads past the input, relu, half-even, per-channel shifts,
    widths around the 8-column group."""
    from espstream.kernels import _int8

    rng = np.random.default_rng(seed)
    style = ("full", "small", "extreme")[seed % 3]
    shape = (width, c) if len(kernel) == 1 else (1 + seed % 7, width, c)
    x = _data(rng, shape, np.int8, style)
    w = _data(rng, (c, *kernel, 1), np.int8, style)
    bias = rng.integers(-(2**15), 2**15, c).astype(np.int32)
    shift = int(rng.integers(1, 20)) if seed % 2 else rng.integers(1, 20, c)
    nd = len(kernel)
    # pads from 0 to past the kernel, at least what the dilated window needs to fit; rows
    # dilated and strided too (the loop's ring of input rows: rows read dh apart)
    need = max(0, dilation * (kernel[-1] - 1) + 1 - width)
    pl, pr = need + int(rng.integers(0, kernel[-1] + 1)), int(rng.integers(0, kernel[-1] + 1))
    dil_h, st_h = 1 + seed % 3, 1 + (seed // 3) % 3
    need_h = max(0, dil_h * (kernel[0] - 1) + 1 - shape[0])
    pt, pb = need_h + int(rng.integers(0, kernel[0] + 1)), int(rng.integers(0, kernel[0] + 1))
    kw = dict(groups=c, dilation=dilation if nd == 1 else (dil_h, dilation),
              stride=stride if nd == 1 else (st_h, stride),
              pads=(pl, pr) if nd == 1 else (pt, pb, pl, pr),
              shift=shift, rounding=("half_up", "half_even")[(seed // 2) % 2],
              relu=bool(seed % 5 == 0))
    want = ref.conv(x, w, bias, **kw)
    _int8.set_no_vnni(no_vnni)
    try:
        prepared = fast.conv_prepared(w, bias, **kw)
        got = [fast.conv(x, w, bias, **kw), prepared(x), prepared(x)]
    finally:
        _int8.set_no_vnni(False)
    for g in got:
        _assert_same(g, want)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 2, 3, 4, 6, 39, 40, 128]),
    st.integers(1, 140),
    st.sampled_from([(1,), (3,), (5,), (3, 3), (1, 2)]),
    st.integers(1, 13),
    st.integers(1, 8),
    st.booleans(),
    st.booleans(),
)
def test_conv_vnni_and_broadcast_paths_match_reference(seed, c_in, c_out, kernel, width,
                                                       dilation, one_shift, no_vnni):
    """int8, groups 1: the AVX-512 VNNI loop (1-4 pixels sharing their taps, blocks of 64
    output channels and a 16-channel remainder) and the AVX2 broadcast form it replaces (forced
    by set_no_vnni), against the oracle, the prepared call as well; odd C_in (widened by a zero
    channel), widths around the 4-pixel group, edges with fewer taps, C_out around 16 / 64."""
    from espstream.kernels import _int8

    rng = np.random.default_rng(seed)
    shape = (width, c_in) if len(kernel) == 1 else (width, width + 2, c_in)
    x = _data(rng, shape, np.int8, ("full", "small", "extreme")[seed % 3])
    w = _data(rng, (c_out, *kernel, c_in), np.int8, ("full", "small", "extreme")[seed % 3])
    # biases near 2**30 (int32 requantize refused: acc + bias may overflow) now and then;
    # shifts past 31 (refused too), per channel all right shifts or some left ones
    bmax = 2**30 if seed % 7 == 0 else 2**15
    bias = rng.integers(-bmax, bmax, c_out).astype(np.int32)
    shift = (10, 31, 33)[seed % 3] if one_shift else \
        rng.integers(-1 if seed % 4 == 0 else 1, 34 if seed % 5 == 0 else 16, c_out)
    nd = len(kernel)
    pad = dilation * (kernel[-1] - 1)
    # padding keeps every window inside the padded input (1-D: causal, as streamify writes)
    kw = dict(dilation=dilation if nd == 1 else (1, dilation),
              pads=(pad, 0) if nd == 1 else (kernel[0] - 1, 0, pad, 1), shift=shift,
              rounding=("half_up", "half_even")[seed % 2], relu=bool(seed % 5 == 0),
              stride=1 + seed % 2)
    want = ref.conv(x, w, bias, **kw)
    _int8.set_no_vnni(no_vnni)
    try:
        got = fast.conv(x, w, bias, **kw)
        prepared = fast.conv_prepared(w, bias, **kw)
        again = [prepared(x), prepared(x)]
    finally:
        _int8.set_no_vnni(False)
    _assert_same(got, want)
    for g in again:
        _assert_same(g, want)


@FAST
@given(st.integers(0, 2**32 - 1), st.sampled_from(DTYPES), st.sampled_from(DTYPES),
       st.integers(-16, 31), st.sampled_from(ref.ROUNDINGS),
       st.sampled_from(["full", "small", "extreme"]), st.integers(1, 700), st.booleans())
def test_flat_elementwise_loops_match_reference(seed, src, dst, shift, rounding, style, n,
                                                strided):
    """The one-pass C loops (same-shape add / sub, requantize of int8 / int16 data with a shift
    in [-15, 30], and just outside it) on lengths across the vector width and its remainder,
    contiguous or strided (copied first), against the int64 reference."""
    rng = np.random.default_rng(seed)
    a = _data(rng, (n, 2 if strided else 1), src, style)[:, 0]
    b = _data(rng, (n, 2 if strided else 1), src, style)[:, -1]
    _assert_same(fast.add(a, b), ref.add(a, b))
    _assert_same(fast.sub(a, b), ref.sub(a, b))
    _assert_same(fast.requantize(a, shift, rounding=rounding, dtype=dst),
                 ref.requantize(a, shift, rounding=rounding, dtype=dst))


@FAST
@given(st.integers(0, 2**32 - 1), st.sampled_from(DTYPES), st.integers(1, 4),
       st.integers(1, 7), st.integers(1, 5), st.integers(1, 4))
def test_cache_step_matches_reference(seed, dtype, rank, window, frames, calls):
    """StreamingCache's step, memcpy twin against the concatenating reference, over several
    calls (the kept frames carried), from the zero state, on any frame axis."""
    rng = np.random.default_rng(seed)
    axis = int(rng.integers(-rank, rank))
    shape = [int(d) for d in rng.integers(1, 4, rank)]
    shape[axis] = frames
    kf = kr = None
    for _ in range(calls):
        x = _data(rng, shape, dtype, "full")
        out_f, kf = fast.cache_step(kf, x, window, axis)
        out_r, kr = ref.cache_step(kr, x, window, axis)
        _assert_same(out_f, out_r)
        _assert_same(kf, kr)
    # the reference itself, by hand: W - 1 = 2 kept frames on axis 0 of [F, 1]
    out, kept = ref.cache_step(None, np.array([[1], [2], [3]], np.int8), 3, 0)
    np.testing.assert_array_equal(out[:, 0], [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(kept[:, 0], [2, 3])
    for impl in (fast, ref):
        with pytest.raises(ValueError, match="between calls"):
            impl.cache_step(kept, np.zeros((3, 2), np.int8), 3, 0)


@FAST
@given(pool_cases(), st.integers(-30, 20), st.integers(-30, 20), st.sampled_from(ref.ROUNDINGS),
       st.integers(0, 3))
def test_pool_prepared_matches_pool(case, e_in, e_out, rounding, extra):
    """The prepared pools (window checked once per shape) on two input sizes, called again and
    on a strided view, fast and reference, against the reference pools bit for bit."""
    x, kernel, kwargs = case
    wider = np.concatenate([x, x[..., -1:, :].repeat(extra, axis=-2)], axis=-2)
    scales = dict(e_in=e_in, e_out=e_out, rounding=rounding)
    for impl in (fast, ref):
        avg = impl.avgpool_prepared(kernel, **scales, **kwargs)
        mx = impl.maxpool_prepared(kernel, **kwargs)
        for data in (x, wider, x, wider[..., ::-1, :]):
            _assert_same(avg(data), ref.avgpool(data, kernel, **scales, **kwargs))
            _assert_same(mx(data), ref.maxpool(data, kernel, **kwargs))

"""Histogram observers: fixed memory, exact merging, and each exponent method on known data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espstream.quant.observers import HistogramObserver, weight_exponents


def test_minmax_exponent_of_max_3():
    o = HistogramObserver()
    o.update(np.array([0.5, -1.0, 3.0, 2.0], np.float32))
    # 127 * 2^-5 = 3.97 >= 3 > 127 * 2^-6 = 1.98
    assert o.minmax_exponent(8) == -5
    assert o.exponent("minmax", 8) == -5
    assert (o.min, o.max, o.count) == (-1.0, 3.0, 4)


def test_state_size_does_not_grow_with_samples():
    o = HistogramObserver(bins=1024)
    rng = np.random.default_rng(0)
    o.update(rng.standard_normal(1000))
    size = o.nbytes
    for i in range(200):
        o.update(rng.standard_normal(5000) * (1 + i))  # the range keeps growing too
    assert o.nbytes == size
    assert o.count == 1000 + 200 * 5000
    assert int(o.hist.sum()) == o.count


def test_histogram_merge_is_exact_whatever_the_order():
    rng = np.random.default_rng(1)
    small = rng.uniform(-0.9, 0.9, 5000)
    large = rng.uniform(-30, 30, 5000)
    a, b = HistogramObserver(256), HistogramObserver(256)
    a.update(small)
    a.update(large)  # R grows from 1 to 32 after the first batch: bins merge
    b.update(np.concatenate([large, small]))
    assert a.top == b.top == 5
    np.testing.assert_array_equal(a.hist, b.hist)


def test_zeros_are_counted_apart():
    o = HistogramObserver(64)
    o.update(np.array([0.0, 0.0, 0.0, 1.5, -0.5]))
    assert o.zeros == 3 and int(o.pos.sum()) == 1 and int(o.neg.sum()) == 1


def test_percentile_exponent_on_uniform_data():
    # |x| uniform on [0, 100): the 99th percentile is 99; 127 * 2^0 = 127 >= 99 > 63.5,
    # so e = 0; with 1 % of 200 clipping allowed, minmax (max 199.99) needs e = 1.
    x = np.concatenate([np.linspace(0, 100, 10000, endpoint=False), [199.99]])
    o = HistogramObserver()
    o.update(x)
    assert o.percentile_abs(99.0) == pytest.approx(99.0, abs=0.1)
    assert o.percentile_exponent(8, 99.0) == 0
    assert o.minmax_exponent(8) == 1


def test_expected_error_matches_monte_carlo():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(400_000)
    o = HistogramObserver()
    o.update(x)
    for e in (-3, -5, -7):  # mostly clipping, balanced, mostly rounding
        s = 2.0**e
        q = np.clip(np.rint(x / s), -128, 127) * s
        empirical = float(np.mean((x - q) ** 2))
        assert o.expected_sq_error(e, 8) == pytest.approx(empirical, rel=0.03)


def test_mse_exponent_on_gaussian():
    # N(0, 1), int8. By hand: e=-5 (range 3.97) costs rounding 2^-10/12 = 8.1e-5 plus
    # clipping 2 * int_{3.97}^inf (x-3.97)^2 phi(x) dx ~ 4e-6 -> 8.5e-5; e=-4 costs
    # 2^-8/12 = 3.3e-4; e=-6 (range 1.98) clips ~ 2 * 0.0095 = 0.019. So mse picks -5.
    x = np.random.default_rng(3).standard_normal(200_000)
    o = HistogramObserver()
    o.update(x)
    assert o.minmax_exponent(8) == -4  # max |x| ~ 4.5 > 3.97
    assert o.mse_exponent(8) == -5


def test_mse_prefers_clipping_a_rare_outlier():
    # 10^6 values uniform in [-1, 1] and one at 10. minmax: 127 * 2^-3 = 15.9 >= 10 > 7.9,
    # e = -3. Expected total squared error by hand (rounding N s^2 / 12, plus the outlier's
    # clipping (10 - 127 s)^2): e=-3: 1302; e=-4: 326 + 4.2 = 330; e=-5: 81 + 36.4 = 117;
    # e=-6: 20.3 + 64.3 = 84.6; e=-7: 5.1 + 81.1 (+ 0.1 for the bulk's clipped edge) = 86.3.
    x = np.concatenate([np.random.default_rng(4).uniform(-1, 1, 1_000_000), [10.0]])
    o = HistogramObserver()
    o.update(x)
    assert o.minmax_exponent(8) == -3
    assert o.mse_exponent(8) == -6


def test_kl_exponent_clips_a_far_outlier():
    # 10^6 values N(0, 1) and one at 1000: minmax e = 3 (127 * 8 = 1016). R = 1024, so bins are
    # 1/4 wide and only thresholds 128 * 2^e >= 128 bins * 1/4 = 32 compete: e >= -2.
    # At e = -2 every level is one bin, so Q = P on the bulk and the folded outlier costs only
    # ~ 1e-6 * log(1e-6 / 1e-12) = 1.4e-5; at e = -1 pairs of bins merge, and on a Gaussian
    # neighbours differ by ~ x / 4 relatively, which costs ~ 1e-3; larger e merge more.
    x = np.concatenate([np.random.default_rng(5).standard_normal(1_000_000), [1000.0]])
    o = HistogramObserver()
    o.update(x)
    assert o.minmax_exponent(8) == 3
    assert o.kl_exponent(8) == -2


def test_kl_with_16_bits_is_minmax():
    o = HistogramObserver()
    o.update(np.random.default_rng(6).standard_normal(10_000))
    assert o.kl_exponent(16) == o.minmax_exponent(16)


def test_clipped_fraction():
    o = HistogramObserver()
    o.update(np.linspace(0, 10, 100_001))
    # e = -4: range 127/16 = 7.9375; the share above is (10 - 7.9375) / 10
    assert o.clipped_fraction(-4, 8) == pytest.approx(0.20625, abs=1e-3)
    assert o.clipped_fraction(o.minmax_exponent(8), 8) == 0.0


def test_all_zero_tensor():
    o = HistogramObserver()
    o.update(np.zeros(100))
    for m in ("minmax", "percentile", "kl", "mse"):
        assert o.exponent(m, 8) == -7


def test_nan_is_refused():
    o = HistogramObserver()
    with pytest.raises(ValueError):
        o.update(np.array([1.0, math.nan]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=300),
       st.integers(1, 4))
def test_histogram_counts_everything_in_the_right_bin(values, splits):
    x = np.asarray(values, np.float32)
    o = HistogramObserver(128)
    for part in np.array_split(x, splits):
        o.update(part)
    assert int(o.hist.sum()) == len(x)
    assert o.zeros == int(np.sum(x == 0))
    if o.top is not None:
        w = o.width
        for v in x[x != 0]:
            j = min(int(abs(float(v)) // w), o.bins - 1)
            side = o.pos if v > 0 else o.neg
            assert side[j] > 0


def test_weight_exponents_per_channel_and_tensor():
    w = np.array([[3.0, -1.0], [0.1, 0.2], [-4.0, 0.0]])
    # rows: max 3 -> -5; max 0.2: 127 * 2^-10 = 0.124 < 0.2 <= 127 * 2^-9 = 0.248 -> -9;
    # min -4 = -128 * 2^-5 exactly -> -5. Per tensor: -4 and 3 both fit -5.
    assert weight_exponents(w, 0, 8).tolist() == [-5, -9, -5]
    assert weight_exponents(w, None, 8).tolist() == [-5]
    # columns (axis 1): max 3 / min -4 -> -5; max 0.2, min -1 -> -128 * 2^-7 = -1 -> -7
    assert weight_exponents(w, 1, 8).tolist() == [-5, -7]


def test_weight_mse_exponent_clips_an_outlier():
    # 999 weights spread over [-0.1, 0.1] and one at 1.0: minmax e = -6 (127/64 = 1.98 >= 1 >
    # 0.99), leaving the bulk ~6 steps wide; -7 (range 0.99) clips 1.0 by only 0.008, and
    # quarters the rounding error of the bulk, so mse picks -7 (or lower).
    w = np.concatenate([np.linspace(-0.1, 0.1, 999), [1.0]])
    assert weight_exponents(w, None, 8, "minmax").tolist() == [-6]
    assert weight_exponents(w, None, 8, "mse")[0] <= -7


# ---- the fast mse search against its plain statement ------------------------------------------


@st.composite
def observers(draw):
    """An observer fed 1-3 batches of one of several kinds of data (normal, ReLU, heavy tails,
    an outlier, small integers), over 4 to 8192 bins."""
    o = HistogramObserver(bins=2 ** draw(st.integers(2, 13)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "relu", "heavy", "outlier", "ints", "tiny"]))
    scale = 10.0 ** draw(st.floats(-6, 4))
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 3000))
        x = rng.standard_normal(n) * scale
        if kind == "relu":
            x = np.maximum(x, 0.0)
        elif kind == "heavy":
            x = rng.standard_t(2, n) * scale
        elif kind == "outlier":
            x = np.append(x, 40.0 * scale)
        elif kind == "ints":
            x = rng.integers(-3, 4, n).astype(np.float64)
        elif kind == "tiny":
            x = x * 1e-30
        o.update(x.astype(np.float32) if n % 2 else x)
    return o


def _plain_errors(o: HistogramObserver, exps: list[int], bits: int) -> np.ndarray:
    """`expected_sq_errors` as first written: `_bin_error` over every non-empty bin."""
    from espstream.quant.observers import _bin_error
    from espstream.quant.scheme import qrange

    qmin, qmax = qrange(bits)
    w = o.width
    pos, neg = np.nonzero(o.pos)[0], np.nonzero(o.neg)[0]
    j = np.concatenate([pos, neg]).astype(np.float64)[None, :]
    counts = np.concatenate([o.pos[pos], o.neg[neg]]).astype(np.float64)[None, :]
    s = np.ldexp(1.0, np.asarray(exps, dtype=np.int64))[:, None]
    clip = np.concatenate([np.full(len(pos), float(qmax)), np.full(len(neg), float(-qmin))])
    return _bin_error(counts, j * w, (j + 1) * w, s, clip[None, :] * s) / o.count


@settings(max_examples=150, deadline=None)
@given(observers(), st.sampled_from([8, 16]), st.integers(-3, 3))
def test_expected_sq_errors_equal_the_plain_statement_bit_for_bit(o, bits, shift):
    if o.top is None:
        return
    exps = [e + shift for e in o._candidates(bits)]
    got = o.expected_sq_errors(exps, bits)
    want = _plain_errors(o, exps, bits)
    np.testing.assert_array_equal(got.view(np.int64), want.view(np.int64))


@settings(max_examples=150, deadline=None)
@given(observers(), st.sampled_from([8, 16]))
def test_mse_exponent_is_the_first_minimum_over_every_candidate(o, bits):
    cands = o._candidates(bits)
    if o.top is None:
        assert o.mse_exponent(bits) == o.minmax_exponent(bits)
        return
    assert o.mse_exponent(bits) == cands[int(np.argmin(_plain_errors(o, cands, bits)))]
    # the pruning bound really bounds
    lower = o.clip_lower_bounds(cands, bits)
    assert np.all(lower <= _plain_errors(o, cands, bits) * (1 + 1e-9))


def test_cube_on_grid_is_numpy_power_bit_for_bit():
    from espstream.quant.observers import _cube_on_grid

    w = 2.0**-7
    grid = np.arange(-40, 41) * w
    rng = np.random.default_rng(0)
    on = rng.choice(grid, (9, 500))  # negative, zero and positive grid values
    np.testing.assert_array_equal(_cube_on_grid(on, w).view(np.int64), (on**3).view(np.int64))
    off = on.copy()
    off[3, 7] += w / 3  # one value off the grid: computed directly
    np.testing.assert_array_equal(_cube_on_grid(off, w).view(np.int64), (off**3).view(np.int64))
    wide = np.array([[-1e6 * w, 0.0, 1e6 * w]])  # too wide a range for a table
    np.testing.assert_array_equal(_cube_on_grid(wide, w), wide**3)


def test_update_in_slices_counts_as_one_pass(monkeypatch):
    from espstream.quant import observers as obs_mod

    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32), np.zeros(37, np.float32)])
    whole = obs_mod.HistogramObserver(64)
    whole.update(x)
    monkeypatch.setattr(obs_mod, "CHUNK", 7)
    sliced = obs_mod.HistogramObserver(64)
    sliced.update(x)
    assert sliced.hist.tolist() == whole.hist.tolist()
    assert (sliced.top, sliced.min, sliced.max, sliced.count) == (
        whole.top, whole.min, whole.max, whole.count)

"""Power-of-two arithmetic: exponents, rounding, saturation, targets (values worked out by hand)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from espstream.errors import UserError
from espstream.quant import scheme


def test_minmax_exponent_of_max_3_is_minus_5():
    # 127 * 2^-5 = 3.97 >= 3.0 > 127 * 2^-6 = 1.98
    assert scheme.exponent_for_range(0.0, 3.0, 8) == -5
    assert scheme.exponent_for_range(-3.0, 3.0, 8) == -5


def test_minmax_exponent_edges():
    # 127 * 2^-5 = 3.96875 exactly: still fits; one ulp above does not.
    assert scheme.exponent_for_range(0.0, 3.96875, 8) == -5
    assert scheme.exponent_for_range(0.0, np.nextafter(3.96875, 10), 8) == -4
    # The negative side reaches -128 steps: -4.0 = -128 * 2^-5 fits -5, -4.01 does not.
    assert scheme.exponent_for_range(-4.0, 0.0, 8) == -5
    assert scheme.exponent_for_range(-4.01, 0.0, 8) == -4
    # int16: 32767 * 2^-13 = 3.9998... >= 3 > 32767 * 2^-14 = 1.9999
    assert scheme.exponent_for_range(-3.0, 3.0, 16) == -13
    # all zero: the range [-1, 1)
    assert scheme.exponent_for_range(0.0, 0.0, 8) == -7


@given(st.floats(1e-6, 1e6), st.sampled_from([8, 16]))
def test_minmax_exponent_is_the_smallest_that_covers(a, bits):
    qmin, qmax = scheme.qrange(bits)
    e = scheme.exponent_for_range(-a, a, bits)
    assert qmax * 2.0**e >= a and qmin * 2.0**e <= -a
    assert not (qmax * 2.0 ** (e - 1) >= a)


def test_rounding_half_up_and_half_even():
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert scheme.round_half_up(x).tolist() == [-2, -1, 0, 1, 2, 3]
    assert scheme.round_half_even(x).tolist() == [-2, -2, -0, 0, 2, 2]


def test_quantize_saturates_and_scales():
    x = np.array([0.0, 0.03125, 3.96875, 5.0, -4.0, -9.0])  # e = -5: steps of 1/32
    q = scheme.quantize(x, -5, 8)
    assert q.dtype == np.int8
    assert q.tolist() == [0, 1, 127, 127, -128, -128]
    assert scheme.dequantize(q, -5).tolist() == [0.0, 0.03125, 3.96875, 3.96875, -4.0, -4.0]


def test_quantize_per_axis():
    w = np.array([[1.0, -1.0], [0.25, 0.5]])
    q = scheme.quantize(w, np.array([-6, -8]), 8, axis=0)
    assert q.tolist() == [[64, -64], [64, 127]]  # 0.5 / 2^-8 = 128 saturates to 127


def test_targets():
    assert scheme.TARGETS["esp32p4"].rounding == "half_even"
    assert scheme.TARGETS["esp32s3"].rounding == "half_up"
    assert scheme.TARGETS["c"].rounding == "half_up"
    assert scheme.TARGETS["esp32p4"].per_channel and not scheme.TARGETS["esp32s3"].per_channel
    assert scheme.bias_range(scheme.TARGETS["esp32s3"], 8) == (-(2**19), 2**19 - 1)
    assert scheme.bias_range(scheme.TARGETS["esp32p4"], 8) == (-(2**31), 2**31 - 1)
    assert scheme.bias_range(scheme.TARGETS["esp32p4"], 16) == (-(2**39), 2**39 - 1)
    with pytest.raises(UserError, match="unknown target"):
        scheme.get_target("esp8266")


def test_sqnr():
    ref = np.array([3.0, 4.0])
    assert scheme.sqnr_db(ref, ref) == float("inf")
    # signal 25, noise 0.25: 20 dB
    assert scheme.sqnr_db(ref, np.array([3.5, 4.0])) == pytest.approx(20.0)

"""Power-of-two quantization as ESP-DL computes it: ranges, exponents, rounding, targets.

A tensor with exponent `e` holds integers `q` standing for `q * 2^e`; symmetric, zero point 0.
int8 is [-128, 127], int16 is [-32768, 32767] (ESPDL.md section 4).

Rules:
1. The minmax exponent of values in [lo, hi] is the smallest `e` with `qmax * 2^e >= hi` and
   `qmin * 2^e <= lo` (so nothing clips and the grid is as fine as it can be).
2. Rounding: `half_even` on esp32p4, `half_up` (`floor(x + 0.5)`, ties toward +infinity)
   on esp32s3 and the plain-C target.
3. Bias: int32 for 8-bit models, clipped to 20 bits on esp32s3; int64 for 16-bit models, clipped
   to 40 bits on esp32s3 / esp32p4.
4. Weights: per output channel on esp32p4, per tensor on esp32s3 and c (unless overridden).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from espstream.errors import UserError

BITS = (8, 16)


@dataclass(frozen=True)
class Target:
    name: str
    rounding: str  # "half_even" or "half_up"
    per_channel: bool
    bias_bits_8: int  # usable bits of the int32 bias of 8-bit models
    bias_bits_16: int  # usable bits of the int64 bias of 16-bit models

    def bias_bits(self, bits: int) -> int:
        return self.bias_bits_8 if bits == 8 else self.bias_bits_16


TARGETS: dict[str, Target] = {
    "esp32p4": Target("esp32p4", "half_even", True, 32, 40),
    "esp32s3": Target("esp32s3", "half_up", False, 20, 40),
    "c": Target("c", "half_up", False, 32, 64),
}


def get_target(name: str) -> Target:
    """The arithmetic of any ESP-DL target name (espstream.targets), under that name."""
    from dataclasses import replace

    from espstream.targets import CHIPS

    chip = CHIPS.get(name) if isinstance(name, str) else None
    if chip is None:
        raise UserError(
            f"--target {name!r}: unknown target; choose one of {', '.join(CHIPS)}"
        )
    return replace(TARGETS[chip.arithmetic], name=name)


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise UserError(f"--bits {bits}: choose 8 or 16")
    return bits


def qrange(bits: int) -> tuple[int, int]:
    """Integer range of a signed `bits`-bit tensor: (-2^(bits-1), 2^(bits-1) - 1)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def int_dtype(bits: int) -> np.dtype:
    return np.dtype(np.int8) if bits == 8 else np.dtype(np.int16)


def bias_dtype(bits: int) -> np.dtype:
    return np.dtype(np.int32) if bits == 8 else np.dtype(np.int64)


def bias_range(target: Target, bits: int) -> tuple[int, int]:
    return qrange(target.bias_bits(bits))


def scale_of(e: int) -> float:
    """2^e, exact in float32 for the exponents a model uses."""
    return math.ldexp(1.0, int(e))


# Exponents are clamped here: anything outside is a degenerate tensor (all zeros, huge values).
E_MIN, E_MAX = -60, 60


def exponent_for_range(lo: float, hi: float, bits: int) -> int:
    """Rule 1: the smallest e with qmin * 2^e <= lo and hi <= qmax * 2^e.

    A tensor that is all zero gets the exponent of the range [-1, 1).
    """
    qmin, qmax = qrange(bits)
    need = max(hi / qmax if hi > 0 else 0.0, lo / qmin if lo < 0 else 0.0)
    if not math.isfinite(need):
        raise ValueError(f"non-finite range [{lo}, {hi}]")
    if need <= 0.0:
        return -(bits - 1)
    e = math.ceil(math.log2(need))
    # log2 may be off by one ulp at exact powers of two: settle it with exact comparisons.
    while e > E_MIN and need <= scale_of(e - 1):
        e -= 1
    while need > scale_of(e):
        e += 1
    return int(min(max(e, E_MIN), E_MAX))


def exponent_for_absmax(a: float, bits: int) -> int:
    """The smallest e with a <= qmax * 2^e (the positive side decides for |x| statistics)."""
    return exponent_for_range(0.0, float(a), bits)


def round_half_even(x: np.ndarray) -> np.ndarray:
    return np.rint(x)


def round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


def round_with(x: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "half_even":
        return round_half_even(x)
    if rounding == "half_up":
        return round_half_up(x)
    raise ValueError(f"unknown rounding {rounding!r}")


def quantize(x: np.ndarray, e: int | np.ndarray, bits: int, rounding: str = "half_even",
             axis: int | None = None) -> np.ndarray:
    """`saturate(round(x / 2^e))` as integers of the `bits` type; `e` per `axis` when given."""
    x = np.asarray(x, dtype=np.float64)
    e = np.asarray(e, dtype=np.int64)
    if axis is not None and e.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        e = e.reshape(shape)
    qmin, qmax = qrange(bits)
    q = np.clip(round_with(np.ldexp(x, -e), rounding), qmin, qmax)
    return q.astype(int_dtype(bits))


def dequantize(q: np.ndarray, e: int | np.ndarray, axis: int | None = None) -> np.ndarray:
    e = np.asarray(e, dtype=np.int64)
    q = np.asarray(q)
    if axis is not None and e.ndim == 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        e = e.reshape(shape)
    return np.ldexp(q.astype(np.float64), e).astype(np.float32)


def fake_quant(x: np.ndarray, e: int, bits: int, rounding: str = "half_even") -> np.ndarray:
    return dequantize(quantize(x, e, bits, rounding), e)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2); +inf when they are equal."""
    ref = np.asarray(ref, dtype=np.float64)
    err = float(np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2))
    sig = float(np.sum(ref**2))
    return sqnr_from_sums(sig, err)


def sqnr_from_sums(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)

"""ESP-DL integer arithmetic in plain NumPy: the oracle the Cython kernels are tested against.

Written for obvious correctness, not speed. Every function here has a twin with the same
signature in `espstream.kernels` (backed by `_int8.pyx`); the two must agree bit for bit.

Conventions shared by both (ESPDL.md sections 3 and 4):

- Batch 1, channels last. 1-D data is NWC: `[W, C]` or `[1, W, C]`; 2-D data is NHWC: `[H, W, C]`
  or `[1, H, W, C]`. 1-D is computed as 2-D with H = 1; outputs keep the input's rank.
- Conv weights are `[C_out, kH, kW, C_in / groups]` (2-D) or `[C_out, kW, C_in / groups]` (1-D):
  the element order of ESP-DL's plain (`c`) target. Depthwise weights use the same layout with
  a last axis of 1 (ESP-DL's own `[H, W, C]` is the transpose; the `.espdl` reader converts).
- Pads are ESP-DL's order: 1-D `(begin, end)`, 2-D `(top, bottom, left, right)`; an int pads all.
- Integer shift `s` (conv: `e_out - e_in - e_w`; requantize: `e_out - e_in`; mul:
  `e_out - e0 - e1`): s > 0 is a rounding arithmetic right shift, s <= 0 a left shift.
  'half_up': `(v + (1 << (s - 1))) >> s` (ties toward +inf); 'half_even': ties to the even result.
- Results saturate to the output type: int8 [-128, 127], int16 [-32768, 32767].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

ROUNDINGS = ("half_up", "half_even")
_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.int16): (-32768, 32767)}
# int8 data accumulates in int32 (as on the chip), int16 data in int64.
_ACC_BITS = {np.dtype(np.int8): 32, np.dtype(np.int16): 64}
# int16 biases are 40-bit on the chip; 47 bits keeps acc + bias far from int64 overflow.
_BIAS_LIMIT = {np.dtype(np.int8): 2**31, np.dtype(np.int16): 2**47}

IntArg = int | Sequence[int]


# ----------------------------------------------------------------------------- geometry


class Window(NamedTuple):
    """A sliding window over `[H, W, C]` data, resolved and checked (1-D has H = 1, kH = 1)."""

    nd: int  # spatial rank of the caller's data: 1 (NWC) or 2 (NHWC)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, bottom, left, right
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]


def _ints(value: IntArg, n: int) -> tuple[int, ...]:
    if isinstance(value, int | np.integer):
        return (int(value),) * n
    return tuple(map(int, value))


def _per_axis(value: IntArg, nd: int, name: str, minimum: int) -> tuple[int, int]:
    vals = _ints(value, nd)
    if len(vals) != nd or min(vals) < minimum:
        raise ValueError(
            f"{name} must be an int or {nd} ints >= {minimum} for {nd}-D data, got {value!r}"
        )
    return (1, vals[0]) if nd == 1 else (vals[0], vals[1])


def _pads(pads: IntArg, nd: int) -> tuple[int, int, int, int]:
    vals = _ints(pads, 2 * nd)
    if len(vals) != 2 * nd or min(vals) < 0:
        order = "(begin, end)" if nd == 1 else "(top, bottom, left, right)"
        raise ValueError(f"pads must be an int or {2 * nd} non-negative ints {order}, got {pads!r}")
    return (0, 0, vals[0], vals[1]) if nd == 1 else (vals[0], vals[1], vals[2], vals[3])


def to_hwc(x: np.ndarray, nd: int, what: str = "x") -> np.ndarray:
    """View `x` ([W, C], [1, W, C], [H, W, C] or [1, H, W, C]) as 3-D `[H, W, C]`."""
    x = np.asarray(x)
    if x.ndim == nd + 2:
        if x.shape[0] != 1:
            raise ValueError(f"{what}: only batch 1 is supported, got shape {x.shape}")
        x = x[0]
    if x.ndim != nd + 1:
        layout = "[W, C] or [1, W, C]" if nd == 1 else "[H, W, C] or [1, H, W, C]"
        raise ValueError(f"{what}: {nd}-D data must be {layout}, got shape {x.shape}")
    return x[None] if nd == 1 else x


def from_hwc(y: np.ndarray, like: np.ndarray, nd: int) -> np.ndarray:
    """Give the `[H, W, C]` result `y` the rank (and batch axis) of the input `like`."""
    if nd == 1:
        y = y[0]
    return y[None] if np.ndim(like) == nd + 2 else y


def resolve_window(
    in_hw: tuple[int, int],
    kernel: IntArg,
    nd: int,
    stride: IntArg,
    dilation: IntArg,
    pads: IntArg,
) -> Window:
    """Check the window parameters and compute the output size (ONNX floor rule, no ceil mode)."""
    k = _per_axis(kernel, nd, "kernel", 1)
    s = _per_axis(stride, nd, "stride", 1)
    d = _per_axis(dilation, nd, "dilation", 1)
    p = _pads(pads, nd)
    out = []
    for axis in range(2):
        extent = d[axis] * (k[axis] - 1) + 1
        padded = in_hw[axis] + p[2 * axis] + p[2 * axis + 1]
        if padded < extent:
            raise ValueError(
                f"window of extent {extent} does not fit padded input of size {padded} "
                f"(input {in_hw}, pads {p})"
            )
        out.append((padded - extent) // s[axis] + 1)
    return Window(nd, k, s, d, p, (int(in_hw[0]), int(in_hw[1])), (out[0], out[1]))


def int_range(dtype: np.dtype) -> tuple[int, int]:
    """Saturation bounds of an int8 / int16 output."""
    try:
        return _RANGE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(
            f"only int8 and int16 tensors are supported, got {np.dtype(dtype)}"
        ) from None


def check_exponents(*exponents: int) -> None:
    """AveragePool's float path needs finite, normal float32 scales (and so never meets NaN)."""
    for e in exponents:
        if not -100 <= int(e) <= 100:
            raise ValueError(f"exponent {e} is outside [-100, 100]")


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


class ConvSpec(NamedTuple):
    """Checked conv arguments: data as `[H, W, C]`, weights as `[C_out, kH, kW, C_in/g]`."""

    x: np.ndarray
    w: np.ndarray
    bias: np.ndarray  # int64 [C_out]
    shift: np.ndarray  # int64 [C_out]
    groups: int
    window: Window
    lo: int
    hi: int


def conv_spec(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    stride: IntArg,
    dilation: IntArg,
    pads: IntArg,
    groups: int,
    shift: int | Sequence[int] | np.ndarray,
    rounding: str,
) -> ConvSpec:
    """Validate conv arguments once, for both implementations (messages name the bad argument)."""
    w = np.asarray(w)
    x = np.asarray(x)
    nd = w.ndim - 2
    if nd not in (1, 2):
        raise ValueError(
            f"weights must be [C_out, kW, C_in/g] or [C_out, kH, kW, C_in/g], got {w.shape}"
        )
    x3 = to_hwc(x, nd)
    w4 = w[:, None] if nd == 1 else w
    if x3.dtype != w4.dtype:
        raise ValueError(f"input and weights must share a dtype, got {x3.dtype} and {w4.dtype}")
    lo, hi = int_range(x3.dtype)
    check_rounding(rounding)
    groups = int(groups)
    c_in, c_out, c_in_g = x3.shape[2], w4.shape[0], w4.shape[3]
    if groups < 1 or c_in % groups or c_out % groups or c_in_g * groups != c_in:
        raise ValueError(
            f"groups={groups} does not fit C_in={c_in}, C_out={c_out}, weight C_in/g={c_in_g}"
        )
    taps = w4.shape[1] * w4.shape[2] * c_in_g
    max_product = (hi + 1) ** 2
    if taps * max_product >= 2 ** (_ACC_BITS[x3.dtype] - 1):
        raise ValueError(
            f"{taps} taps per output could overflow the int{_ACC_BITS[x3.dtype]} accumulator"
        )
    if bias is None:
        b = np.zeros(c_out, np.int64)
    else:
        b = np.asarray(bias)
        if b.shape != (c_out,) or b.dtype.kind not in "iu":
            raise ValueError(
                f"bias must be an integer array of shape ({c_out},), got {b.dtype} {b.shape}"
            )
        b = b.astype(np.int64)
        limit = _BIAS_LIMIT[x3.dtype]
        if c_out and (b.min() < -limit or b.max() >= limit):
            raise ValueError(f"bias values must lie in [-{limit}, {limit}) for {x3.dtype} data")
    if isinstance(shift, int | np.integer):
        s = np.full(c_out, shift, np.int64)
    else:
        s = np.asarray(shift)
        if s.dtype.kind not in "iu" or s.shape not in ((), (c_out,)):
            raise ValueError(
                f"shift must be an int or {c_out} ints (one per output channel), got {shift!r}"
            )
        s = np.full(c_out, s, np.int64) if s.ndim == 0 else s.astype(np.int64)
    win = resolve_window(
        x3.shape[:2], w4.shape[1:3] if nd == 2 else w4.shape[2], nd, stride, dilation, pads
    )
    return ConvSpec(x3, w4, b, s, groups, win, lo, hi)


# ----------------------------------------------------------------------------- arithmetic


def round_shift(v: np.ndarray, shift: np.ndarray | int, rounding: str) -> np.ndarray:
    """`v * 2**-shift` rounded as ESP-DL does, on int64 (no saturation).

    Left shifts (shift <= 0) clip `v` to +-2**31 and the shift to 31 first: any such value
    saturates int8/int16 anyway, and the clip keeps the product exact in int64. Right shifts are
    capped at 62, which changes nothing for |v| < 2**61 (the result is 0 either way).
    """
    check_rounding(rounding)
    v = np.asarray(v, np.int64)
    s = np.broadcast_to(np.asarray(shift, np.int64), v.shape)
    left = np.clip(v, -(2**31), 2**31) * (np.int64(1) << np.minimum(-s, 31).clip(0))
    r = np.clip(s, 1, 62)
    half = np.int64(1) << (r - 1)
    if rounding == "half_up":
        right = (v + half) >> r
    else:
        floor = v >> r
        rest = v - (floor << r)  # in [0, 2**r)
        right = floor + ((rest > half) | ((rest == half) & (floor % 2 == 1)))
    return np.where(s <= 0, left, right)


def saturate(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    lo, hi = int_range(dtype)
    return np.clip(v, lo, hi).astype(dtype)


def round_float(y: np.ndarray, rounding: str) -> np.ndarray:
    """Round float values: 'half_up' is floor(y + 0.5), 'half_even' ties to even (in float64,
    where adding 0.5 to a float32 value is exact)."""
    check_rounding(rounding)
    y = np.asarray(y, np.float64)
    return np.floor(y + 0.5) if rounding == "half_up" else np.rint(y)


# ----------------------------------------------------------------------------- operators


def conv(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    stride: IntArg = 1,
    dilation: IntArg = 1,
    pads: IntArg = 0,
    groups: int = 1,
    shift: int | Sequence[int] | np.ndarray = 0,
    rounding: str = "half_up",
    relu: bool = False,
) -> np.ndarray:
    """ESP-DL Conv: int8 (int32 accumulate) or int16 (int64 accumulate), channels last.

    `saturate(relu?(round_shift(sum_taps(x * w) + bias, shift)))`: `x` is `[W, C]` / `[1, W, C]`
    (1-D) or `[H, W, C]` / `[1, H, W, C]` (2-D); `w` is `[C_out, kW, C_in/g]` or
    `[C_out, kH, kW, C_in/g]`; `bias` (int32 for int8, int64 for int16) is at exponent e_in + e_w;
    `shift` = e_out - e_in - e_w, one int or one per output channel. Padded taps add nothing.
    The result has the input's dtype and rank.
    """
    sp = conv_spec(x, w, bias, stride, dilation, pads, groups, shift, rounding)
    win, g = sp.window, sp.groups
    (kh_n, kw_n), (sh, sw), (dh, dw) = win.kernel, win.stride, win.dilation
    top, bottom, left, right = win.pads
    (oh, ow), (h, wd) = win.out_hw, win.in_hw
    c_in, c_out = sp.x.shape[2], sp.w.shape[0]
    # Zero padding: a padded tap multiplies 0 and adds nothing, exactly as a skipped tap.
    xp = np.zeros((h + top + bottom, wd + left + right, c_in), np.int64)
    xp[top : top + h, left : left + wd] = sp.x
    wg = sp.w.astype(np.int64).reshape(g, c_out // g, kh_n, kw_n, c_in // g)
    acc = np.zeros((oh, ow, g, c_out // g), np.int64)
    for i in range(kh_n):
        for j in range(kw_n):
            patch = xp[
                i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw
            ]
            patch = patch.reshape(oh, ow, g, c_in // g)
            acc += np.einsum("hwgi,goi->hwgo", patch, wg[:, :, i, j, :])
    v = acc.reshape(oh, ow, c_out) + sp.bias
    v = round_shift(v, sp.shift, rounding)
    if relu:
        v = np.maximum(v, 0)
    return from_hwc(saturate(v, sp.x.dtype), x, win.nd)


def conv_prepared(
    w: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    stride: IntArg = 1,
    dilation: IntArg = 1,
    pads: IntArg = 0,
    groups: int = 1,
    shift: int | Sequence[int] | np.ndarray = 0,
    rounding: str = "half_up",
    relu: bool = False,
) -> Callable[[np.ndarray], np.ndarray]:
    """`conv` with every argument but the data fixed: `conv_prepared(w, ...)(x)` is
    `conv(x, w, ...)`. The arguments are kept, not copied: do not modify them afterwards."""

    def run(x: np.ndarray) -> np.ndarray:
        return conv(x, w, bias, stride=stride, dilation=dilation, pads=pads, groups=groups,
                    shift=shift, rounding=rounding, relu=relu)

    return run


def _pool_input(x: np.ndarray, kernel: IntArg) -> tuple[np.ndarray, int]:
    nd = 1 if np.isscalar(kernel) or len(kernel) == 1 else 2  # type: ignore[arg-type]
    x3 = to_hwc(x, nd)
    int_range(x3.dtype)
    return x3, nd


def _windows(x3: np.ndarray, win: Window, fill: float) -> np.ndarray:
    """All taps of every window: `[kH*kW, OH, OW, C]` (row-major tap order), padding = `fill`."""
    top, bottom, left, right = win.pads
    (h, wd), (oh, ow) = win.in_hw, win.out_hw
    (sh, sw), (dh, dw) = win.stride, win.dilation
    xp = np.full((h + top + bottom, wd + left + right, x3.shape[2]), fill, np.float64)
    xp[top : top + h, left : left + wd] = x3
    return np.stack(
        [
            xp[i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw]
            for i in range(win.kernel[0])
            for j in range(win.kernel[1])
        ]
    )


def avgpool(
    x: np.ndarray,
    kernel: IntArg,
    *,
    stride: IntArg = 1,
    dilation: IntArg = 1,
    pads: IntArg = 0,
    e_in: int,
    e_out: int,
    rounding: str = "half_up",
) -> np.ndarray:
    """ESP-DL AveragePool on its float path, in float32 like the chip.

    Per output: `acc = sum over taps, in row-major tap order, of float32(q) * float32(2**e_in)`
    (a padded tap adds 0), then `y = (acc * float32(1 / kernel_area)) / float32(2**e_out)`, each
    step a float32 operation; `y` is rounded ('half_up' floor(y + 0.5), 'half_even' to even, both
    exact in float64) and saturated. The divisor is always the full kernel area.
    `kernel` is an int or 1 int (1-D data) or 2 ints (2-D data).
    """
    check_exponents(e_in, e_out)
    x3, nd = _pool_input(x, kernel)
    win = resolve_window(x3.shape[:2], kernel, nd, stride, dilation, pads)
    taps = _windows(x3, win, 0.0).astype(np.float32) * np.float32(2.0**e_in)
    acc = np.zeros(taps.shape[1:], np.float32)
    for t in taps:  # sequential float32 adds, the order the kernel uses
        acc = acc + t
    area = win.kernel[0] * win.kernel[1]
    y = (acc * (np.float32(1.0) / np.float32(area))) / np.float32(2.0**e_out)
    v = round_float(y, rounding)
    return from_hwc(saturate(v, x3.dtype), x, nd)


def maxpool(
    x: np.ndarray,
    kernel: IntArg,
    *,
    stride: IntArg = 1,
    dilation: IntArg = 1,
    pads: IntArg = 0,
) -> np.ndarray:
    """ESP-DL MaxPool: the largest valid tap (padding never wins); no rescale.

    A window whose taps all fall in the padding (possible only with dilation) gives the type's
    minimum, which is what ONNX's -inf saturates to.
    """
    x3, nd = _pool_input(x, kernel)
    win = resolve_window(x3.shape[:2], kernel, nd, stride, dilation, pads)
    lo, _ = int_range(x3.dtype)
    taps = _windows(x3, win, -np.inf)
    return from_hwc(np.maximum(taps.max(axis=0), lo).astype(x3.dtype), x, nd)


def avgpool_prepared(
    kernel: IntArg,
    *,
    stride: IntArg = 1,
    dilation: IntArg = 1,
    pads: IntArg = 0,
    e_in: int,
    e_out: int,
    rounding: str = "half_up",
) -> Callable[[np.ndarray], np.ndarray]:
    """`avgpool` with every argument but the data fixed: `avgpool_prepared(k, ...)(x)` is
    `avgpool(x, k, ...)`."""
    return lambda x: avgpool(x, kernel, stride=stride, dilation=dilation, pads=pads,
                             e_in=e_in, e_out=e_out, rounding=rounding)


def maxpool_prepared(
    kernel: IntArg,
    *,
    stride: IntArg = 1,
    dilation: IntArg = 1,
    pads: IntArg = 0,
) -> Callable[[np.ndarray], np.ndarray]:
    """`maxpool` with every argument but the data fixed."""
    return lambda x: maxpool(x, kernel, stride=stride, dilation=dilation, pads=pads)


def requantize(
    x: np.ndarray, shift: int, *, rounding: str = "half_up", dtype: np.dtype | type | None = None
) -> np.ndarray:
    """RequantizeLinear: `saturate(round(q * 2**(e_in - e_out)))`, with `shift = e_out - e_in`.

    `x` is int8, int16 or int32 of any shape; the result is `dtype` (int8 or int16, default
    the input's dtype).
    """
    x = np.asarray(x)
    if x.dtype.kind != "i" or x.dtype.itemsize > 4:
        raise ValueError(f"requantize takes int8, int16 or int32 data, got {x.dtype}")
    out = np.dtype(x.dtype if dtype is None else dtype)
    int_range(out)
    return saturate(round_shift(x, int(shift), rounding), out)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Saturating integer Add of two tensors already at the output exponent (broadcasting)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype:
        raise ValueError(f"add needs operands of one dtype, got {a.dtype} and {b.dtype}")
    return saturate(a.astype(np.int64) + b.astype(np.int64), a.dtype)


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Saturating integer Sub (a - b) of two tensors at the output exponent (broadcasting)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype:
        raise ValueError(f"sub needs operands of one dtype, got {a.dtype} and {b.dtype}")
    return saturate(a.astype(np.int64) - b.astype(np.int64), a.dtype)


def mul(
    a: np.ndarray,
    b: np.ndarray,
    shift: int,
    *,
    rounding: str = "half_up",
    dtype: np.dtype | type | None = None,
) -> np.ndarray:
    """Mul: `saturate(round(q0 * q1 * 2**(e0 + e1 - e_out)))`, with `shift = e_out - e0 - e1`
    (broadcasting; the result is `dtype`, default a's dtype)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype:
        raise ValueError(f"mul needs operands of one dtype, got {a.dtype} and {b.dtype}")
    int_range(a.dtype)
    out = np.dtype(a.dtype if dtype is None else dtype)
    int_range(out)
    return saturate(round_shift(a.astype(np.int64) * b.astype(np.int64), int(shift), rounding), out)


# ----------------------------------------------------------------------------- streaming cache


def cache_shapes(x: np.ndarray, window: int, axis: int) -> tuple[tuple, tuple]:
    """(kept frames' shape, output shape) of a StreamingCache of `window` on `axis` of x."""
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"frame_axis {axis} is outside a rank-{x.ndim} input")
    ax = axis % x.ndim
    kept = list(x.shape)
    kept[ax] = window - 1
    out = list(x.shape)
    out[ax] += window - 1
    return tuple(kept), tuple(out)


def check_kept(kept: np.ndarray, kept_shape: tuple, x: np.ndarray) -> None:
    if kept.shape != kept_shape or kept.dtype != x.dtype:
        raise ValueError(
            f"the chunk changed from {kept.dtype} frames of shape {list(kept.shape)} to "
            f"{x.dtype} {list(x.shape)} between calls; reset() first"
        )


def cache_step(kept: np.ndarray | None, x: np.ndarray, window: int,
               axis: int) -> tuple[np.ndarray, np.ndarray]:
    """One call of ESP-DL's StreamingCache (window W >= 1, frame axis `axis`): the output is
    [kept ; x] on that axis and the new kept frames are the last W - 1 of it, both taken
    byte-flat as the runtime copies them (kept None: W - 1 zero frames, the state after reset).
    Returns (output, new kept)."""
    x = np.asarray(x)
    kept_shape, out_shape = cache_shapes(x, window, axis)
    if kept is None:
        kept = np.zeros(kept_shape, x.dtype)
    check_kept(kept, kept_shape, x)
    flat = np.concatenate([kept.reshape(-1), x.reshape(-1)])
    return flat.reshape(out_shape), flat[x.size:].reshape(kept_shape).copy()

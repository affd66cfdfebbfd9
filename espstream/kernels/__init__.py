"""ESP-DL integer kernels: fast Cython versions with the signatures of `kernels.reference`.

Each public function here has a NumPy twin of the same name and signature in
`espstream.kernels.reference` (the oracle; see its docstring for layouts, pads order, shift and
rounding conventions). A simulator can take either module:

    from espstream import kernels                 # fast
    from espstream.kernels import reference       # obviously right, slow

- `conv(x, w, bias=None, *, stride, dilation, pads, groups, shift, rounding, relu)`: Conv,
  int8 (int32 accumulator) or int16 (int64 accumulator); `conv_prepared(w, bias, ...)` fixes
  every argument but the data and returns `run(x)` (a simulator calls one conv many times);
- `avgpool(x, kernel, *, stride, dilation, pads, e_in, e_out, rounding)`: AveragePool on the
  float32 path;
- `maxpool(x, kernel, *, stride, dilation, pads)`: MaxPool over valid taps; `avgpool_prepared`
  and `maxpool_prepared` fix every argument but the data (checked once per input shape);
- `requantize(x, shift, *, rounding, dtype)`: RequantizeLinear;
- `add(a, b)`, `sub(a, b)`, `mul(a, b, shift, *, rounding, dtype)`: elementwise; here computed
  in the narrowest type that holds every intermediate exactly (int16 for int8 sums, int32 for
  int16 sums and int8 products), same-shape add / sub and requantize of int8 / int16 data in
  one C pass (`_hot.h`), where the reference widens to int64; outside those ranges the
  reference itself runs;
- `cache_step(kept, x, window, axis)`: one StreamingCache call, (output, frames kept).

Arguments are checked by the shared helpers in `reference` (a bad shape or parameter raises
ValueError naming it); the Cython kernels run without the GIL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from espstream.kernels import _int8
from espstream.kernels import reference as _ref
from espstream.kernels.reference import (
    IntArg,
    check_exponents,
    check_rounding,
    conv_spec,
    from_hwc,
    int_range,
    resolve_window,
    to_hwc,
)

__all__ = ["conv", "conv_prepared", "avgpool", "avgpool_prepared", "maxpool", "maxpool_prepared",
           "requantize", "add", "sub", "mul", "cache_step"]

_MODE = {"half_up": 0, "half_even": 1}


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
    """ESP-DL Conv (see `reference.conv`): x `[W, C]`/`[1, W, C]` or `[H, W, C]`/`[1, H, W, C]`,
    w `[C_out, kW, C_in/g]` or `[C_out, kH, kW, C_in/g]`, shift = e_out - e_in - e_w."""
    sp = conv_spec(x, w, bias, stride, dilation, pads, groups, shift, rounding)
    return _conv_plan(sp, rounding, relu, x)(np.ascontiguousarray(x))


def _conv_plan(sp, rounding: str, relu: bool, x: np.ndarray) -> _int8.Conv:
    """The Cython conv fixed for checked arguments (`conv_spec`) and the shape of `x`: bias,
    shift and packed weights are derived here once, not on every call."""
    win = sp.window
    c_in, c_out = sp.x.shape[2], sp.w.shape[0]
    kh, kw = win.kernel
    depthwise = sp.groups == c_in == c_out and c_in > 1
    c_k = c_in
    if depthwise:  # [C, kH, kW, 1] -> [kH * kW, C]: the channel loop is innermost
        w16 = np.ascontiguousarray(sp.w.reshape(c_out, kh * kw).T, dtype=np.int16)
    else:
        w = sp.w
        if sp.x.dtype == np.int8 and sp.groups == 1 and c_in % 2:
            # odd C_in: one zero channel more in weights and data, and the paired-channel
            # (broadcast / VNNI) loops apply; the zero products change no sum
            w = np.concatenate([w, np.zeros((*w.shape[:3], 1), w.dtype)], axis=3)
            c_k = c_in + 1
        w16 = np.ascontiguousarray(w.reshape(c_out, -1), dtype=np.int16)
    out_shape = from_hwc(np.empty((*win.out_hw, 0)), x, win.nd).shape[:-1] + (c_out,)
    return _int8.Conv(
        w16, np.ascontiguousarray(sp.bias, np.int64), np.ascontiguousarray(sp.shift, np.int64),
        tuple(win.in_hw), c_k, tuple(win.out_hw), tuple(out_shape), kh, kw, sp.groups,
        *win.stride, *win.dilation, win.pads[0], win.pads[2], _MODE[rounding], bool(relu),
        depthwise, sp.x.dtype == np.int8, c_in,
    )  # fmt: skip


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
    """`conv` with every argument but the data fixed (see `reference.conv_prepared`):
    `conv_prepared(w, ...)(x)` is `conv(x, w, ...)`, bit for bit.

    The arguments are checked, and the weights converted, once per shape and type of `x`
    (the checks depend on nothing else), not on every call: a simulator runs each Conv node
    once per chunk. The arguments are kept, not copied: do not modify them afterwards.
    """
    plans: dict[tuple, _int8.Conv] = {}

    def run(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        key = (x.shape, x.dtype)
        plan = plans.get(key)
        if plan is None:
            sp = conv_spec(x, w, bias, stride, dilation, pads, groups, shift, rounding)
            plan = plans[key] = _conv_plan(sp, rounding, relu, x)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        return plan(x)

    return run


def _pool_plan(x: np.ndarray, kernel: IntArg, stride: IntArg, dilation: IntArg, pads: IntArg):
    """(window, kernel geometry) of a pool on x, checked (as `reference`'s pools check)."""
    nd = 1 if np.isscalar(kernel) or len(kernel) == 1 else 2  # type: ignore[arg-type]
    x3 = to_hwc(x, nd)
    int_range(x3.dtype)
    win = resolve_window(x3.shape[:2], kernel, nd, stride, dilation, pads)
    geometry = (*win.kernel, *win.stride, *win.dilation, win.pads[0], win.pads[2])
    return win, geometry


def _pool_run(f, x: np.ndarray, win, c: int, *extra) -> np.ndarray:
    x3 = np.ascontiguousarray(to_hwc(x, win.nd))
    y = np.empty((*win.out_hw, c), x3.dtype)
    f(x3, y, *extra)
    return from_hwc(y, x, win.nd)


def _pool_prepared_run(f, plans: dict, x: np.ndarray, make) -> np.ndarray:
    """A prepared pool's call: the plan of x's shape (made by `make(x)` the first time:
    window, geometry, the 3-D shape of the data and the output's shapes) and one kernel call."""
    x = np.asarray(x)
    key = (x.shape, x.dtype)
    plan = plans.get(key)
    if plan is None:
        win, extra = make(x)
        x3 = to_hwc(x, win.nd)
        out3 = (*win.out_hw, x.shape[-1])
        plan = plans[key] = (x3.shape, out3, from_hwc(np.empty(out3), x, win.nd).shape, extra)
        return _pool_run(f, x, win, x.shape[-1], *extra)
    shape3, out3, out_shape, extra = plan
    x3 = np.ascontiguousarray(x).reshape(shape3)
    y = np.empty(out3, x.dtype)
    f(x3, y, *extra)
    return y.reshape(out_shape)


def _avg_scales(win, e_in: int, e_out: int, rounding: str) -> tuple:
    area = win.kernel[0] * win.kernel[1]
    inv_area = np.float32(1.0) / np.float32(area)
    return (float(np.float32(2.0**e_in)), float(inv_area), float(np.float32(2.0**e_out)),
            _MODE[rounding])


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
    """ESP-DL AveragePool on its float32 path (see `reference.avgpool`)."""
    check_rounding(rounding)
    check_exponents(e_in, e_out)
    x = np.asarray(x)
    win, geometry = _pool_plan(x, kernel, stride, dilation, pads)
    return _pool_run(_int8.avgpool, x, win, x.shape[-1], *geometry,
                     *_avg_scales(win, e_in, e_out, rounding))


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
    `avgpool(x, k, ...)`, bit for bit; the window is checked once per shape and type of x."""
    check_rounding(rounding)
    check_exponents(e_in, e_out)
    plans: dict[tuple, tuple] = {}

    def make(x: np.ndarray) -> tuple:
        win, geometry = _pool_plan(x, kernel, stride, dilation, pads)
        return win, (*geometry, *_avg_scales(win, e_in, e_out, rounding))

    return lambda x: _pool_prepared_run(_int8.avgpool, plans, x, make)


def maxpool(
    x: np.ndarray,
    kernel: IntArg,
    *,
    stride: IntArg = 1,
    dilation: IntArg = 1,
    pads: IntArg = 0,
) -> np.ndarray:
    """ESP-DL MaxPool over valid taps (see `reference.maxpool`)."""
    x = np.asarray(x)
    win, geometry = _pool_plan(x, kernel, stride, dilation, pads)
    return _pool_run(_int8.maxpool, x, win, x.shape[-1], *geometry)


def maxpool_prepared(
    kernel: IntArg,
    *,
    stride: IntArg = 1,
    dilation: IntArg = 1,
    pads: IntArg = 0,
) -> Callable[[np.ndarray], np.ndarray]:
    """`maxpool` with every argument but the data fixed (the window checked once per shape)."""
    plans: dict[tuple, tuple] = {}
    return lambda x: _pool_prepared_run(
        _int8.maxpool, plans, x, lambda x: _pool_plan(x, kernel, stride, dilation, pads))


def requantize(
    x: np.ndarray, shift: int, *, rounding: str = "half_up", dtype: np.dtype | type | None = None
) -> np.ndarray:
    """RequantizeLinear, shift = e_out - e_in (see `reference.requantize`)."""
    check_rounding(rounding)
    x = np.asarray(x)
    if x.dtype.kind != "i" or x.dtype.itemsize > 4:
        raise ValueError(f"requantize takes int8, int16 or int32 data, got {x.dtype}")
    out = np.dtype(x.dtype if dtype is None else dtype)
    int_range(out)
    shift = int(shift)
    if x.dtype.itemsize <= 2 and -15 <= shift <= 30:  # one pass, int32 intermediates (_hot.h)
        return _int8.requantize_narrow(np.ascontiguousarray(x), shift, rounding == "half_even",
                                       out == np.int8)
    wide = _shift_type(x.dtype, shift)
    if wide is not None:
        return _saturate(_round_shift(x, int(shift), rounding, wide), out)
    flat = np.ascontiguousarray(x).reshape(-1)
    y = np.empty(flat.shape, out)
    _int8.requantize(flat, y, int(shift), _MODE[rounding])
    return y.reshape(x.shape)


# ----------------------------------------------------------------------------- elementwise
# Narrow-type twins of reference.add / sub / mul / round_shift: every intermediate is exact in
# the chosen type (ranges below), so the bits equal the int64 reference's.

_SUM_TYPE = {np.dtype(np.int8): np.dtype(np.int16), np.dtype(np.int16): np.dtype(np.int32)}
_RANGE = {np.dtype(t): (np.iinfo(t).min, np.iinfo(t).max) for t in (np.int8, np.int16)}


def _shift_type(src: np.dtype, shift: int) -> np.dtype | None:
    """A type holding round_shift(v, shift) exactly for every v of `src` (None: use the
    reference). int8 << 7 and int8 + 2**13 fit int16; int16 << 15 and int16 + 2**29 fit int32."""
    if src == np.int8 and -7 <= shift <= 14:
        return np.dtype(np.int16)
    if src.itemsize <= 2 and -15 <= shift <= 30:
        return np.dtype(np.int32)
    return None


def _round_shift(v: np.ndarray, shift: int, rounding: str, wide: np.dtype) -> np.ndarray:
    """reference.round_shift for one scalar shift, in a fresh array of type `wide` (the caller
    chose `wide` by `_shift_type`, so nothing overflows)."""
    if shift <= 0:
        t = v.astype(wide)
        if shift < 0:
            np.left_shift(t, -shift, out=t)
        return t
    half = wide.type(1 << (shift - 1))
    if rounding == "half_up":
        t = np.add(v, half, dtype=wide)
        np.right_shift(t, shift, out=t)
        return t
    check_rounding(rounding)
    t = v.astype(wide)
    floor = t >> shift
    rest = t - (floor << shift)
    up = rest > half
    up |= (rest == half) & (floor & 1).astype(bool)
    floor += up
    return floor


def _saturate(t: np.ndarray, dtype: np.dtype) -> np.ndarray:
    lo, hi = _RANGE[np.dtype(dtype)]
    np.minimum(t, hi, out=t)
    np.maximum(t, lo, out=t)
    return t.astype(dtype)


def _operands(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype:
        raise ValueError(f"{what} needs operands of one dtype, got {a.dtype} and {b.dtype}")
    return a, b


def _same_flat(a: np.ndarray, b: np.ndarray) -> bool:
    """One shape, int8 / int16, both C-contiguous: the flat loop of _hot.h applies."""
    return (a.shape == b.shape and a.dtype in _SUM_TYPE and a.flags.c_contiguous
            and b.flags.c_contiguous)


def _addsub(a: np.ndarray, b: np.ndarray, subtract: bool) -> np.ndarray:
    a, b = _operands(a, b, "sub" if subtract else "add")
    if _same_flat(a, b):  # same-shape operands: one pass in C
        return _int8.addsub(a, b, subtract)
    wide = _SUM_TYPE.get(a.dtype)
    if wide is None:
        return (_ref.sub if subtract else _ref.add)(a, b)
    return _saturate((np.subtract if subtract else np.add)(a, b, dtype=wide), a.dtype)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Saturating integer Add (see `reference.add`): the sum in int16 / int32, clipped in place
    (same-shape operands: one pass in C)."""
    return _addsub(a, b, False)


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Saturating integer Sub (see `reference.sub`)."""
    return _addsub(a, b, True)


def mul(
    a: np.ndarray,
    b: np.ndarray,
    shift: int,
    *,
    rounding: str = "half_up",
    dtype: np.dtype | type | None = None,
) -> np.ndarray:
    """Mul (see `reference.mul`): int8 products (|p| <= 2**14) in int32 for shifts in
    [-16, 30], where every rounding intermediate fits; other cases run the reference."""
    a, b = _operands(a, b, "mul")
    shift = int(shift)
    out = np.dtype(a.dtype if dtype is None else dtype)
    if a.dtype != np.int8 or out not in _RANGE or not -16 <= shift <= 30:
        return _ref.mul(a, b, shift, rounding=rounding, dtype=dtype)
    p = np.multiply(a, b, dtype=np.int32)
    if shift <= 0:
        if shift < 0:
            np.left_shift(p, -shift, out=p)
        return _saturate(p, out)
    return _saturate(_round_shift(p, shift, rounding, np.dtype(np.int32)), out)


def cache_step(kept: np.ndarray | None, x: np.ndarray, window: int,
               axis: int) -> tuple[np.ndarray, np.ndarray]:
    """StreamingCache's step (see `reference.cache_step`), three memcpy's in C."""
    x = np.asarray(x)
    kept_shape, out_shape = _ref.cache_shapes(x, window, axis)
    if kept is None:
        kept = np.zeros(kept_shape, x.dtype)
    _ref.check_kept(kept, kept_shape, x)
    return _int8.cache_step(np.ascontiguousarray(kept), np.ascontiguousarray(x), out_shape)

"""Reductions: the ten Reduce* operators ESP-DL 3.3 runs (calibrated, streamed, lowered,
simulated); ArgMax / ArgMin / CumSum streamed in float only.

Calibrate: ReduceMax / ReduceMin share their input's exponent (ESP-DL copies the integers);
the other eight get an exponent of their own (plan rule 6). Streamify (`rule_reduce`): over
channels / features the time axis passes (shifting with keepdims=0); over time: refused.
Lower: one ESP-DL node of the same name, inputs (x, axes as an int64 initializer in the
runtime layout), attribute `keepdims`, as ESP-PPQ 1.3.12 writes it.

ESP-DL's arithmetic (dl_module_reduce_<op>.hpp, dl_module_reduce_base.hpp), as simulated here:
1. Axes: runs of neighbouring axes with the same flag (reduced or kept) are merged; ESP-DL has
   loops only for the merged patterns R, KR, RK, RKR, KRK, KRKR, RKRK (R reduced, K kept);
   any other pattern (e.g. no axis reduced, or K R K R K) is refused by `lower` and the simulator.
   Elements are visited in row-major order of the reduced axes (float sums depend on it).
2. ReduceSum / ReduceL1 / ReduceSumSquare: integer sums (int32 for int8, int64 for int16) of
   q, |q|, q*q; then one rounding shift by e_out - e_in (ReduceSumSquare: e_out - 2 e_in).
3. ReduceMean: float32(sum) * 2^e_in / count * 2^-e_out, rounded. ReduceL2:
   sqrt_newton(float32(sum of q*q) * 2^(2 e_in)) * 2^-e_out. ReduceLogSum: logf(float32(sum) *
   2^e_in) * 2^-e_out.
4. ReduceLogSumExp: a float32 sum of exp(q * 2^e_in) (int8: a 256-entry float table of expf),
   then logf, times 2^-e_out, rounded. ReduceProd: the product of q * 2^e_in in float32
   (int16: double), times 2^-e_out, rounded.
5. ReduceMax / ReduceMin: the integers themselves, not rescaled.
6. Rounding is the target's (float paths: floorf(x + 0.5) for half up, rint on esp32p4),
   then saturation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Lowerer, attr, perm_of
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant.plan import (
    own,
    share,
)
from espstream.sim import (
    Fn,
    Simulator,
    saturate,
)
from espstream.stream.rules import (
    rule_mixes_all,
    rule_reduce,
)

MODULE = "reduce"

#: ESP-DL's Reduce operators (one module each in ESP-DL, one arithmetic here)
REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
              "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")

#: merged reduce-flag patterns forward_template has loops for (rule 1)
PATTERNS = {(True,), (False, True), (True, False), (True, False, True), (False, True, False),
            (False, True, False, True), (True, False, True, False)}

#: ESP-DL's sqrt_newton stops when two iterates differ by at most this (dl_math.hpp EN)
_EN = np.float32(1e-5)


# ---- the kernels ------------------------------------------------------------------------


def merged(flags: Sequence[bool]) -> tuple[bool, ...]:
    """The reduce flags with runs of equal neighbours merged (rule 1)."""
    out: list[bool] = []
    for f in flags:
        if not out or out[-1] != bool(f):
            out.append(bool(f))
    return tuple(out)


def pattern_problem(flags: Sequence[bool]) -> str | None:
    """Why ESP-DL cannot reduce with these flags, or None."""
    m = merged(flags)
    if m in PATTERNS:
        return None
    text = "".join("R" if f else "K" for f in m)
    if not any(flags):
        return "reduces no axis (ESP-DL would reduce all of them)"
    return (f"reduces axes in the pattern {text} (R reduced, K kept runs); ESP-DL has loops for "
            "R, KR, RK, RKR, KRK, KRKR, RKRK only")


def flags_of(rank: int, axes: Sequence[int] | None, noop_with_empty_axes: int = 0) -> list[bool]:
    """Which axes an ESP-DL Reduce reduces (get_attributes: no axes = all, unless noop)."""
    if axes is None or len(axes) == 0:
        return [not noop_with_empty_axes] * rank
    flags = [False] * rank
    for a in axes:
        a = int(a)
        if not -rank <= a < rank:
            raise UserError(f"reduce axis {a} is out of range for rank {rank}")
        flags[a % rank] = True
    return flags


def out_shape(shape: Sequence[int], flags: Sequence[bool], keepdims: int) -> list[int]:
    if keepdims:
        return [1 if f else int(d) for d, f in zip(shape, flags, strict=True)]
    kept = [int(d) for d, f in zip(shape, flags, strict=True) if not f]
    return kept or [1]


def _rows(q: np.ndarray, flags: Sequence[bool]) -> np.ndarray:
    """[kept elements, reduced elements], both in row-major order (rule 1)."""
    kept = [i for i, f in enumerate(flags) if not f]
    red = [i for i, f in enumerate(flags) if f]
    k = int(np.prod([q.shape[i] for i in kept])) if kept else 1
    return np.transpose(q, kept + red).reshape(k, -1)


def _seq(cols: np.ndarray, start: float, op: str, dtype: type) -> np.ndarray:
    """Accumulate the columns one at a time, as the C loop does (float order matters)."""
    acc = np.full(cols.shape[0], start, dtype)
    for j in range(cols.shape[1]):
        c = cols[:, j].astype(dtype)
        acc = (acc + c if op == "add" else acc * c).astype(dtype)
    return acc


def sqrt_newton(x: np.ndarray) -> np.ndarray:
    """ESP-DL's float32 Newton square root (dl_math.hpp), elementwise: start at x, iterate
    r = (r + x / r) * 0.5 until two iterates differ by at most 1e-5; sqrt(0) = 0."""
    x = np.asarray(x, np.float32)
    r = x.copy()
    live = x != 0
    half = np.float32(0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        while live.any():  # every lane computes; only the live ones take the new iterate
            new = (r + x / r) * half
            go_on = np.abs(new - r) > _EN
            np.copyto(r, new, where=live)
            live &= go_on
    return np.where(x == 0, np.float32(0), r).astype(np.float32)


def round_f32(y: np.ndarray, rounding: str) -> np.ndarray:
    """tool::round of a float32: floorf(y + 0.5) (the sum rounded to float32) or ties to even."""
    y = np.asarray(y, np.float32)
    if rounding == "half_up":
        return np.floor((y + np.float32(0.5)).astype(np.float32)).astype(np.float64)
    return np.rint(y).astype(np.float64)


def _round_shift(v: np.ndarray, shift: int, rounding: str) -> np.ndarray:
    from espstream.kernels.reference import round_shift

    return round_shift(v, shift, rounding)


def _scale(e: int) -> np.float32:
    return np.float32(2.0 ** e)


def reduce_kernel(op: str, q: np.ndarray, flags: Sequence[bool], e_in: int, e_out: int,
                  keepdims: int, rounding: str) -> np.ndarray:
    """One ESP-DL Reduce on integers `q` (runtime layout), vectorized (module rules 1-6)."""
    why = pattern_problem(flags)
    if why:
        raise ValueError(why)
    dtype = q.dtype
    wide = np.int32 if dtype == np.int8 else np.int64
    x = _rows(q, flags)
    count = x.shape[1]
    if op in ("ReduceMax", "ReduceMin"):
        y = (x.max(axis=1) if op == "ReduceMax" else x.min(axis=1)).astype(dtype)
        return y.reshape(out_shape(q.shape, flags, keepdims))
    xi = x.astype(np.int64)
    if op in ("ReduceSum", "ReduceL1", "ReduceSumSquare"):
        v = {"ReduceSum": xi, "ReduceL1": np.abs(xi), "ReduceSumSquare": xi * xi}[op]
        s = v.sum(axis=1).astype(wide)
        shift = e_out - (2 * e_in if op == "ReduceSumSquare" else e_in)
        y = _round_shift(s, shift, rounding)
    elif op == "ReduceMean":
        s = np.float32(xi.sum(axis=1).astype(wide))
        f = (s * _scale(e_in)).astype(np.float32) / np.float32(count)
        y = round_f32((f.astype(np.float32) * _scale(-e_out)).astype(np.float32), rounding)
    elif op == "ReduceL2":
        s = np.float32((xi * xi).sum(axis=1).astype(wide))
        f = sqrt_newton((s * _scale(2 * e_in)).astype(np.float32))
        y = round_f32((f * _scale(-e_out)).astype(np.float32), rounding)
    elif op == "ReduceLogSum":
        s = np.float32(xi.sum(axis=1).astype(wide))
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.log((s * _scale(e_in)).astype(np.float32)).astype(np.float32)
        y = round_f32(np.nan_to_num((f * _scale(-e_out)).astype(np.float32), nan=0.0,
                                    posinf=np.finfo(np.float32).max,
                                    neginf=np.finfo(np.float32).min), rounding)
    elif op == "ReduceLogSumExp":
        if dtype == np.int8:
            table = np.exp(_scale(e_in) * np.arange(-128, 128, dtype=np.float32)).astype(
                np.float32)
            terms = table[xi + 128]
        else:
            terms = np.exp((x.astype(np.float32) * _scale(e_in)).astype(np.float32))
        with np.errstate(divide="ignore", over="ignore"):
            f = np.log(_seq(terms.astype(np.float32), 0.0, "add", np.float32)).astype(np.float32)
            y = round_f32(np.nan_to_num((f * _scale(-e_out)).astype(np.float32),
                                        posinf=np.finfo(np.float32).max), rounding)
    elif op == "ReduceProd":
        terms = (x.astype(np.float32) * _scale(e_in)).astype(np.float32)
        if dtype == np.int8:
            with np.errstate(over="ignore"):
                p = _seq(terms, 1.0, "mul", np.float32)
                y = round_f32(np.nan_to_num((p * _scale(-e_out)).astype(np.float32)), rounding)
        else:
            with np.errstate(over="ignore"):
                p = _seq(terms, 1.0, "mul", np.float64) * float(_scale(-e_out))
            p = np.nan_to_num(p, posinf=1e300, neginf=-1e300)
            y = np.floor(p + 0.5) if rounding == "half_up" else np.rint(p)
    else:
        raise ValueError(f"{op} is not an ESP-DL reduction")
    y = np.clip(np.asarray(y, np.float64), -(2.0 ** 40), 2.0 ** 40)
    return saturate(y.astype(np.int64), dtype).reshape(out_shape(q.shape, flags, keepdims))


# ---- calibrate / lower / simulate ----------------------------------------------------------


def _axes(lw: Lowerer, n: onnx.NodeProto, rank: int) -> list[int] | None:
    a = lw.int_const(n, 1, "axes")
    if a is None:
        a = attr(n, "axes")
    return None if a is None or len(a) == 0 else [int(v) % rank if -rank <= int(v) < rank
                                                   else int(v) for v in np.ravel(a)]


def lower_reduce(lw: Lowerer, n: onnx.NodeProto) -> None:
    """ONNX Reduce* -> ESP-DL Reduce* (x, int64 axes in the runtime layout), `keepdims`.

    A channels-last input keeps its layout when keepdims=1, or when the kept axes stay in ONNX
    order; otherwise it is transposed back to ONNX order first.
    """
    x = lw.act(n.input[0], n)
    rank = x.rank
    keep = int(attr(n, "keepdims", 1))
    noop = int(attr(n, "noop_with_empty_axes", 0))
    axes = _axes(lw, n, rank)
    flags = flags_of(rank, axes, noop)
    out_cl = False
    if x.cl and rank >= 3:
        kept_rt = [p for p in x.perm if not flags[p]]
        if keep:
            out_cl = True
        elif kept_rt == sorted(kept_rt):
            out_cl = False  # the kept axes are in ONNX order already
        elif len(kept_rt) >= 3 and kept_rt == [sorted(kept_rt)[i] for i in perm_of(len(kept_rt))]:
            out_cl = True
        else:
            x = lw.layout_as(x, False)
    rt_flags = [flags[p] for p in x.perm]
    why = pattern_problem(rt_flags)
    if why:
        raise UserError(f"{n.op_type} '{n.name}': {why}")
    shape = lw.shape(n.output[0])
    natural = x if n.op_type in ("ReduceMax", "ReduceMin") else None
    name, out = lw.define_output(n.output[0], n, shape, out_cl, natural)
    lw.need_q(n, out)
    rt_axes = np.asarray([i for i, f in enumerate(rt_flags) if f], np.int64)
    ax = lw.initializer(lw.fresh(f"{n.name}_axes"), rt_axes, [0])
    lw.emit(n.op_type, n.name, [x.name, ax], [name],
            {"keepdims": keep, "quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def sim_reduce(sim: Simulator, node: Node) -> Fn:
    op = node.op_type
    e_in = sim.exp(node.inputs[0])
    e_out = sim.exp(node.outputs[0])
    if op in ("ReduceMax", "ReduceMin"):
        sim.same_exponent(node)
    keep = int(node.attrs.get("keepdims", 1))
    noop = int(node.attrs.get("noop_with_empty_axes", 0))
    axes = None
    if len(node.inputs) > 1 and node.inputs[1]:
        axes = [int(a) for a in np.ravel(sim.init(node, 1, "axes"))]
    rounding = sim.rounding

    def fn(args: list) -> list:
        q = args[0]
        if q.dtype not in (np.int8, np.int16):
            raise ValueError(f"{op} on {q.dtype}: ESP-DL's quantized reduce takes int8 / int16")
        flags = flags_of(q.ndim, axes, noop)
        return [reduce_kernel(op, q, flags, e_in, e_out, keep, rounding)]

    return fn


_RED = "off the time axis; over time: refused"
for _op in REDUCE_OPS:
    _same = _op in ("ReduceMax", "ReduceMin")
    register(OpSpec(_op, MODULE, calibrate=share if _same else own,
                    calibrate_rule="input's exponent" if _same else "own exponent",
                    stream=rule_reduce, stream_rule=_RED, lower=lower_reduce, espdl=(_op,)))
    register_sim(SimSpec(_op, MODULE, sim_reduce, ESPDL_GOLDEN))
for _op in ("ArgMax", "ArgMin"):
    register(OpSpec(_op, MODULE, stream=rule_reduce, stream_rule=_RED))
register(OpSpec("CumSum", MODULE, stream=rule_mixes_all, stream_first=True,
                stream_rule="refused on a time axis (mixes every frame)"))

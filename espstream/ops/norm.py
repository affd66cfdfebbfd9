"""Normalizations: LayerNormalization, RMSNormalization, LpNormalization (calibrated, streamed,
lowered, simulated); BatchNormalization streamed (optimize folds it away before calibrate);
instance and group norms mix every frame.

Calibrate: the output gets an exponent of its own; LayerNormalization's scale and bias are
stored as integers (the model's width) at exponents of their own, as ESP-DL reads them (type T
with an exponent); RMSNormalization's scale stays float32 (ESP-DL reads it as float).
Streamify (`stream_norm`): per frame when the normalized axes leave the time axis out;
normalizing over time is refused. Lower: one ESP-DL node of the same name with `axis`
(`epsilon`, LayerNormalization / RMSNormalization; `p`, LpNormalization); Layer / RMS norms
of a channels-last input of rank >= 3 are computed in ONNX order (a Transpose before them),
since ESP-DL normalizes the trailing axes of the runtime layout from `axis` on.

ESP-DL's arithmetic (dl_module_layer_normalization.hpp, dl_module_rms_normalization.hpp,
dl_module_lp_normalization.hpp, dl_base_norm.cpp: the C path), as simulated here; each row
(all axes from `axis` on, Layer / RMS; the one axis `axis`, Lp) on its own:
1. LayerNormalization: mean = float32(integer sum / n); variance = float32 sequential sum of
   (q - mean)^2 times 2^(2 e_in) / n; inv = 1 / sqrt_newton(variance + epsilon); each value
   ((q * 2^e_in - mean * 2^e_in) * inv) * (s * 2^e_s) + b * 2^e_b, times 2^-e_out, rounded.
2. RMSNormalization: r = 1 / sqrtf(float32(integer sum of q^2) * 2^(2 e_in) / n + epsilon),
   times 2^e_in * 2^-e_out; each value (q * r) * scale, rounded (scale float32).
3. LpNormalization: p = 1: inv = 1 / float32 sum of |q|; p = 2: inv = 1 / sqrtf(integer sum
   of q^2); the input exponent cancels; each value q * inv * 2^-e_out, rounded; an all-zero
   row gives zeros.
4. Rounding is the target's (floorf(x + 0.5) or rint on esp32p4), then saturation.

The kernels are NumPy (`layernorm_kernel` and the others: the obviously-right form); with the
fast kernels the simulator's LayerNormalization runs the same float32 steps in one C loop
(`layernorm_prepared`, tested bit for bit against `layernorm_kernel`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Lowerer, attr
from espstream.ops.reduce import round_f32, sqrt_newton
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant.plan import (
    own,
    own_with_constants,
)
from espstream.sim import (
    Fn,
    Simulator,
    saturate,
)
from espstream.stream.rules import (
    Ctx,
    generic,
    norm_axis,
    rank_of,
    rule_mixes_all,
    rule_unary,
    unary_time,
    unsupported,
)

MODULE = "norm"


# ---- the kernels ------------------------------------------------------------------------


def _rows(q: np.ndarray, axis: int) -> np.ndarray:
    """[outer, inner]: every axis from `axis` on is one row (ESP-DL's outer / inner dims)."""
    axis = axis % q.ndim if q.ndim else 0
    outer = int(np.prod(q.shape[:axis])) if axis else 1
    return q.reshape(outer, -1)


def _seq_sum(cols: np.ndarray) -> np.ndarray:
    """Row sums added left to right in float32, as the C loop does (np.sum would add pairwise):
    add.accumulate is sequential by definition."""
    cols = np.asarray(cols, np.float32)
    if cols.shape[1] == 0:
        return np.zeros(cols.shape[0], np.float32)
    return np.add.accumulate(cols, axis=1, dtype=np.float32)[:, -1]


def _f(e: int) -> np.float32:
    return np.float32(2.0 ** e)


def layernorm_kernel(q: np.ndarray, scale: np.ndarray | None, e_s: int, bias: np.ndarray | None,
                     e_b: int, axis: int, epsilon: float, e_in: int, e_out: int,
                     rounding: str) -> np.ndarray:
    """ESP-DL's quantized LayerNormalization (module rule 1), vectorized over rows."""
    x = _rows(q, axis)
    n = x.shape[1]
    xi = x.astype(np.int64)
    mean = np.float32(xi.sum(axis=1).astype(np.int32) * 1.0 / n)  # int * 1.0 / n in double
    diff = (x.astype(np.float32) - mean[:, None]).astype(np.float32)
    var = _seq_sum((diff * diff).astype(np.float32))
    s_in = _f(e_in)
    mean = (mean * s_in).astype(np.float32)
    var = (var * np.float32(s_in * s_in)).astype(np.float32)
    var = (var / np.float32(n)).astype(np.float32)
    inv = (np.float32(1.0) / sqrt_newton((var + np.float32(epsilon)).astype(np.float32)))
    inv = inv.astype(np.float32)
    xv = (x.astype(np.float32) * s_in).astype(np.float32)
    norm = ((xv - mean[:, None]).astype(np.float32) * inv[:, None]).astype(np.float32)
    sv = (np.float32(1.0) if scale is None
          else (scale.reshape(-1).astype(np.float32) * _f(e_s)).astype(np.float32))
    bv = (np.float32(0.0) if bias is None
          else (bias.reshape(-1).astype(np.float32) * _f(e_b)).astype(np.float32))
    res = ((norm * sv).astype(np.float32) + bv).astype(np.float32)
    y = round_f32((res * _f(-e_out)).astype(np.float32), rounding)
    return saturate(y, q.dtype).reshape(q.shape)


def layernorm_prepared(scale: np.ndarray | None, e_s: int, bias: np.ndarray | None, e_b: int,
                       axis: int, epsilon: float, e_in: int, e_out: int,
                       rounding: str) -> Callable[[np.ndarray], np.ndarray]:
    """`layernorm_kernel` with every argument but the data fixed, bit for bit: its rows in one
    C loop (`_int8.layernorm`, the same float32 operations in the same order, no contraction),
    the scaled scale / bias and float constants derived once per input shape (a simulator
    calls it once per chunk). The NumPy kernel runs instead where C would differ or not apply:
    no elements, an epsilon below 0 (the Newton root of a negative need not end), a scale /
    bias that does not match the row (NumPy raises), or a NaN result (NumPy's cast decides)."""
    from espstream.kernels import _int8

    eps = np.float32(epsilon)
    s_in = _f(e_in)
    fixed = (s_in, np.float32(s_in * s_in))
    tail = (eps, _f(-e_out), rounding != "half_up")  # round_f32: rint unless half_up
    plans: dict[tuple, tuple | None] = {}

    def numpy(q: np.ndarray) -> np.ndarray:
        return layernorm_kernel(q, scale, e_s, bias, e_b, axis, epsilon, e_in, e_out, rounding)

    def plan(q: np.ndarray) -> tuple | None:
        rows = _rows(q, axis).shape
        n = rows[1]
        if q.dtype not in (np.int8, np.int16) or q.size == 0 or not eps >= 0:
            return None
        consts = []
        for c, e, fill in ((scale, e_s, 1.0), (bias, e_b, 0.0)):
            if c is None:
                consts.append(np.full(n, fill, np.float32))
                continue
            c = c.reshape(-1)
            if c.size not in (1, n):
                return None
            v = (c.astype(np.float32) * _f(e)).astype(np.float32)
            consts.append(np.ascontiguousarray(np.broadcast_to(v, (n,))))
        return (rows, *consts, *fixed, np.float32(n), *tail)

    def run(q: np.ndarray) -> np.ndarray:
        key = (q.shape, q.dtype)
        try:
            p = plans[key]
        except KeyError:
            p = plans[key] = plan(q)
        if p is None:
            return numpy(q)
        y = _int8.layernorm(np.ascontiguousarray(q).reshape(p[0]), *p[1:])
        return numpy(q) if y is None else y.reshape(q.shape)

    return run


def layernorm_fast(q: np.ndarray, scale: np.ndarray | None, e_s: int, bias: np.ndarray | None,
                   e_b: int, axis: int, epsilon: float, e_in: int, e_out: int,
                   rounding: str) -> np.ndarray:
    """`layernorm_kernel` in C, bit for bit (`layernorm_prepared` for one call)."""
    return layernorm_prepared(scale, e_s, bias, e_b, axis, epsilon, e_in, e_out, rounding)(q)


def rmsnorm_kernel(q: np.ndarray, scale: np.ndarray, axis: int, epsilon: float, e_in: int,
                   e_out: int, rounding: str) -> np.ndarray:
    """ESP-DL's quantized RMSNormalization (module rule 2), vectorized over rows."""
    x = _rows(q, axis)
    n = x.shape[1]
    xi = x.astype(np.int64)
    wide = np.int32 if q.dtype == np.int8 else np.int64
    s_in = _f(e_in)
    ssq = np.float32((xi * xi).sum(axis=1).astype(wide))
    mean_sq = ((ssq * np.float32(s_in * s_in)).astype(np.float32) / np.float32(n))
    with np.errstate(divide="ignore"):
        r = (np.float32(1.0) / np.sqrt((mean_sq.astype(np.float32) + np.float32(epsilon))
                                       .astype(np.float32))).astype(np.float32)
    r = (r * np.float32(s_in * _f(-e_out))).astype(np.float32)
    res = (x.astype(np.float32) * r[:, None]).astype(np.float32)
    res = (res * scale.reshape(-1).astype(np.float32)).astype(np.float32)
    y = round_f32(np.nan_to_num(res), rounding)
    return saturate(y, q.dtype).reshape(q.shape)


def lpnorm_kernel(q: np.ndarray, axis: int, p: int, e_out: int, rounding: str) -> np.ndarray:
    """ESP-DL's quantized LpNormalization (module rule 3): one axis, vectorized."""
    if q.ndim == 0:
        return np.zeros_like(q)
    axis = axis % q.ndim
    x = np.moveaxis(q, axis, -1)
    lead = x.shape
    x = x.reshape(-1, lead[-1])
    xi = x.astype(np.int64)
    wide = np.int32 if q.dtype == np.int8 else np.int64
    with np.errstate(divide="ignore"):
        if p == 1:
            s = _seq_sum(np.abs(x.astype(np.float32)))
            inv = np.where(s > 0, np.float32(1.0) / s, np.float32(0)).astype(np.float32)
        else:
            s = np.float32((xi * xi).sum(axis=1).astype(wide))
            inv = np.where(s > 0, np.float32(1.0) / np.sqrt(s), np.float32(0)).astype(np.float32)
    res = ((x.astype(np.float32) * inv[:, None]).astype(np.float32) * _f(-e_out)).astype(
        np.float32)
    y = np.where(inv[:, None] > 0, round_f32(res, rounding), 0.0)
    return np.moveaxis(saturate(y, q.dtype).reshape(lead), -1, axis)


# ---- streamify ------------------------------------------------------------------------------


def stream_batchnorm(ctx: Ctx, node: gs.Node) -> None:
    """Pointwise over frames; a time axis on the channel axis is refused."""
    xt = unary_time(ctx, node)
    if xt is not None and xt.axis == 1:
        raise unsupported(node, "normalises along the time axis")
    return rule_unary(ctx, node)


def stream_norm(ctx: Ctx, node: gs.Node) -> None:
    """LayerNormalization / RMSNormalization / LpNormalization.

    1. Layer / RMS normalize every axis from `axis` (default -1) on, Lp the axis `axis`
       (default -1): a time axis among them is refused.
    2. Otherwise the output is per frame (the time axis passes; a zero frame does not stay
       zero, LayerNormalization adds its bias).
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    from espstream.stream.axes import Time

    if not isinstance(xt, Time):
        return generic(ctx, node)
    rank = rank_of(ctx, x)
    ax = norm_axis(int(node.attrs.get("axis", -1)), rank)
    mixes = xt.axis == ax if node.op == "LpNormalization" else xt.axis >= ax
    if mixes:
        raise unsupported(node, "normalises over the time axis")
    for o in node.outputs:
        if o.name:
            ctx.set(o, xt.but(dirty=xt.delay > 0, nonneg=False))


# ---- lower ----------------------------------------------------------------------------------


def _norm_input(lw: Lowerer, n: onnx.NodeProto):
    x = lw.act(n.input[0], n)
    if len([o for o in n.output if o]) > 1 and any(
            lw.consumers.get(o) or o in lw.graph_outputs for o in n.output[1:] if o):
        raise UserError(f"{n.op_type} '{n.name}': its Mean / InvStdDev outputs are used; "
                        "ESP-DL's LayerNormalization gives only Y")
    axis = int(attr(n, "axis", -1))
    axis = axis + x.rank if axis < 0 else axis
    if not 0 <= axis < x.rank:
        raise UserError(f"{n.op_type} '{n.name}': axis {axis} is out of range")
    if n.op_type != "LpNormalization":
        x = lw.layout_as(x, False)  # ESP-DL normalizes trailing axes of the runtime layout
        return x, axis
    return x, x.runtime_axis(axis)


def _per_row(lw: Lowerer, n: onnx.NodeProto, data: np.ndarray, inner: list[int],
             what: str) -> np.ndarray:
    try:
        return np.ascontiguousarray(np.broadcast_to(data, inner)).reshape(-1)
    except ValueError:
        raise UserError(f"{n.op_type} '{n.name}': its {what} {list(data.shape)} does not "
                        f"broadcast to the normalized shape {inner}") from None


def lower_layernorm(lw: Lowerer, n: onnx.NodeProto) -> None:
    x, axis = _norm_input(lw, n)
    inner = [int(d) for d in x.shape[axis:]]
    inputs = [x.name]
    for k, what in ((1, "scale"), (2, "bias")):
        if len(n.input) <= k or not n.input[k]:
            continue
        qc = lw.qconst(n.input[k])
        if qc is None or len(qc.exps) != 1:
            raise UserError(f"{n.op_type} '{n.name}': its {what} must be a constant quantized "
                            "per tensor (calibrate the model)")
        if qc.data.dtype != x.dtype:
            raise UserError(f"{n.op_type} '{n.name}': its {what} is {qc.data.dtype}, the input "
                            f"{x.dtype}; ESP-DL reads both at one width")
        data = _per_row(lw, n, qc.data, inner, what)
        inputs.append(lw.initializer(lw.fresh(f"{n.name}_{what}"), data, qc.exps))
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), x.cl)
    lw.need_q(n, out)
    lw.emit(n.op_type, n.name, inputs, [name],
            {"axis": axis, "epsilon": float(attr(n, "epsilon", 1e-5)),
             "quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def lower_rmsnorm(lw: Lowerer, n: onnx.NodeProto) -> None:
    x, axis = _norm_input(lw, n)
    inner = [int(d) for d in x.shape[axis:]]
    if len(n.input) < 2 or n.input[1] not in lw.consts:
        raise UserError(f"{n.op_type} '{n.name}': its scale must be a float constant")
    data = _per_row(lw, n, np.asarray(lw.consts[n.input[1]], np.float32), inner, "scale")
    scale = lw.initializer(lw.fresh(f"{n.name}_scale"), data.astype(np.float32), [0])
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), x.cl)
    lw.need_q(n, out)
    lw.emit(n.op_type, n.name, [x.name, scale], [name],
            {"axis": axis, "epsilon": float(attr(n, "epsilon", 1e-5)),
             "quant_type": lw.qtype(x.dtype), "stash_type": int(attr(n, "stash_type", 1))})
    lw.finish_output(out)


def lower_lpnorm(lw: Lowerer, n: onnx.NodeProto) -> None:
    x, axis = _norm_input(lw, n)
    p = int(attr(n, "p", 2))
    if p not in (1, 2):
        raise UserError(f"{n.op_type} '{n.name}': p={p}; ESP-DL (and ONNX) take p 1 or 2")
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), x.cl)
    lw.need_q(n, out)
    lw.emit(n.op_type, n.name, [x.name], [name],
            {"axis": axis, "p": p, "quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


# ---- simulate ---------------------------------------------------------------------------


def _int_input(op: str, q: np.ndarray) -> None:
    if q.dtype not in (np.int8, np.int16):
        raise ValueError(f"{op} on {q.dtype}: the quantized kernel takes int8 / int16")


def sim_layernorm(sim: Simulator, node: Node) -> Fn:
    e_in, e_out = sim.exp(node.inputs[0]), sim.exp(node.outputs[0])
    axis = int(node.attrs.get("axis", -1))
    eps = float(node.attrs.get("epsilon", 1e-5))
    consts = []
    for k, what in ((1, "scale"), (2, "bias")):
        if len(node.inputs) > k and node.inputs[k]:
            consts.append((sim.init(node, k, what), sim.init_exp(node.inputs[k])))
        else:
            consts.append((None, 0))
    (s, e_s), (b, e_b) = consts
    from espstream import kernels as fast

    if sim.kernels is fast:
        kernel = layernorm_prepared(s, e_s, b, e_b, axis, eps, e_in, e_out, sim.rounding)
    else:  # the reference kernels: NumPy
        def kernel(q: np.ndarray) -> np.ndarray:
            return layernorm_kernel(q, s, e_s, b, e_b, axis, eps, e_in, e_out, sim.rounding)

    def fn(args: list) -> list:
        _int_input(node.op_type, args[0])
        return [kernel(args[0])]

    return fn


def sim_rmsnorm(sim: Simulator, node: Node) -> Fn:
    e_in, e_out = sim.exp(node.inputs[0]), sim.exp(node.outputs[0])
    axis = int(node.attrs.get("axis", -1))
    eps = float(node.attrs.get("epsilon", 1e-5))
    scale = np.asarray(sim.init(node, 1, "scale"))
    if scale.dtype != np.float32:
        raise UserError(f"node '{node.name}' (RMSNormalization): its scale is {scale.dtype}; "
                        "ESP-DL reads it as float32")

    def fn(args: list) -> list:
        _int_input(node.op_type, args[0])
        return [rmsnorm_kernel(args[0], scale, axis, eps, e_in, e_out, sim.rounding)]

    return fn


def sim_lpnorm(sim: Simulator, node: Node) -> Fn:
    e_out = sim.exp(node.outputs[0])
    axis = int(node.attrs.get("axis", -1))
    p = int(node.attrs.get("p", 2))

    def fn(args: list) -> list:
        _int_input(node.op_type, args[0])
        return [lpnorm_kernel(args[0], axis, p, e_out, sim.rounding)]

    return fn


_NORM = "per frame; normalising over time: refused"
register(OpSpec("BatchNormalization", MODULE, stream=stream_batchnorm,
                stream_rule="pointwise; along time: refused"))
for _op in ("InstanceNormalization", "GroupNormalization"):
    register(OpSpec(_op, MODULE, stream=rule_mixes_all, stream_first=True,
                    stream_rule="refused on a time axis (mixes every frame)"))
register(OpSpec("LayerNormalization", MODULE, calibrate=own_with_constants,
                calibrate_rule="own exponent; scale, bias their own", stream=stream_norm,
                stream_rule=_NORM, lower=lower_layernorm, espdl=("LayerNormalization",)))
register(OpSpec("RMSNormalization", MODULE, calibrate=own,
                calibrate_rule="own exponent; scale float", stream=stream_norm,
                stream_rule=_NORM, lower=lower_rmsnorm, espdl=("RMSNormalization",)))
register(OpSpec("LpNormalization", MODULE, calibrate=own, calibrate_rule="own exponent",
                stream=stream_norm, stream_rule=_NORM, lower=lower_lpnorm,
                espdl=("LpNormalization",)))
register_sim(SimSpec("LayerNormalization", MODULE, sim_layernorm, ESPDL_GOLDEN))
register_sim(SimSpec("RMSNormalization", MODULE, sim_rmsnorm, ESPDL_GOLDEN))
register_sim(SimSpec("LpNormalization", MODULE, sim_lpnorm, ESPDL_GOLDEN))

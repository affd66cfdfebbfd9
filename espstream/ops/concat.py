"""Concat, Split, Pad and Slice: joining, cutting and padding tensors.

Calibrate: Concat requantizes its inputs to the output's exponent (plan rule 5); Split, Pad
and Slice share their input's (rule 4). Streamify: Concat broadcasts (not along time); Split
off the time axis passes time through; a zero Pad on time folds into the Conv / pool it feeds
or becomes a delay cache (`rule_pad`); a Slice on time is a crop, a stride or "the last M
frames" (`rule_slice`). Lower: axes and pads remapped to the runtime layout. Simulate: values
copied, never rescaled (sim's rule 9).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Act, Lowerer, QConst, attr, base_name
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    ESPPPQ_FIXTURE,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant.plan import (
    requant,
    share,
)
from espstream.sim import (
    Fn,
    Simulator,
    ints,
    onnx_slice_bounds,
)
from espstream.stream.axes import ShapeOf, Summary, Time
from espstream.stream.rules import (
    INT_MAX,
    Ctx,
    Req,
    generic,
    norm_axis,
    plan_window,
    rank_of,
    rule_broadcast,
    unsupported,
)

MODULE = "concat"


def _pad_values(ctx: Ctx, node: gs.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        return ctx.consts.ints(node.inputs[1])
    p = node.attrs.get("pads")
    return None if p is None else [int(v) for v in p]


_FOLD_THROUGH = {"QuantizeLinear", "DequantizeLinear", "Identity", "Dropout", "Cast"}


def _fold_target(pad_out: gs.Tensor) -> gs.Tensor | None:
    """The tensor a Pad's output reaches a Conv/Pool through (single-consumer Q/DQ chain)."""
    t = pad_out
    for _ in range(8):
        if len(t.outputs) != 1:
            return None
        n = t.outputs[0]
        if n.op in ("Conv", "AveragePool", "MaxPool") and n.inputs[0] is t:
            return t
        if n.op in _FOLD_THROUGH and n.inputs[0] is t and len(n.outputs) == 1:
            t = n.outputs[0]
            continue
        return None
    return None


def rule_pad(ctx: Ctx, node: gs.Node) -> None:
    """Pad with padding on the time axis.

    1. Only constant-mode padding with a zero value can be streamed on the time axis
       (reflect/edge read the sequence's ends).
    2. If the Pad's output reaches a single Conv/AveragePool/MaxPool (possibly through Q/DQ),
       its time padding is folded into that op's left padding as literal zeros: the Pad keeps
       only its other axes and the op's one cache serves both.
    3. Otherwise it streams as a window of one frame with `left` padding: past padding becomes a
       delay cache of that many zero frames, negative padding (a crop) becomes delay.
    4. Padding on other axes is untouched.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    pads = _pad_values(ctx, node)
    if pads is None:
        raise unsupported(node, "has padding that is not a constant")
    rank = rank_of(ctx, x)
    axes = None
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = [norm_axis(a, rank) for a in ctx.consts.ints(node.inputs[3]) or []]
    full = [0] * (2 * rank)
    if axes is None:
        full = list(pads)
    else:
        for j, a in enumerate(axes):
            full[a], full[a + rank] = pads[j], pads[j + len(axes)]
    lo, hi = full[xt.axis], full[xt.axis + rank]
    out = node.outputs[0]
    if lo == 0 and hi == 0:
        ctx.set(out, xt.but(length=ctx.length(out, xt.axis)))
        return
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = 0.0
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = ctx.consts.value(node.inputs[2])
        value = None if v is None else float(np.asarray(v).reshape(-1)[0])
    if mode != "constant" or value != 0.0:
        raise unsupported(node, f"pads the time axis with mode {mode!r}, value {value}")
    target = _fold_target(out) if lo >= 0 else None
    if target is not None:
        ctx.set(out, xt)
        ctx.pending_pad[target.name] = (lo, hi)
        chain = out
        while chain is not target:
            chain = chain.outputs[0].outputs[0]
            ctx.pending_pad[chain.name] = (lo, hi)
    else:
        ctx.set(out, plan_window(ctx, node, 0, x, xt, out, xt.axis, 1, 1, lo, max(lo, 0)))

    def fix(c: int) -> None:
        new = list(full)
        new[xt.axis] = new[xt.axis + rank] = 0
        if axes is None:
            vals = new
        else:
            vals = [new[a] for a in axes] + [new[a + rank] for a in axes]
        if not any(vals):  # nothing left to pad: a no-op Pad would only cost a copy
            node.op, node.attrs = "Identity", {}
            while len(node.inputs) > 1:
                node.inputs.pop()
        elif len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1] = gs.Constant(node.name + "__pads", np.array(vals, dtype=np.int64))
        else:
            node.attrs["pads"] = vals

    ctx.fix(fix)


def _slice_params(ctx: Ctx, node: gs.Node, rank: int):
    if ctx.opset < 10 or len(node.inputs) == 1:
        starts = list(node.attrs.get("starts", []))
        ends = list(node.attrs.get("ends", []))
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
        return starts, ends, axes, steps
    starts = ctx.consts.ints(node.inputs[1])
    ends = ctx.consts.ints(node.inputs[2])
    if starts is None or ends is None:
        raise unsupported(node, "slices with non-constant starts/ends")
    axes = list(range(len(starts)))
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = ctx.consts.ints(node.inputs[3])
    steps = [1] * len(starts)
    if len(node.inputs) > 4 and node.inputs[4].name:
        steps = ctx.consts.ints(node.inputs[4])
    if axes is None or steps is None:
        raise unsupported(node, "slices with non-constant axes/steps")
    return starts, ends, [norm_axis(a, rank) for a in axes], steps


def rule_slice(ctx: Ctx, node: gs.Node) -> None:
    """Slice on the time axis (other axes are untouched).

    1. Full range, step 1: pass through.
    2. A negative start to the end with step 1 (`x[..., -M:]`): the last M frames, a window.
       A cache keeps `M - chunk` past frames when M exceeds the chunk; the output is a summary,
       recomputed every call, equal to offline after the last chunk (ESP-DL's tutorial head).
    3. A non-negative start `a`, step `st`, to the end or to an end-relative stop (a crop such as
       the chomp after a symmetric causal conv): `plan_window` with K = 1, stride st and left
       padding `-a`; the streaming Slice takes every st-th frame of what it is given.
    4. Anything else (the first M frames, a reversed time axis) is unsupported.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    for extra in node.inputs[1:]:
        if isinstance(ctx.get(extra), (Time, Summary, ShapeOf)):
            raise unsupported(node, "computes its bounds from the data")
    rank = rank_of(ctx, x)
    starts, ends, axes, steps = _slice_params(ctx, node, rank)
    out = node.outputs[0]
    if xt.axis not in axes:
        ctx.set(out, xt.but(length=ctx.length(out, xt.axis)))
        return
    j = axes.index(xt.axis)
    a, b, st = starts[j], ends[j], steps[j]
    T = xt.length
    an = min(max(a + T if a < 0 else a, 0), T)
    bn = min(max(b + T if b < 0 else b, 0), T)
    if st == 1 and a < 0 and bn >= T:
        M = T - an
        ctx.req(x, Req(node, 0, last=M, kind="last"))
        comparable = ctx.ends_aligned(xt) and xt.warmup <= T - M
        why = "" if comparable else "the window lags the offline one or sees warm-up frames"
        ctx.set(out, Summary(lag=xt.delay, warm=xt.warmup > T - M, comparable=comparable, why=why))
        return
    if st == 1 and an == 0 and bn >= T:
        ctx.set(out, xt)
        return
    if st >= 1 and a >= 0 and (b >= T or b < 0):
        res = plan_window(ctx, node, 0, x, xt, out, xt.axis, 1, st, -an, 0)
        ctx.set(out, res)

        def fix(c: int) -> None:
            s2 = [0 if k == j else v for k, v in enumerate(starts)]
            e2 = [INT_MAX if k == j else v for k, v in enumerate(ends)]
            if ctx.opset < 10 or len(node.inputs) == 1:
                node.attrs["starts"], node.attrs["ends"] = s2, e2
                return
            node.inputs[1] = gs.Constant(node.name + "__starts", np.array(s2, dtype=np.int64))
            node.inputs[2] = gs.Constant(node.name + "__ends", np.array(e2, dtype=np.int64))

        ctx.fix(fix)
        return
    raise unsupported(node, f"keeps frames {a}:{b}:{st} of the time axis")


def rule_split(ctx: Ctx, node: gs.Node) -> None:
    """Split on an axis other than time: every output carries the input's time axis."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    ax = norm_axis(int(node.attrs.get("axis", 0)), rank_of(ctx, x))
    if ax == xt.axis:
        raise unsupported(node, "splits the time axis")
    for o in node.outputs:
        ctx.set(o, xt)


def lower_concat(lw: Lowerer, n: onnx.NodeProto) -> None:
    ops, cl = lw.operands(n, list(n.input))
    shape = lw.shape(n.output[0])
    name, out = lw.define_output(n.output[0], n, shape, cl)
    lw.need_q(n, out)
    inputs = []
    for nm, o in zip(n.input, ops, strict=True):
        if isinstance(o, Act):
            inputs.append(lw.requantize(lw.layout_as(o, cl), out.exp).name)
        else:
            inputs.append(lw.const_input(n, nm, o, len(shape), cl, out.exp))
    axis = int(attr(n, "axis"))
    lw.emit("Concat", n.name, inputs, [name],
              {"axis": out.runtime_axis(axis), "quant_type": lw.qtype(out.dtype)})
    lw.finish_output(out)


def lower_slice(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.act(n.input[0], n)
    if not n.input[1:] and attr(n, "starts") is not None:
        raise UserError(f"Slice '{n.name}': opset < 10 Slice attributes; run espstream "
                        "optimize (opset >= 13)")
    starts = lw.int_const(n, 1, "starts")
    ends = lw.int_const(n, 2, "ends")
    axes = lw.int_const(n, 3, "axes")
    steps = lw.int_const(n, 4, "steps")
    if axes is None:
        axes = np.arange(len(starts), dtype=np.int64)
    axes_rt = np.asarray([x.runtime_axis(int(a)) for a in axes], dtype=np.int64)
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), x.cl, x)
    lw.need_q(n, out)
    inputs = [x.name]
    names = [n.input[k] if len(n.input) > k and n.input[k] else f"{n.name}_{w}"
             for k, w in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps"))]
    for nm, v in zip(names, (starts, ends, axes_rt, steps), strict=True):
        if v is None:
            v = np.ones(len(starts), dtype=np.int64)
        inputs.append(lw.initializer(base_name(nm), np.asarray(v, dtype=np.int64), [0]))
    lw.emit("Slice", n.name, inputs, [name], {"quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def lower_split(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.act(n.input[0], n)
    axis = int(attr(n, "axis", 0))
    inputs = [x.name]
    split = lw.int_const(n, 1, "split")
    if split is None and attr(n, "split") is not None:
        split = np.asarray(attr(n, "split"), np.int64)
    if split is not None:
        inputs.append(lw.initializer(base_name(n.input[1] if len(n.input) > 1 and n.input[1]
                                             else f"{n.name}_split"),
                                       split.astype(np.int64), [0]))
    outs = []
    pend = []
    for o in n.output:
        name, a = lw.define_output(o, n, lw.shape(o), x.cl, x)
        lw.need_q(n, a)
        outs.append(name)
        pend.append((lw.pending, a))
    lw.emit("Split", n.name, inputs, outs,
              {"axis": x.runtime_axis(axis), "quant_type": lw.qtype(x.dtype)})
    for p, a in pend:
        lw.pending = p
        lw.finish_output(a)


def lower_pad(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.act(n.input[0], n)
    mode = attr(n, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "wrap":
        raise UserError(f"Pad '{n.name}': wrap mode is not supported by ESP-DL")
    pads = lw.int_const(n, 1, "pads")
    if pads is None:
        pads = np.asarray(attr(n, "pads"), np.int64)
    if len(n.input) > 3 and n.input[3]:
        raise UserError(f"Pad '{n.name}': the axes input is not supported")
    r = x.rank
    begin, end = list(pads[:r]), list(pads[r:])
    perm = x.perm
    pads_rt = np.asarray([begin[p] for p in perm] + [end[p] for p in perm], np.int64)
    inputs = [x.name, lw.initializer(base_name(n.input[1]) if len(n.input) > 1 else
                                       f"{n.name}_pads", pads_rt, [0])]
    if len(n.input) > 2 and n.input[2]:
        qc = lw.qconst(n.input[2])
        if qc is None:
            c = lw.consts.get(n.input[2])
            if c is None or np.any(c != 0):
                raise UserError(f"Pad '{n.name}': the constant value must be a quantized "
                                "constant or 0")
            qc = QConst(np.zeros((), x.dtype), [x.exp], None)
        inputs.append(lw.initializer(base_name(n.input[2]), qc.data.astype(x.dtype), qc.exps))
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), x.cl, x)
    lw.need_q(n, out)
    lw.emit("Pad", n.name, inputs, [name], {"mode": mode, "quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def sim_concat(sim: Simulator, node: Node) -> Fn:
    axis = int(node.attrs.get("axis", 0))
    sim.same_exponent(node, all_inputs=True)

    def fn(args: list) -> list:
        return [np.concatenate([a for a in args if a is not None], axis=axis)]

    return fn


def sim_split(sim: Simulator, node: Node) -> Fn:
    axis = int(node.attrs.get("axis", 0))
    sim.same_exponent(node)
    sizes = None
    if len(node.inputs) > 1 and node.inputs[1]:
        sizes = [int(v) for v in sim.init(node, 1, "split").reshape(-1)]
    elif "split" in node.attrs:
        sizes = ints(node.attrs["split"])
    n_out = len(node.outputs)

    def fn(args: list) -> list:
        x = args[0]
        dim = x.shape[axis]
        parts = sizes
        if parts is None:
            if dim % n_out:
                raise ValueError(f"{dim} does not split into {n_out} equal parts")
            parts = [dim // n_out] * n_out
        if sum(parts) != dim or len(parts) != n_out:
            raise ValueError(f"split {parts} does not fit {n_out} outputs of axis size {dim}")
        return [np.ascontiguousarray(p) for p in np.split(x, np.cumsum(parts)[:-1], axis=axis)]

    return fn


def sim_pad(sim: Simulator, node: Node) -> Fn:
    """Pad in the runtime layout: pads [begin per axis..., end per axis...]; constant mode
    fills with the constant input (an integer at the input's exponent) or 0."""
    sim.same_exponent(node)
    pads = [int(v) for v in sim.init(node, 1, "pads").reshape(-1)]
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "reflect", "edge"):
        raise UserError(f"node '{node.name}' (Pad): mode '{mode}' is not supported")
    value = 0
    if len(node.inputs) > 2 and node.inputs[2]:
        value = int(sim.init(node, 2, "constant value").reshape(-1)[0])
    if min(pads) < 0:
        raise UserError(f"node '{node.name}' (Pad): negative pads {pads} are not supported")

    def fn(args: list) -> list:
        x = args[0]
        if len(pads) != 2 * x.ndim:
            raise ValueError(f"{len(pads)} pads for a rank-{x.ndim} input")
        width = list(zip(pads[: x.ndim], pads[x.ndim :], strict=True))
        if mode == "constant":
            return [np.pad(x, width, constant_values=value)]
        return [np.pad(x, width, mode=mode)]

    return fn


def sim_slice(sim: Simulator, node: Node) -> Fn:
    starts = [int(v) for v in sim.init(node, 1, "starts").reshape(-1)]
    ends = [int(v) for v in sim.init(node, 2, "ends").reshape(-1)]
    axes = (
        [int(v) for v in sim.init(node, 3, "axes").reshape(-1)]
        if len(node.inputs) > 3 and node.inputs[3]
        else list(range(len(starts)))
    )
    steps = (
        [int(v) for v in sim.init(node, 4, "steps").reshape(-1)]
        if len(node.inputs) > 4 and node.inputs[4]
        else [1] * len(starts)
    )
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise UserError(f"node '{node.name}' (Slice): starts/ends/axes/steps lengths differ")
    if 0 in steps:
        raise UserError(f"node '{node.name}' (Slice): a step of 0")

    indices: dict[tuple, tuple] = {}  # the index depends on the input shape only

    def fn(args: list) -> list:
        x = args[0]
        index = indices.get(x.shape)
        if index is None:
            idx = [slice(None)] * x.ndim
            for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
                if not -x.ndim <= a < x.ndim:
                    raise ValueError(f"axis {a} is outside a rank-{x.ndim} input")
                dim = x.shape[a]
                idx[a] = slice(*onnx_slice_bounds(s, e, st, dim))
            index = indices[x.shape] = tuple(idx)
        return [np.ascontiguousarray(x[index])]

    return fn


register(OpSpec("Concat", MODULE, calibrate=requant,
                calibrate_rule="inputs at the output's exponent",
                stream=rule_broadcast, stream_rule="broadcast; along time: refused",
                lower=lower_concat, espdl=("Concat",)))
register(OpSpec("Split", MODULE, calibrate=share, calibrate_rule="input's exponent",
                stream=rule_split, stream_rule="off the time axis only", lower=lower_split,
                espdl=("Split",)))
register(OpSpec("Pad", MODULE, calibrate=share, calibrate_rule="input's exponent",
                stream=rule_pad,
                stream_rule="zero time padding: folded into the next window or a delay",
                lower=lower_pad, espdl=("Pad",)))
register(OpSpec("Slice", MODULE, calibrate=share, calibrate_rule="input's exponent",
                stream=rule_slice, stream_rule="crop / stride / last M frames on time",
                lower=lower_slice, espdl=("Slice",)))
register_sim(SimSpec("Concat", MODULE, sim_concat, ESPDL_GOLDEN))
register_sim(SimSpec("Split", MODULE, sim_split, ESPDL_GOLDEN))
register_sim(SimSpec("Pad", MODULE, sim_pad, ESPDL_GOLDEN))
register_sim(SimSpec("Slice", MODULE, sim_slice, ESPPPQ_FIXTURE))

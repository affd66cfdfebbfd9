"""Data movement: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Gather, Identity (lowered),
Tile, Shape and Size (streamed in float only).

Calibrate: the output shares the input's exponent (plan rule 4; Gather only with constant
indices, which the lowering writes as index + dim where negative: ESP-DL reads them
unchecked). Streamify: the time axis is followed through the reshaping (`rule_reshape` replaces
a computed target shape by a constant with the chunk's frames; merging time with another axis is
refused); Gather on time keeps only the last frame. Lower (lower's rule 3): these need the ONNX
order, so a Transpose back to it is inserted before them; a Transpose on channels-last data
has its perm composed. Simulate: values copied.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Lowerer, attr, base_name
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    NUMPY_ORACLE,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant.plan import (
    PlanCtx,
    share,
)
from espstream.sim import (
    Fn,
    Simulator,
    ints,
    onnx_reshape,
)
from espstream.stream.axes import ShapeOf, Summary, Time
from espstream.stream.rules import (
    Ctx,
    axes_input_or_attr,
    generic,
    norm_axis,
    rank_of,
    rule_unary,
    unsupported,
)

MODULE = "movement"


def calibrate_gather(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    """Data movement (plan rule 4) with constant indices: ESP-DL's Gather reads its indices
    from the model."""
    if len(n.input) < 2 or n.input[1] not in pc.inits:
        raise UserError(f"node {n.name!r} (Gather): its indices are computed; ESP-DL's Gather "
                        "takes constant indices")
    share(pc, n, float_outs)


def rule_gather(ctx: Ctx, node: gs.Node) -> None:
    """Gather.

    1. On an axis other than time: pass through (the time axis shifts by the indices' rank - 1).
    2. On the time axis with every index the last frame (-1 or T-1): the last frame, a window
       of one frame (a summary); T-1 is rewritten as -1.
    3. Any other Gather along time: unsupported.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    if isinstance(ctx.get(node.inputs[1]), (Time, Summary)):
        raise unsupported(node, "gathers with data-dependent indices")
    rank = rank_of(ctx, x)
    ax = norm_axis(int(node.attrs.get("axis", 0)), rank)
    idx = ctx.consts.value(node.inputs[1])
    out = node.outputs[0]
    if ax != xt.axis:
        r_idx = 0 if idx is None else np.ndim(idx)
        new_axis = xt.axis if xt.axis < ax else xt.axis + r_idx - 1
        ctx.set(out, xt.but(axis=new_axis, length=ctx.length(out, new_axis)))
        return
    T = xt.length
    if idx is None or not np.all((idx == -1) | (idx == T - 1)):
        raise unsupported(node, "picks frames along time (only the last frame streams)")
    comparable = ctx.ends_aligned(xt) and xt.warmup < T
    ctx.set(out, Summary(lag=xt.delay, warm=xt.warmup >= T, comparable=comparable))
    if np.any(idx == T - 1) and T != 0:
        arr = np.full(np.shape(idx), -1, dtype=np.asarray(idx).dtype)

        def fix(c: int) -> None:
            node.inputs[1] = gs.Constant(node.name + "__last", arr)

        ctx.fix(fix)


def rule_transpose(ctx: Ctx, node: gs.Node) -> None:
    """Transpose: the time axis moves to where `perm` puts it (default: reversed axes)."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    rank = rank_of(ctx, x)
    perm = list(node.attrs.get("perm") or reversed(range(rank)))
    ctx.set(node.outputs[0], xt.but(axis=perm.index(xt.axis)))


def rule_squeeze(ctx: Ctx, node: gs.Node) -> None:
    """Squeeze: 1. squeezing the time axis is refused; 2. the time axis shifts left by the
    squeezed axes before it (all size-1 axes when `axes` is absent)."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    shape = ctx.shapes[x.name]
    axes = axes_input_or_attr(ctx, node, len(shape))
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    if xt.axis in axes:
        raise unsupported(node, "squeezes the time axis")
    ctx.set(node.outputs[0], xt.but(axis=xt.axis - sum(1 for a in axes if a < xt.axis)))


def rule_unsqueeze(ctx: Ctx, node: gs.Node) -> None:
    """Unsqueeze: the time axis moves to its place among the output axes not inserted."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    out_rank = rank_of(ctx, node.outputs[0])
    axes = axes_input_or_attr(ctx, node, out_rank) or []
    kept = [i for i in range(out_rank) if i not in axes]
    ctx.set(node.outputs[0], xt.but(axis=kept[xt.axis]))


def rule_flatten(ctx: Ctx, node: gs.Node) -> None:
    """Flatten to 2-D at `axis`.

    1. When every other axis on the time axis's side has size 1, time survives as axis 0 or 1.
    2. Otherwise Flatten mixes time with other axes: refused (a window summary in front of it,
       such as the last M frames, flattens fine: it has no time axis left).
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    shape = ctx.shapes[x.name]
    k = norm_axis(int(node.attrs.get("axis", 1)), len(shape))
    side = range(0, k) if xt.axis < k else range(k, len(shape))
    if any(shape[i] != 1 for i in side if i != xt.axis):
        raise unsupported(node, "flattens the time axis together with other axes")
    ctx.set(node.outputs[0], xt.but(axis=0 if xt.axis < k else 1))


def rule_reshape(ctx: Ctx, node: gs.Node) -> None:
    """Reshape.

    1. The time axis must survive unmerged: an output axis j of the same length with the same
       number of elements before it. Otherwise refused.
    2. The streaming Reshape gets an explicit target shape with the chunk's frames on that
       axis (batch 1), replacing any shape computed from the data.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    ins = ctx.shapes[x.name]
    out = node.outputs[0]
    outs = ctx.shapes[out.name]
    before = math.prod(ins[: xt.axis])
    cand = [
        j for j in range(len(outs))
        if outs[j] == ins[xt.axis] and math.prod(outs[:j]) == before
    ]
    if len(cand) != 1:
        raise unsupported(node, f"reshapes {ins} to {outs}, merging or splitting the time axis")
    j = cand[0]
    res = xt.but(axis=j)
    ctx.set(out, res)

    def fix(c: int) -> None:
        shape = list(outs)
        shape[j] = int(Fraction(c) / xt.stride)
        node.inputs[1] = gs.Constant(node.name + "__shape", np.array(shape, dtype=np.int64))

    ctx.fix(fix)


def rule_tile(ctx: Ctx, node: gs.Node) -> None:
    """Tile: repeating along the time axis is refused; other axes pass through."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    reps = ctx.consts.ints(node.inputs[1])
    if reps is None or reps[xt.axis] != 1:
        raise unsupported(node, "repeats along the time axis")
    ctx.set(node.outputs[0], xt)


def rule_shape(ctx: Ctx, node: gs.Node) -> None:
    """Shape / Size of a time tensor: its value changes with the chunk. It is allowed only where
    it ends in a Reshape's shape input (which the Reshape rule replaces by a constant)."""
    x = node.inputs[0]
    if isinstance(ctx.get(x), (Time, Summary)):
        ctx.set(node.outputs[0], ShapeOf(x.name))
        return
    return generic(ctx, node)


def lower_transpose(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.act(n.input[0], n)
    perm = [int(p) for p in attr(n, "perm", list(range(x.rank))[::-1])]
    # runtime data = onnx.transpose(x.perm); onnx output = onnx.transpose(perm)
    rt_perm = [x.perm.index(p) for p in perm]
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), False, x)
    lw.need_q(n, out)
    lw.emit("Transpose", n.name, [x.name], [name],
              {"perm": rt_perm, "quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def lower_identity(lw: Lowerer, n: onnx.NodeProto) -> None:
    """An alias of its input (streamify turns a no-op Pad into an Identity); a real
    Identity node only where a graph output needs an operator producing it."""
    x = lw.act(n.input[0], n)
    t = n.output[0]
    if t not in lw.graph_outputs and not any(
            d in lw.graph_outputs for q in lw.q_consumers(t) for d in lw.dq_outputs(q)):
        lw.acts[t] = x
        return
    name, out = lw.define_output(t, n, x.shape, x.cl, x)
    lw.emit("Identity", n.name, [x.name], [name], {"quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def lower_plain(lw: Lowerer, n: onnx.NodeProto) -> None:
    op = n.op_type
    x = lw.layout_as(lw.act(n.input[0], n), False)
    inputs = [x.name]
    attrs: dict[str, Any] = {}
    if op == "Reshape":
        shp = lw.int_const(n, 1, "shape")
        inputs.append(lw.initializer(base_name(n.input[1]), shp.astype(np.int64), [0]))
        if attr(n, "allowzero") is not None:
            attrs["allowzero"] = int(attr(n, "allowzero"))
    elif op == "Flatten":
        attrs["axis"] = int(attr(n, "axis", 1))
    elif op in ("Squeeze", "Unsqueeze"):
        axes = lw.int_const(n, 1, "axes")
        if axes is None and attr(n, "axes") is not None:
            axes = np.asarray(attr(n, "axes"), np.int64)
        if axes is not None:
            nm = n.input[1] if len(n.input) > 1 and n.input[1] else f"{n.name}_axes"
            inputs.append(lw.initializer(base_name(nm), axes.astype(np.int64), [0]))
    elif op == "Gather":
        idx = lw.int_const(n, 1, "indices")
        if idx is None:
            raise UserError(f"Gather '{n.name}': its indices must be a constant")
        ax = int(attr(n, "axis", 0))
        dim = x.shape[ax]
        if not isinstance(dim, int):
            raise UserError(f"Gather '{n.name}': axis {ax} has no fixed length")
        idx = np.asarray(idx, np.int64)
        if np.any(idx < -dim) or np.any(idx >= dim):
            raise UserError(f"Gather '{n.name}': an index is out of range for length {dim}")
        # ESP-DL adds an index to the address unchecked: negatives are written as index + dim
        idx = np.where(idx < 0, idx + dim, idx)
        inputs.append(lw.initializer(base_name(n.input[1]), idx, [0]))
        attrs["axis"] = ax
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), False, x)
    lw.need_q(n, out)
    lw.emit(op, n.name, inputs, [name], {**attrs, "quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)
    return None


def sim_movement(sim: Simulator, node: Node) -> Fn:
    sim.same_exponent(node)
    op = node.op_type
    if op == "Identity":
        return lambda args: [args[0].copy()]
    if op == "Transpose":
        perm = node.attrs.get("perm")
        axes = None if perm is None else tuple(ints(perm))  # read once, not per call
        return lambda args: [np.ascontiguousarray(np.transpose(args[0], axes))]
    if op == "Flatten":
        axis = int(node.attrs.get("axis", 1))

        def flatten(args: list) -> list:
            x = args[0]
            a = axis % x.ndim if x.ndim else 0
            return [x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))]

        return flatten
    if op == "Reshape":
        shape = [int(v) for v in sim.init(node, 1, "shape").reshape(-1)]
        if int(node.attrs.get("allowzero", 0)):
            return lambda args: [args[0].reshape(shape)]
        return lambda args: [args[0].reshape(onnx_reshape(args[0].shape, shape))]
    if op == "Gather":
        idx = sim.init(node, 1, "indices").astype(np.int64)
        g_axis = int(node.attrs.get("axis", 0))

        def gather(args: list) -> list:
            x = args[0]
            if np.any(idx < 0) or np.any(idx >= x.shape[g_axis]):
                raise UserError(f"node '{node.name}' (Gather): indices {idx.min()}..{idx.max()} "
                                f"outside [0, {x.shape[g_axis]}) (ESP-DL reads them unchecked)")
            return [np.ascontiguousarray(np.take(x, idx, axis=g_axis))]

        return gather
    if op in ("Squeeze", "Unsqueeze"):
        if len(node.inputs) > 1 and node.inputs[1]:
            axes = [int(v) for v in sim.init(node, 1, "axes").reshape(-1)]
        else:
            axes = ints(node.attrs.get("axes", [])) or None
        if op == "Squeeze":
            return lambda args: [
                np.squeeze(args[0], axis=None if axes is None else tuple(axes))
            ]
        if axes is None:
            raise UserError(f"node '{node.name}' (Unsqueeze) has no axes")
        return lambda args: [np.expand_dims(args[0], tuple(axes))]
    raise AssertionError(op)


_SHARE = "input's exponent"
register(OpSpec("Reshape", MODULE, calibrate=share, calibrate_rule=_SHARE, stream=rule_reshape,
                stream_first=True, stream_rule="time axis kept unmerged; shape fixed per chunk",
                lower=lower_plain, espdl=("Reshape",)))
register(OpSpec("Flatten", MODULE, calibrate=share, calibrate_rule=_SHARE, stream=rule_flatten,
                stream_rule="time with size-1 neighbours only", lower=lower_plain,
                espdl=("Flatten",)))
register(OpSpec("Squeeze", MODULE, calibrate=share, calibrate_rule=_SHARE, stream=rule_squeeze,
                stream_rule="time axis moves; squeezing it: refused", lower=lower_plain,
                espdl=("Squeeze",)))
register(OpSpec("Unsqueeze", MODULE, calibrate=share, calibrate_rule=_SHARE,
                stream=rule_unsqueeze, stream_rule="time axis moves", lower=lower_plain,
                espdl=("Unsqueeze",)))
register(OpSpec("Transpose", MODULE, calibrate=share, calibrate_rule=_SHARE,
                stream=rule_transpose, stream_rule="time axis moves", lower=lower_transpose,
                espdl=("Transpose",)))
register(OpSpec("Gather", MODULE, calibrate=calibrate_gather,
                calibrate_rule="input's exponent; constant indices only", stream=rule_gather,
                stream_rule="off time; on time the last frame only", lower=lower_plain,
                espdl=("Gather",)))
register(OpSpec("Identity", MODULE, calibrate=share, calibrate_rule=_SHARE, stream=rule_unary,
                stream_rule="pointwise", zero_keeping=True, keep_sign=True,
                lower=lower_identity, espdl=("Identity",)))
register(OpSpec("Tile", MODULE, stream=rule_tile, stream_rule="not along time"))
register(OpSpec("Shape", MODULE, stream=rule_shape, stream_rule="only into a Reshape's shape"))
register(OpSpec("Size", MODULE, stream=rule_shape, stream_rule="only into a Reshape's shape"))
for _op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Gather"):
    # all but Identity pinned by the operator suite (values ESP-DL checks on chips)
    register_sim(SimSpec(_op, MODULE, sim_movement,
                         NUMPY_ORACLE if _op == "Identity" else ESPDL_GOLDEN))
register_sim(SimSpec("Transpose", MODULE, sim_movement, ESPDL_GOLDEN))

"""ReverseSequence (ESP-DL's `ReverseSequence`, dl_module_reverse_sequence.hpp).

Calibrate: data movement, the output shares the input's exponent. Streamify: reversing frames
needs the whole sequence, so a time axis on the time or batch axis is refused; a time axis
elsewhere passes. Lower: in the ONNX order (as ESP-PPQ writes it: ESP-DL's kernel takes the
features as everything after the first two axes), inputs [x, sequence_lens (int64
initializer)], attributes `batch_axis`, `time_axis`.

Rules:
1. sequence_lens must be a constant (one per batch entry, each at most the time length; ESP-DL
   swaps frames up to it unchecked).
2. batch_axis and time_axis are 0 and 1 in some order (ONNX's definition).
3. The kernel swaps frames t and len - 1 - t for t < len / 2; lengths 0 and 1 leave the entry.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Lowerer, attr, base_name
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import PlanCtx, share
from espstream.sim import Fn, Simulator
from espstream.stream.axes import Time
from espstream.stream.rules import Ctx, generic, pass_to_outputs, unsupported

MODULE = "reverse_sequence"


def reverse_sequence(x: np.ndarray, lens: np.ndarray, batch_axis: int,
                     time_axis: int) -> np.ndarray:
    """Reverse the first lens[b] entries along time_axis of each batch entry b."""
    out = x.copy()
    for b, n in enumerate(np.asarray(lens).reshape(-1)):
        n = int(n)
        if n <= 1:
            continue
        sel = [slice(None)] * x.ndim
        sel[batch_axis] = b
        sel[time_axis] = slice(0, n)
        src = x[tuple(sel)]
        # time_axis in the selected view: batch_axis removed before it
        t = time_axis - (batch_axis < time_axis)
        out[tuple(sel)] = np.flip(src, axis=t)
    return out


def _axes(where: str, attrs_get, rank: int) -> tuple[int, int]:
    b, t = int(attrs_get("batch_axis", 1)), int(attrs_get("time_axis", 0))
    if {b, t} != {0, 1} or rank < 2:
        raise UserError(f"{where}: batch_axis {b} and time_axis {t} must be 0 and 1 of a tensor "
                        "of rank >= 2")
    return b, t


def calibrate_reverse(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    if len(n.input) < 2 or n.input[1] not in pc.inits:
        raise UserError(f"node {n.name!r} (ReverseSequence): its sequence_lens must be a "
                        "constant; ESP-DL reads them from the model")
    share(pc, n, float_outs)


def rule_reverse(ctx: Ctx, node: gs.Node) -> None:
    """1. Time on the time or batch axis: refused (it needs the whole sequence / one length per
    frame). 2. Time on a feature axis: passes."""
    xt = ctx.get(node.inputs[0])
    if not isinstance(xt, Time):
        return generic(ctx, node)
    b, t = int(node.attrs.get("batch_axis", 1)), int(node.attrs.get("time_axis", 0))
    if xt.axis in (b, t):
        raise unsupported(node, "reverses frames along time (it needs the whole sequence)")
    return pass_to_outputs(ctx, node, xt)


def lower_reverse(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.layout_as(lw.act(n.input[0], n), False)
    where = f"ReverseSequence '{n.name}'"
    b, t = _axes(where, lambda k, d: attr(n, k, d), x.rank)
    lens = lw.int_const(n, 1, "sequence_lens")
    if lens is None:
        raise UserError(f"{where} has no sequence_lens")
    lens = np.asarray(lens, np.int64).reshape(-1)
    if len(lens) != x.shape[b] or np.any(lens < 0) or np.any(lens > x.shape[t]):
        raise UserError(f"{where}: sequence_lens {lens.tolist()} must give one length in "
                        f"[0, {x.shape[t]}] per batch entry ({x.shape[b]})")
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), False, x)
    lw.need_q(n, out)
    lname = lw.initializer(base_name(n.input[1]), lens, [0])
    lw.emit("ReverseSequence", n.name, [x.name, lname], [name],
            {"batch_axis": b, "quant_type": lw.qtype(x.dtype), "time_axis": t})
    lw.finish_output(out)


def sim_reverse(sim: Simulator, node: Node) -> Fn:
    sim.same_exponent(node)
    lens = sim.init(node, 1, "sequence_lens").astype(np.int64).reshape(-1)

    def fn(args: list) -> list:
        x = args[0]
        b, t = _axes(f"node '{node.name}' (ReverseSequence)", node.attrs.get, x.ndim)
        if len(lens) < x.shape[b] or np.any(lens[: x.shape[b]] > x.shape[t]):
            raise UserError(f"node '{node.name}' (ReverseSequence): sequence_lens "
                            f"{lens.tolist()} do not fit a tensor of shape {list(x.shape)}")
        return [reverse_sequence(x, lens[: x.shape[b]], b, t)]

    return fn


register(OpSpec("ReverseSequence", MODULE, calibrate=calibrate_reverse,
                calibrate_rule="input's exponent", stream=rule_reverse,
                stream_rule="refused on its time / batch axis", lower=lower_reverse,
                espdl=("ReverseSequence",)))
register_sim(SimSpec("ReverseSequence", MODULE, sim_reverse, ESPDL_GOLDEN))

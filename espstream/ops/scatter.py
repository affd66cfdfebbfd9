"""ScatterND with constant indices (ESP-DL's `ScatterND`, dl_module_scatter_nd.hpp).

Calibrate: like Concat (plan rule 5): the output gets its own exponent and data and updates are
requantized to it, since ESP-DL combines their integers as they are. Streamify: a time axis on
data or updates is refused (the indices name fixed positions of a whole sequence). Lower (ONNX
order, as ESP-PPQ writes it): inputs [data, indices (int64 initializer), updates], attribute
`reduction` when not 'none'.

Rules (ESP-DL's kernel: the output is a copy of data, then each slice of updates in index
order replaces, adds to (saturating), or takes the max / min with the slice it addresses):
1. The indices must be a constant (ESP-DL reads them as an int64 tensor of the model);
   negative indices are written as index + dim (ESP-DL adds them to the address unchecked);
   an index out of range is refused.
2. reduction 'mul' is refused: ESP-DL multiplies the two integers without rescaling them, which
   is a product only at exponent 0.
3. Slices are applied in order, so repeated indices with 'none' keep the last update, as
   onnxruntime does.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Act, Lowerer, attr, base_name
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import PlanCtx, requant
from espstream.sim import Fn, Simulator
from espstream.stream.axes import Summary, Time
from espstream.stream.rules import Ctx, generic, unsupported

MODULE = "scatter"
REDUCTIONS = ("none", "add", "max", "min")


def _reduction(v) -> str:
    v = v.decode() if isinstance(v, bytes) else (v or "none")
    return str(v)


def scatter_nd(data: np.ndarray, idx: np.ndarray, upd: np.ndarray, reduction: str) -> np.ndarray:
    """ESP-DL's ScatterND on integers (int8 / int16 saturating add) or floats (the oracle)."""
    out = data.copy()
    k = idx.shape[-1]
    slices = idx.reshape(-1, k)
    u = upd.reshape(len(slices), *data.shape[k:])
    if out.dtype.kind == "i":
        info = np.iinfo(out.dtype)
    for s, v in zip(slices, u, strict=True):
        at = tuple(int(i) for i in s)
        if reduction == "none":
            out[at] = v
        elif reduction == "add":
            r = out[at].astype(np.int64) + v if out.dtype.kind == "i" else out[at] + v
            out[at] = np.clip(r, info.min, info.max) if out.dtype.kind == "i" else r
        elif reduction == "mul":
            r = out[at].astype(np.int64) * v if out.dtype.kind == "i" else out[at] * v
            out[at] = np.clip(r, info.min, info.max) if out.dtype.kind == "i" else r
        elif reduction == "max":
            out[at] = np.maximum(out[at], v)
        elif reduction == "min":
            out[at] = np.minimum(out[at], v)
        else:
            raise UserError(f"ScatterND: reduction '{reduction}' is not one of ESP-DL's")
    return out


def _check_indices(where: str, idx: np.ndarray, shape) -> np.ndarray:
    """Rule 1: indices within the data, negatives written as index + dim."""
    k = idx.shape[-1]
    if k > len(shape):
        raise UserError(f"{where}: indices address {k} axes of a rank-{len(shape)} tensor")
    dims = np.asarray(shape[:k], np.int64)
    fixed = np.where(idx < 0, idx + dims, idx)
    if np.any(fixed < 0) or np.any(fixed >= dims):
        raise UserError(f"{where}: an index is out of range for data of shape {list(shape)}")
    return fixed.astype(np.int64)


def calibrate_scatter(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    if len(n.input) < 3 or n.input[1] not in pc.inits:
        raise UserError(f"node {n.name!r} (ScatterND): its indices must be a constant; ESP-DL's "
                        "ScatterND takes constant indices")
    requant(pc, n, float_outs)


def rule_scatter(ctx: Ctx, node: gs.Node) -> None:
    """1. No time axis on any input: generic. 2. Otherwise refused."""
    if any(isinstance(ctx.get(t), (Time, Summary)) for t in node.inputs):
        raise unsupported(node, "scatters into fixed positions of a sequence")
    return generic(ctx, node)


def lower_scatter(lw: Lowerer, n: onnx.NodeProto) -> None:
    red = _reduction(attr(n, "reduction", "none"))
    if red not in REDUCTIONS:
        raise UserError(f"ScatterND '{n.name}': reduction '{red}'; ESP-DL's integer ScatterND "
                        "rescales nothing, so only none / add / max / min are exact")
    idx = lw.int_const(n, 1, "indices")
    if idx is None:
        raise UserError(f"ScatterND '{n.name}' has no indices")
    ops, _ = lw.operands(n, [n.input[0], n.input[2]])
    shape = lw.shape(n.output[0])
    idx = _check_indices(f"ScatterND '{n.name}'", np.asarray(idx, np.int64), shape)
    name, out = lw.define_output(n.output[0], n, shape, False)
    lw.need_q(n, out)
    ins = []
    for nm, o in zip((n.input[0], n.input[2]), ops, strict=True):
        if isinstance(o, Act):
            ins.append(lw.requantize(lw.layout_as(o, False), out.exp).name)
        else:
            ins.append(lw.const_input(n, nm, o, len(lw.shape(nm)), False, out.exp))
    iname = lw.initializer(base_name(n.input[1]), idx, [0])
    attrs = {"quant_type": lw.qtype(out.dtype)}
    if red != "none":
        attrs["reduction"] = red
    lw.emit("ScatterND", n.name, [ins[0], iname, ins[1]], [name], attrs)
    lw.finish_output(out)


def sim_scatter(sim: Simulator, node: Node) -> Fn:
    sim.same_exponent(node, all_inputs=True)
    idx = sim.init(node, 1, "indices").astype(np.int64)
    red = _reduction(node.attrs.get("reduction", "none"))
    if red not in (*REDUCTIONS, "mul"):
        raise UserError(f"node '{node.name}' (ScatterND): reduction '{red}' is not one of "
                        "ESP-DL's (none, add, mul, max, min)")

    def fn(args: list) -> list:
        data, upd = args[0], args[2]
        if np.any(idx < 0) or np.any(idx >= np.asarray(data.shape[:idx.shape[-1]])):
            raise UserError(f"node '{node.name}' (ScatterND): an index is negative or out of "
                            "range (ESP-DL adds it to the address unchecked)")
        want = idx.shape[:-1] + data.shape[idx.shape[-1]:]
        if upd.size != int(np.prod(want)):
            raise UserError(f"node '{node.name}' (ScatterND): updates of shape "
                            f"{list(upd.shape)}, the indices need {list(want)}")
        return [scatter_nd(data, idx, upd, red)]

    return fn


register(OpSpec("ScatterND", MODULE, calibrate=calibrate_scatter,
                calibrate_rule="own exponent, data and updates requantized to it",
                stream=rule_scatter, stream_rule="refused on time", lower=lower_scatter,
                espdl=("ScatterND",)))
register_sim(SimSpec("ScatterND", MODULE, sim_scatter, ESPDL_GOLDEN))

"""QuantizeLinear / DequantizeLinear (the QDQ contract) and ESP-DL's RequantizeLinear.

Calibrate writes them; `lower` folds them into exponents (its rule 2, in the driver: they are
the contract between stages, not operators of the model). Streamify: pointwise, keeping zero
when the zero point is 0; per-axis scales must not run along time. Simulate (sim's rule 8):
RequantizeLinear = saturate(round_shift(q, e_out - e_in)); Q / DQ in float32.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    ESPPPQ_FIXTURE,
    NUMPY_ORACLE,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.sim import (
    Fn,
    Simulator,
    round_float,
    saturate,
)
from espstream.stream.rules import (
    Ctx,
    norm_axis,
    rank_of,
    rule_unary,
    unary_time,
    unsupported,
)

MODULE = "quantize"


def stream_qdq(ctx: Ctx, node: gs.Node) -> None:
    """Pointwise; per-frame scales along time are refused; zero stays zero with a 0 zero point."""
    xt = unary_time(ctx, node)
    if xt is None:
        return rule_unary(ctx, node)
    sc = ctx.shapes.get(node.inputs[1].name, [])
    if len(sc) == 1 and sc[0] > 1:
        if norm_axis(int(node.attrs.get("axis", 1)), rank_of(ctx, node.inputs[0])) == xt.axis:
            raise unsupported(node, "quantizes per frame along time")
    zp = ctx.consts.value(node.inputs[2]) if len(node.inputs) > 2 else None
    return rule_unary(ctx, node, zero=zp is None or not np.any(zp))


def sim_requantize(sim: Simulator, node: Node) -> Fn:
    shift = sim.exp(node.outputs[0]) - sim.exp(node.inputs[0])
    if len(node.inputs) > 2 and node.inputs[2] in sim.graph.initializers:
        zp = sim.graph.initializers[node.inputs[2]].data
        if np.any(zp != 0):
            raise UserError(f"node '{node.name}' (RequantizeLinear): non-zero zero point")
    k, rounding = sim.kernels, sim.rounding
    dtype = sim.dtype_of(node.outputs[0], np.int8)
    return lambda args: [k.requantize(args[0], shift, rounding=rounding, dtype=dtype)]


def sim_quantize(sim: Simulator, node: Node) -> Fn:
    e_out = sim.exp(node.outputs[0])
    dtype = sim.dtype_of(node.outputs[0], np.int8)
    rounding = sim.rounding

    def fn(args: list) -> list:
        y = np.asarray(args[0], np.float32) / np.float32(2.0**e_out)
        return [saturate(round_float(y, rounding), dtype)]

    return fn


def sim_dequantize(sim: Simulator, node: Node) -> Fn:
    e_in = sim.exp(node.inputs[0])
    return lambda args: [(args[0].astype(np.float32) * np.float32(2.0**e_in))]


for _op in ("QuantizeLinear", "DequantizeLinear"):
    register(OpSpec(_op, MODULE, stream=stream_qdq, stream_rule="pointwise", keep_sign=True))
register_sim(SimSpec("RequantizeLinear", MODULE, sim_requantize, ESPPPQ_FIXTURE))
register_sim(SimSpec("QuantizeLinear", MODULE, sim_quantize, NUMPY_ORACLE))
# pinned by the ops suite's float32 Pow files (Exp -> DequantizeLinear -> Pow)
register_sim(SimSpec("DequantizeLinear", MODULE, sim_dequantize, ESPDL_GOLDEN))

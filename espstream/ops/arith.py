"""Elementwise arithmetic: Add, Sub, Mul (Div, Pow, Mod have modules of their own), and the
broadcast operators streamify carries through in float.

Calibrate: Add / Sub requantize their inputs to the output's exponent (plan rule 5); Mul's
output gets its own exponent and a float constant operand its own per-tensor one (rule 6).
Streamify (`rule_broadcast`): time inputs must line up; delays are aligned by caches.
Lower (lower's rule 7): Add / Sub inputs at the output's exponent (RequantizeLinear where
not), constants broadcast against a channels-last activation permuted with it.
Simulate (sim's rules 4-5): a saturating integer add (refusing operands at another exponent);
Mul = saturate(round_shift(q0 * q1, e_out - e0 - e1)).
"""

from __future__ import annotations

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Act, Lowerer
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    ESPPPQ_FIXTURE,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant.plan import (
    own_with_constants,
    requant,
)
from espstream.sim import (
    Fn,
    Simulator,
    check_broadcast,
)
from espstream.stream.rules import (
    rule_broadcast,
)

MODULE = "arith"


def lower_elementwise(lw: Lowerer, n: onnx.NodeProto, attrs: dict | None = None) -> None:
    ops, cl = lw.operands(n, list(n.input))
    acts = [o for o in ops if isinstance(o, Act)]
    if not acts:
        raise UserError(f"{n.op_type} '{n.name}' has only constant inputs; run espstream "
                        "optimize first")
    shape = lw.shape(n.output[0])
    rank = len(shape)
    name, out = lw.define_output(n.output[0], n, shape, cl)
    lw.need_q(n, out)
    inputs = []
    same_exp = n.op_type in ("Add", "Sub")
    for nm, o in zip(n.input, ops, strict=True):
        if isinstance(o, Act):
            a = lw.layout_as(o, cl) if o.rank >= 3 else o
            if same_exp:
                a = lw.requantize(a, out.exp)
            inputs.append(a.name)
        else:
            inputs.append(lw.const_input(n, nm, o, rank, cl,
                                            out.exp if same_exp else None))
    lw.emit(n.op_type, n.name, inputs, [name], {"quant_type": lw.qtype(out.dtype), **(attrs or {})})
    lw.finish_output(out)


def sim_add(sim: Simulator, node: Node) -> Fn:
    e_out = sim.exp(node.outputs[0])
    for name in node.inputs[:2]:
        e = sim.exp(name) if name not in sim.graph.initializers else sim.init_exp(name)
        if e != e_out:
            raise UserError(
                f"node '{node.name}' ({node.op_type}): input '{name}' has exponent {e} but "
                f"the output has {e_out}; ESP-DL adds integers at one exponent (the "
                "exporter must insert a RequantizeLinear)"
            )
    sub = node.op_type == "Sub"
    k = sim.kernels

    op = k.sub if sub else k.add

    def fn(args: list) -> list:
        a, b = args[0], args[1]
        if a.shape != b.shape:
            check_broadcast(a.shape, b.shape)
        return [op(a, b)]

    return fn


def sim_mul(sim: Simulator, node: Node) -> Fn:
    exps = [
        sim.init_exp(n) if n in sim.graph.initializers else sim.exp(n)
        for n in node.inputs[:2]
    ]
    shift = sim.exp(node.outputs[0]) - exps[0] - exps[1]
    dtype = sim.dtype_of(node.outputs[0], np.int8)
    k, rounding = sim.kernels, sim.rounding

    def fn(args: list) -> list:
        check_broadcast(args[0].shape, args[1].shape)
        return [k.mul(args[0], args[1], shift, rounding=rounding, dtype=dtype)]

    return fn


_BROADCAST = "broadcast: time axes aligned, delays matched by caches"
register(OpSpec("Add", MODULE, calibrate=requant, calibrate_rule="inputs at the output's exponent",
                stream=rule_broadcast, stream_rule=_BROADCAST, lower=lower_elementwise,
                espdl=("Add",)))
register(OpSpec("Sub", MODULE, calibrate=requant, calibrate_rule="inputs at the output's exponent",
                stream=rule_broadcast, stream_rule=_BROADCAST, lower=lower_elementwise,
                espdl=("Sub",)))
register(OpSpec("Mul", MODULE, calibrate=own_with_constants,
                calibrate_rule="own exponent; constants their own",
                stream=rule_broadcast, stream_rule=_BROADCAST, lower=lower_elementwise,
                espdl=("Mul",)))
for _op in ("Max", "Min", "Sum", "Mean", "BitShift"):
    register(OpSpec(_op, MODULE, stream=rule_broadcast, stream_rule=_BROADCAST))
register_sim(SimSpec("Add", MODULE, sim_add, ESPPPQ_FIXTURE))
register_sim(SimSpec("Sub", MODULE, sim_add, ESPDL_GOLDEN))
register_sim(SimSpec("Mul", MODULE, sim_mul, ESPDL_GOLDEN))

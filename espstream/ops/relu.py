"""Relu and PRelu (PRelu is lowered but not simulated yet).

Calibrate: an exponent of its own (plan rule 6; PRelu's float slope is stored as an integer at
its own exponent); a Relu right after a linear layer is fused into it instead (`_linear`).
Streamify: Relu is pointwise with f(0) = 0 and a non-negative output; PRelu broadcasts its
slope. Lower: `Relu` / `PRelu` nodes, the slope permuted with a channels-last input. Simulate:
max(q, 0), requantized when the output's exponent differs.
"""

from __future__ import annotations

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Lowerer
from espstream.ops.registry import (
    NUMPY_ORACLE,
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
)
from espstream.stream.rules import (
    rule_broadcast,
    rule_unary,
)

MODULE = "relu"


def lower_relu(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.act(n.input[0], n)
    name, out = lw.define_output(n.output[0], n, x.shape, x.cl)
    lw.need_q(n, out)
    lw.emit("Relu", n.name, [x.name], [name], {"quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def lower_prelu(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.act(n.input[0], n)
    qc = lw.qconst(n.input[1])
    if qc is None:
        raise UserError(f"PRelu '{n.name}': slope is not a quantized constant")
    name, out = lw.define_output(n.output[0], n, x.shape, x.cl)
    lw.need_q(n, out)
    slope = lw.const_input(n, n.input[1], qc, x.rank, x.cl)
    lw.emit("PRelu", n.name, [x.name, slope], [name], {"quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def sim_relu(sim: Simulator, node: Node) -> Fn:
    shift = sim.exp(node.outputs[0]) - sim.exp(node.inputs[0])
    k, rounding = sim.kernels, sim.rounding

    def fn(args: list) -> list:
        y = np.maximum(args[0], 0).astype(args[0].dtype)
        return [y if shift == 0 else k.requantize(y, shift, rounding=rounding)]

    return fn


register(OpSpec("Relu", MODULE, calibrate=own, calibrate_rule="own exponent (fused after Conv)",
                stream=rule_unary, stream_rule="pointwise", zero_keeping=True, nonneg=True,
                lower=lower_relu, espdl=("Relu",)))
register(OpSpec("PRelu", MODULE, calibrate=own_with_constants,
                calibrate_rule="own exponent; slope its own", stream=rule_broadcast,
                stream_rule="broadcast", lower=lower_prelu, espdl=("PRelu",)))
register_sim(SimSpec("Relu", MODULE, sim_relu, NUMPY_ORACLE))

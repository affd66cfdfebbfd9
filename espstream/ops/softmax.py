"""Softmax and the normalizations over an axis (LogSoftmax, Hardmax, LayerNormalization,
LpNormalization streamed in float only).

Calibrate: Softmax / LogSoftmax outputs stay float (plan rule 7): ESP-DL's Softmax outputs
float32, so only data movement or a graph output may follow. Streamify (`rule_softmax`):
pointwise in time unless it normalises over the time axis (refused). Lower: `Softmax` with its
axis in the runtime layout, a float32 output. Simulate: softmax of the real values in float32
(not bit-exact to the chip's float library).
"""

from __future__ import annotations

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node, ValueInfo
from espstream.lower import Act, Lowerer, attr
from espstream.ops.registry import (
    NUMPY_ORACLE,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant.plan import (
    float_output,
)
from espstream.sim import (
    Fn,
    Simulator,
)
from espstream.stream.rules import (
    rule_softmax,
)

MODULE = "softmax"


def lower_softmax(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.act(n.input[0], n)
    axis = int(attr(n, "axis", -1))
    shape = lw.shape(n.output[0])
    name, out = lw.define_output(n.output[0], n, shape, x.cl)
    lw.emit("Softmax", n.name, [x.name], [name],
              {"axis": x.runtime_axis(axis), "quant_type": lw.qtype(x.dtype)})
    if out is not None:  # quantized after all: ESP-DL's Softmax outputs float
        raise UserError(f"Softmax '{n.name}': its output is quantized, but ESP-DL's Softmax "
                        "outputs float32; leave it unquantized")
    f = Act(name, 0, shape, x.cl, np.dtype(np.float32))
    lw.out.value_infos[name] = ValueInfo(name, np.dtype(np.float32), f.runtime_shape(), [0])
    lw.float_outs[name] = name
    if any(c.op_type != "QuantizeLinear" for c in lw.consumers.get(n.output[0], [])):
        raise UserError(f"Softmax '{n.name}': its float output feeds other operators; ESP-DL "
                        "can only return it as a graph output")


def sim_softmax(sim: Simulator, node: Node) -> Fn:
    """Softmax on the real values in float32; ESP-DL's Softmax outputs float, which is not
    bit-exact to the chip's float library (the integer parts of a model are)."""
    e_in = sim.exp(node.inputs[0])
    axis = int(node.attrs.get("axis", -1))

    def fn(args: list) -> list:
        x = args[0].astype(np.float32) * np.float32(2.0**e_in)
        z = np.exp(x - x.max(axis=axis, keepdims=True))
        return [(z / z.sum(axis=axis, keepdims=True)).astype(np.float32)]

    return fn


_NORM = "pointwise; normalising over time: refused"
register(OpSpec("Softmax", MODULE, calibrate=float_output, calibrate_rule="float output",
                stream=rule_softmax, stream_rule=_NORM, lower=lower_softmax, espdl=("Softmax",)))
register(OpSpec("LogSoftmax", MODULE, calibrate=float_output, calibrate_rule="float output",
                stream=rule_softmax, stream_rule=_NORM))
for _op in ("Hardmax", "LayerNormalization", "LpNormalization"):
    register(OpSpec(_op, MODULE, stream=rule_softmax, stream_rule=_NORM))
register_sim(SimSpec("Softmax", MODULE, sim_softmax, NUMPY_ORACLE))

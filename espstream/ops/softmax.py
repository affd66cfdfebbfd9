"""Softmax and LogSoftmax (lowered and simulated), Hardmax (streamed in float only).

Calibrate: Softmax / LogSoftmax outputs stay float (plan rule 7): ESP-DL's Softmax and
LogSoftmax output float32, so only data movement or a graph output may follow. Streamify
(`rule_softmax`): pointwise in time unless it normalises over the time axis (refused). Lower:
`Softmax` / `LogSoftmax` with its axis in the runtime layout, a float32 output. Simulate:
1. Softmax: softmax of the real values in float32 (not bit-exact to the chip's float library).
2. LogSoftmax (dl_module_log_softmax.hpp): int8: a 256-entry float table of expf(q * 2^e_in),
   sum = float32 sequential sum of table[q + 128] along the axis (no max subtracted), output
   q * 2^e_in - logf(sum); int16: x = q * 2^e_in in float32, output x - max - logf(float32
   sequential sum of expf(x - max)). Float outputs: logf / expf of NumPy, not the chip's libm.
"""

from __future__ import annotations

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node, ValueInfo
from espstream.lower import Act, Lowerer, attr
from espstream.ops.registry import (
    ESPDL_GOLDEN,
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
    lw.emit(n.op_type, n.name, [x.name], [name],
              {"axis": x.runtime_axis(axis), "quant_type": lw.qtype(x.dtype)})
    if out is not None:  # quantized after all: ESP-DL's Softmax outputs float
        raise UserError(f"{n.op_type} '{n.name}': its output is quantized, but ESP-DL's "
                        f"{n.op_type} outputs float32; leave it unquantized")
    f = Act(name, 0, shape, x.cl, np.dtype(np.float32))
    lw.out.value_infos[name] = ValueInfo(name, np.dtype(np.float32), f.runtime_shape(), [0])
    lw.float_outs[name] = name
    if any(c.op_type != "QuantizeLinear" for c in lw.consumers.get(n.output[0], [])):
        raise UserError(f"{n.op_type} '{n.name}': its float output feeds other operators; "
                        "ESP-DL can only return it as a graph output")


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


def log_softmax_kernel(q: np.ndarray, axis: int, e_in: int) -> np.ndarray:
    """ESP-DL's LogSoftmax of int8 / int16 `q` along `axis` (module rule 2), float32 out."""
    if q.ndim == 0:
        return np.zeros((), np.float32)
    x = np.moveaxis(q, axis % q.ndim, -1)
    lead = x.shape
    x = x.reshape(-1, lead[-1])
    s = np.float32(2.0**e_in)
    acc = np.zeros(x.shape[0], np.float32)
    if q.dtype == np.int8:
        table = np.exp(s * np.arange(-128, 128, dtype=np.float32)).astype(np.float32)
        terms = table[x.astype(np.int64) + 128]
        for j in range(x.shape[1]):
            acc = (acc + terms[:, j]).astype(np.float32)
        y = ((x.astype(np.float32) * s).astype(np.float32)
             - np.log(acc).astype(np.float32)[:, None])
    else:
        v = (x.astype(np.float32) * s).astype(np.float32)
        m = v.max(axis=1)
        terms = np.exp((v - m[:, None]).astype(np.float32)).astype(np.float32)
        for j in range(x.shape[1]):
            acc = (acc + terms[:, j]).astype(np.float32)
        y = ((v - m[:, None]).astype(np.float32) - np.log(acc).astype(np.float32)[:, None])
    return np.moveaxis(y.astype(np.float32).reshape(lead), -1, axis % q.ndim)


def sim_log_softmax(sim: Simulator, node: Node) -> Fn:
    e_in = sim.exp(node.inputs[0])
    axis = int(node.attrs.get("axis", -1))

    def fn(args: list) -> list:
        if args[0].dtype not in (np.int8, np.int16):
            raise ValueError(f"LogSoftmax on {args[0].dtype}: the quantized kernel takes int8 "
                             "/ int16")
        return [log_softmax_kernel(args[0], axis, e_in)]

    return fn


_NORM = "pointwise; normalising over time: refused"
register(OpSpec("Softmax", MODULE, calibrate=float_output, calibrate_rule="float output",
                stream=rule_softmax, stream_rule=_NORM, lower=lower_softmax, espdl=("Softmax",)))
register(OpSpec("LogSoftmax", MODULE, calibrate=float_output, calibrate_rule="float output",
                stream=rule_softmax, stream_rule=_NORM, lower=lower_softmax,
                espdl=("LogSoftmax",)))
register(OpSpec("Hardmax", MODULE, stream=rule_softmax, stream_rule=_NORM))
register_sim(SimSpec("Softmax", MODULE, sim_softmax, ESPDL_GOLDEN))
register_sim(SimSpec("LogSoftmax", MODULE, sim_log_softmax, ESPDL_GOLDEN))

"""Relu and PRelu.

Calibrate: an exponent of its own (plan rule 6; PRelu's float slope is stored as an integer at
its own exponent); a Relu right after a linear layer is fused into it instead (`_linear`).
Streamify: Relu is pointwise with f(0) = 0 and a non-negative output; PRelu broadcasts its
slope. Lower: `Relu` / `PRelu` nodes (`lower_prelu`'s rules). Simulate: Relu max(q, 0),
requantized when the output's exponent differs; PRelu ESP-DL's integer kernel (`prelu`), or
the file's table in 8 bits.
"""

from __future__ import annotations

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Lowerer, base_name
from espstream.ops.activation import build_lut
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


def _slope_per_channel(n: onnx.NodeProto, slope: np.ndarray, rank: int, channels: int
                       ) -> np.ndarray:
    """The slope as ESP-DL's [C, 1, 1]: one value, or one per channel (ONNX axis 1)."""
    s = slope.reshape((1,) * max(0, rank - slope.ndim) + slope.shape)
    if rank < 2 or any(d != 1 for k, d in enumerate(s.shape) if k != 1) \
            or s.shape[1] not in (1, channels):
        raise UserError(f"PRelu '{n.name}': slope of shape {list(slope.shape)}; ESP-DL takes "
                        "one slope, or one per channel")
    return np.broadcast_to(s.reshape(-1), (channels,)).reshape(channels, 1, 1).copy()


def lower_prelu(lw: Lowerer, n: onnx.NodeProto) -> None:
    """Rules: 1. the slope is written as [C, 1, 1] at its own exponent (ESP-DL's deserializer
    asserts that shape); 2. in 8 bits a one-value slope also gets a 256-entry table, as ESP-PPQ
    writes it (ESP-DL then runs its LUT module, exact to the QDQ model's float arithmetic);
    3. without a table the node writes its output at the input's exponent, and a
    RequantizeLinear follows when the output's Q wants another: ESP-DL's C kernel copies
    positive values unscaled (slopes above 1 can then saturate negative values there)."""
    x = lw.act(n.input[0], n)
    qc = lw.qconst(n.input[1])
    if qc is None:
        raise UserError(f"PRelu '{n.name}': slope is not a quantized constant")
    if len(qc.exps) != 1:
        raise UserError(f"PRelu '{n.name}': slope quantized per channel; ESP-DL takes one "
                        "exponent")
    shape = lw.shape(n.input[0])
    channels = shape[1] if len(shape) > 1 else None
    if not isinstance(channels, int):
        raise UserError(f"PRelu '{n.name}': its input's channel count is not fixed")
    alpha = _slope_per_channel(n, qc.data, x.rank, channels)
    table = x.dtype == np.int8 and bool(np.all(alpha == alpha.reshape(-1)[0]))
    name, out = lw.define_output(n.output[0], n, x.shape, x.cl, None if table else x)
    lw.need_q(n, out)
    slope = lw.initializer(base_name(n.input[1]), alpha.astype(x.dtype), qc.exps)
    attrs: dict = {"quant_type": lw.qtype(x.dtype)}
    if table:
        k = lw.lut_count.get("PRelu", 0)
        lw.lut_count["PRelu"] = k + 1
        real = float(alpha.reshape(-1)[0]) * 2.0 ** qc.exps[0]
        table = build_lut("LeakyRelu", {"alpha": real}, x.exp, out.exp, lw.rounding)
        attrs["lut"] = lw.initializer(lw.fresh(f"PRelu_lut_{k}"), table, [out.exp], None)
    lw.emit("PRelu", n.name, [x.name, slope], [name], attrs)
    lw.finish_output(out)


def prelu(x: np.ndarray, alpha: np.ndarray, shift: int, out_shift: int, path: str,
          ) -> np.ndarray:
    """ESP-DL's PRelu (dl_base_prelu.cpp), alpha one per channel on the last axis.

    Negative q: q * alpha shifted right by `shift` = e_out - e_in - e_alpha (left when
    negative), saturated. path "floor": the plain C kernel (an arithmetic shift; positive q
    copied unscaled); "half_up" / "half_even": the PIE kernels (the shift rounded, positive q
    requantized by `out_shift` = e_out - e_in)."""
    info = np.iinfo(x.dtype)
    p = x.astype(np.int64) * alpha.astype(np.int64)
    pos = x.astype(np.int64)
    if path == "floor":
        neg = p >> shift if shift >= 0 else p << -shift
    else:
        neg = _round_shift(p, shift, path)
        pos = _round_shift(pos, out_shift, path)
    return np.clip(np.where(x < 0, neg, pos), info.min, info.max).astype(x.dtype)


def _round_shift(v: np.ndarray, shift: int, rounding: str) -> np.ndarray:
    if shift <= 0:
        return v << -shift
    q, r = v >> shift, v & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = r >= half if rounding == "half_up" else (r > half) | ((r == half) & ((q & 1) == 1))
    return q + up


def sim_prelu(sim: Simulator, node: Node) -> Fn:
    """PRelu without a table (16 bits, or 8 with a per-channel slope)."""
    e_in, e_out = sim.exp(node.inputs[0]), sim.exp(node.outputs[0])
    alpha = sim.init(node, 1, "slope").reshape(-1)
    e_a = sim.init_exp(node.inputs[1])
    target = sim.arithmetic  # esp32s31 is PIE v2 like esp32p4 (espstream.targets)

    def fn(args: list) -> list:
        x = args[0]
        c = x.shape[-1] if x.ndim else 1
        if alpha.size not in (1, c):
            raise UserError(f"PRelu '{node.name}': {alpha.size} slopes for {c} channels")
        # the PIE kernels: esp32s3 both widths, esp32p4 int8 only (its int16 takes the C path)
        pie = target == "esp32s3" or (target == "esp32p4" and x.dtype == np.int8)
        path = sim.rounding if pie else "floor"
        return [prelu(x, np.broadcast_to(alpha, (c,)), e_out - e_in - e_a, e_out - e_in, path)]

    return fn


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
register_sim(SimSpec("Relu", MODULE, sim_relu, ESPDL_GOLDEN, lut="s8"))
# int16 pinned by the operator suite (ESP-PPQ files ESP-DL checks on chips, +-1)
register_sim(SimSpec("PRelu", MODULE, sim_prelu, ESPDL_GOLDEN, lut="s8"))

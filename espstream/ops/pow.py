"""Pow: ESP-DL 3.3's `dl_module_pow.hpp` / `dl_base_pow.cpp`.

Calibrate: the output gets its own exponent; the exponent operand must be a constant and is
stored at its own per-tensor exponent. A tensor exponent is refused: ESP-DL's kernel would take
one, but a quantized exponent turns its rounding error into a relative error of the result
that grows with log|base| (ESP-PPQ itself keeps Pow in float32).
Streamify: broadcast (`rule_broadcast`).
Lower: `Pow(x, c)` with quant_type S8 / S16 and `c` an integer at its own exponent.
Simulate (the `lut` attribute is not read: Pow's deserializer ignores it at both widths):
1. int8 / int16: y = powf(f32(q0 * 2**e0), f32(q1 * 2**e1)) * 2**-e_out in float32, rounded
   by the target's rule (esp32p4 half to even, esp32s3 / c half up; no PIE kernel), saturated.
   The same per element in the `n_n`, `n_1` and `1_n` inner functions. A NaN result (negative
   base, fractional power) is stored as 0 (not modelled: the chip converts NaN to int itself).
2. float32 (quant_type F32, what ESP-PPQ exports): powf(x, y).
NumPy's float32 power stands for the chip's powf; both are within an ulp of the exact power,
and the ops suite's float files (tolerance 2e-5) are what pins it.
"""

from __future__ import annotations

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.ops._elemwise import compile_binary
from espstream.ops.arith import lower_elementwise
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import PlanCtx, own_with_constants
from espstream.sim import Fn, Simulator
from espstream.stream.rules import rule_broadcast

MODULE = "pow"


def calibrate_pow(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    if len(n.input) < 2 or n.input[1] not in pc.inits:
        raise UserError(f"node {n.name!r} (Pow): the exponent must be a constant; espstream "
                        "does not quantize a tensor exponent (ESP-PPQ runs such a Pow in float)")
    own_with_constants(pc, n, float_outs)


def sim_pow(sim: Simulator, node: Node) -> Fn:
    return compile_binary(sim, node, np.power)


register(OpSpec("Pow", MODULE, calibrate=calibrate_pow,
                calibrate_rule="own exponent; constant exponent its own",
                stream=rule_broadcast,
                stream_rule="broadcast: time axes aligned, delays matched by caches",
                lower=lower_elementwise, espdl=("Pow",)))
register_sim(SimSpec("Pow", MODULE, sim_pow, ESPDL_GOLDEN))

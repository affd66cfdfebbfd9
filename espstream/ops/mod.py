"""Mod: ESP-DL 3.3's `dl_module_mod.hpp` / `dl_base_mod.cpp` (C-style fmod).

Calibrate: the output gets its own exponent, a float constant operand its own per-tensor one
(ESP-PPQ quantizes Mod with independent scales). `fmod=0` (integer semantics, the result takes
the divisor's sign) is refused: ESP-DL computes fmod whatever the attribute says, and ONNX
requires fmod=1 for float inputs.
Streamify: broadcast (`rule_broadcast`).
Lower: `Mod(a, b)` with quant_type S8 / S16 and `fmod = 1`.
Simulate (the `lut` attribute is not read):
1. int8 / int16: b == 0 -> 0; else fmodf(f32(q0 * 2**e0), f32(q1 * 2**e1)) * 2**-e_out in
   float32, rounded by the target's rule (esp32p4 half to even, esp32s3 / c half up),
   saturated. fmod is exact in float, so only that rounding depends on the target.
2. float32: fmodf(x, y), 0 where y == 0.
"""

from __future__ import annotations

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Lowerer
from espstream.ops._elemwise import compile_binary
from espstream.ops.arith import lower_elementwise
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import PlanCtx, own_with_constants
from espstream.sim import Fn, Simulator
from espstream.stream.rules import rule_broadcast

MODULE = "mod"


def fmod0(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C's fmodf, 0 where the divisor is 0 (ESP-DL's guard)."""
    with np.errstate(all="ignore"):
        return np.where(b != 0, np.fmod(a, np.where(b != 0, b, 1)), 0).astype(a.dtype)


def _fmod_attr(n: onnx.NodeProto) -> int:
    return next((a.i for a in n.attribute if a.name == "fmod"), 0)


def calibrate_mod(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    if _fmod_attr(n) != 1:
        raise UserError(f"node {n.name!r} (Mod): fmod=0 on float tensors is not valid ONNX; "
                        "ESP-DL computes C's fmod (fmod=1)")
    own_with_constants(pc, n, float_outs)


def lower_mod(lw: Lowerer, n: onnx.NodeProto) -> None:
    lower_elementwise(lw, n, {"fmod": 1})


def sim_mod(sim: Simulator, node: Node) -> Fn:
    if int(node.attrs.get("fmod", 1)) != 1:
        raise UserError(f"node '{node.name}' (Mod): fmod={node.attrs['fmod']}; ESP-DL computes "
                        "C's fmod (fmod=1) only")
    return compile_binary(sim, node, fmod0)


register(OpSpec("Mod", MODULE, calibrate=calibrate_mod,
                calibrate_rule="own exponent; constants their own",
                stream=rule_broadcast,
                stream_rule="broadcast: time axes aligned, delays matched by caches",
                lower=lower_mod, espdl=("Mod",)))
register_sim(SimSpec("Mod", MODULE, sim_mod, ESPDL_GOLDEN))

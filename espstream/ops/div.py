"""Div: ESP-DL 3.3's `dl_module_div.hpp` / `dl_base_div.cpp`.

Calibrate: the output gets its own exponent, a float constant operand its own per-tensor one
(as ESP-PPQ: Div is not a "same scale" operator; plan rule 6).
Streamify: broadcast (`rule_broadcast`): time inputs line up, delays matched by caches.
Lower: `Div(a, b)` with quant_type S8 / S16, a constant operand stored as an integer at its own
exponent, broadcast against a channels-last activation permuted with it.
Simulate (float32 arithmetic, `R = 2**(e0 - e1 - e_out)`, rounding of the target, saturation):
1. Per element: q0 == 0 -> 0; else q1 == 0 -> the type's max if q0 > 0, else its min.
2. Otherwise, by ESP-DL's inner function (`_elemwise.inner_d0`): `n_n` and `1_n` give
   round(f32(f32(q0 * R) / q1)); `n_1` precomputes r = f32(R / q1) per row and gives
   round(f32(q0 * r)) (a second float rounding: may differ by one from `n_n`).
   int8 tries `1_n` first (input 0's d0 == 1), int16 tries `n_1` first.
3. int8 with a one-element input (either one) builds a 256-entry table instead, from the
   first value of input 0 if input 0's d0 is 1 (`1_n`: t[i] = round(f32(f32(q0 * R) / i)),
   t[0] = 127 if q0 * R > 0 else -128), else from input 1's first value (`n_1`: t[i] =
   round(f32(i * f32(R / q1))), t[0] = 0), and looks the other input up as t[q + 128]. The
   table is built from the first value even when that input is not a scalar (ESP-DL's own
   behaviour when the *other* input has one element and this one merely has d0 == 1).
4. A float32 node (quant_type F32): q0 / q1, `n_1` as q0 * f32(1 / q1).
The rounding of every `round` is the target's (esp32p4 half to even, esp32s3 / c half up): the
C path is what all three run (no PIE kernel for Div).
"""

from __future__ import annotations

import numpy as np

from espstream.intgraph import Node
from espstream.ops._elemwise import F32, LIMITS, broadcast_pair, inner_d0, scale, store
from espstream.ops.arith import lower_elementwise
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import own_with_constants
from espstream.sim import Fn, Simulator
from espstream.stream.rules import rule_broadcast

MODULE = "div"


def div_int(q0: np.ndarray, q1: np.ndarray, shift: int, rounding: str, dtype: np.dtype,
            mode: str) -> np.ndarray:
    """Rules 1-2 on broadcast operands; mode is 'n_n', 'n_1' or '1_n'; shift = e0 - e1 - e_out."""
    a, b = broadcast_pair(np.asarray(q0), np.asarray(q1))
    fa, fb = a.astype(F32), b.astype(F32)
    rs = scale(shift)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if mode == "n_1":
            y = fa * (rs / fb).astype(F32)
        else:
            y = (fa * rs).astype(F32) / fb
    out = store(y.astype(F32), rounding, dtype)
    lo, hi = LIMITS[np.dtype(dtype)]
    out = np.where(b == 0, np.where(a > 0, hi, lo), out)
    return np.where(a == 0, 0, out).astype(dtype)


def div_table(first: int, shift: int, rounding: str, kind: str) -> np.ndarray:
    """Rule 3: the int8 table, indexed by q + 128; kind '1_n' (first = q0) or 'n_1' (q1)."""
    i = np.arange(-128, 128).astype(F32)
    rs = scale(shift)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == "1_n":
            v = F32(F32(first) * rs)
            t = store((v / i).astype(F32), rounding, np.dtype(np.int8))
            t[128] = 127 if v > 0 else -128
        else:
            r = F32(rs / F32(first))
            t = store((i * r).astype(F32), rounding, np.dtype(np.int8))
            t[128] = 0
    return t


def sim_div(sim: Simulator, node: Node) -> Fn:
    g = sim.graph
    shapes = [list(g.initializers[n].data.shape) if n in g.initializers
              else g.value_info(n).shape for n in node.inputs[:2]]
    out_shape = g.value_info(node.outputs[0]).shape
    dtype = sim.dtype_of(node.outputs[0], np.int8)
    d0_0, d0_1, _ = inner_d0(shapes[0], shapes[1], out_shape)
    if dtype.kind == "f":
        def ffn(args: list) -> list:
            a, b = broadcast_pair(args[0].astype(F32), args[1].astype(F32))
            with np.errstate(divide="ignore", invalid="ignore"):
                y = a * (F32(1.0) / b) if d0_1 == 1 and d0_0 != 1 else a / b
            return [y.astype(F32)]
        return ffn
    exps = [sim.init_exp(n) if n in g.initializers else sim.exp(n) for n in node.inputs[:2]]
    shift = exps[0] - exps[1] - sim.exp(node.outputs[0])
    rounding = sim.rounding
    eight = dtype == np.int8
    sizes = [int(np.prod(s)) for s in shapes]
    table_kind = None
    if eight and 1 in sizes:
        table_kind = "1_n" if d0_0 == 1 else ("n_1" if d0_1 == 1 else None)
    if eight:
        mode = "1_n" if d0_0 == 1 else ("n_1" if d0_1 == 1 else "n_n")
    else:
        mode = "n_1" if d0_1 == 1 else ("1_n" if d0_0 == 1 else "n_n")

    def fn(args: list) -> list:
        a, b = np.asarray(args[0]), np.asarray(args[1])
        if table_kind == "1_n":
            t = div_table(int(a.ravel()[0]), shift, rounding, "1_n")
            _, bb = broadcast_pair(a, b)
            return [t[bb.astype(np.int64) + 128]]
        if table_kind == "n_1":
            t = div_table(int(b.ravel()[0]), shift, rounding, "n_1")
            aa, _ = broadcast_pair(a, b)
            return [t[aa.astype(np.int64) + 128]]
        return [div_int(a, b, shift, rounding, dtype, mode)]

    return fn


register(OpSpec("Div", MODULE, calibrate=own_with_constants,
                calibrate_rule="own exponent; constants their own",
                stream=rule_broadcast,
                stream_rule="broadcast: time axes aligned, delays matched by caches",
                lower=lower_elementwise, espdl=("Div",)))
register_sim(SimSpec("Div", MODULE, sim_div, ESPDL_GOLDEN))

"""How ESP-DL 3.3 walks a two-input elementwise operator (`dl_base_elemwise.cpp`).

`get_elemwise_operation_args` pads both input shapes to the output's rank with leading ones and
merges neighbouring axes where both inputs agree (equal sizes, or both 1 in one input); the
innermost merged axis is `d0`. Each row of the output is computed by one of three inner
functions, chosen once per node from the inputs' `d0`: `n_n` (both vary along the row), `n_1`
(input 1 is one value per row), `1_n` (input 0 is). Operators whose `n_1` / `1_n` arithmetic
differs from `n_n` (Div's precomputed reciprocal, its int8 tables) need that choice; the rest
compute the same per element whichever function runs.

Rules:
1. Shapes broadcast the ONNX way (`sim.check_broadcast`), else the node is refused.
2. `inner_d0(s0, s1, out)` returns (input0_d0, input1_d0, output_d0) after ESP-DL's merge.
3. Scales: DL_SCALE(e) = 2**e for an input, DL_RESCALE(e) = 2**-e for the output, float32.
4. Results go through `tool::round` (the target's rounding) and `tool::truncate` (saturation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from espstream.intgraph import Node
from espstream.sim import Fn, Simulator, check_broadcast, round_float

F32 = np.float32


def inner_d0(s0: Sequence[int], s1: Sequence[int], out: Sequence[int]) -> tuple[int, int, int]:
    """(input0_d0, input1_d0, output_d0): the innermost axis after ESP-DL's axis merge."""
    dims = len(out)
    a = [1] * (dims - len(s0)) + list(s0)
    b = [1] * (dims - len(s1)) + list(s1)
    o = list(out)
    merged = dims
    for i in range(dims):
        j = i + 1
        while j < dims:
            if a[i] == b[i] and a[j] == b[j]:
                a[i] *= a[j]
                b[i] *= b[j]
                o[i] *= o[j]
                a[j] = b[j] = o[j] = 1
            elif a[i] == 1 and a[j] == 1:
                b[i] *= b[j]
                o[i] *= o[j]
                b[j] = o[j] = 1
            elif b[i] == 1 and b[j] == 1:
                a[i] *= a[j]
                o[i] *= o[j]
                a[j] = o[j] = 1
            else:
                break
            j += 1
        if j == dims:
            merged = i + 1
            break
    if dims == 0:
        return 1, 1, 1
    k = merged - 1
    return a[k], b[k], o[k]


def broadcast_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    check_broadcast(a.shape, b.shape)
    return tuple(np.broadcast_arrays(a, b))  # type: ignore[return-value]


def scale(e: int) -> np.float32:
    return F32(2.0 ** e)


LIMITS = {np.dtype(np.int8): (-128, 127), np.dtype(np.int16): (-32768, 32767)}


def store(y: np.ndarray, rounding: str, dtype: np.dtype) -> np.ndarray:
    """`tool::truncate<int32>(out, tool::round(y))`: round, then saturate into the type. A NaN
    (0 / 0, a negative base to a fractional power) is stored as 0: the chip's float-to-int
    conversion of NaN is not modelled."""
    lo, hi = LIMITS[np.dtype(dtype)]
    with np.errstate(invalid="ignore"):
        r = round_float(np.nan_to_num(np.asarray(y, np.float64), nan=0.0, posinf=hi, neginf=lo),
                        rounding)
    return np.clip(r, lo, hi).astype(dtype)


def float_binary(q0: np.ndarray, q1: np.ndarray, e0: int, e1: int, e_out: int,
                 f: Callable[[np.ndarray, np.ndarray], np.ndarray], rounding: str,
                 dtype: np.dtype) -> np.ndarray:
    """Pow / Mod at 8 or 16 bits: f on f32(q0 * 2**e0), f32(q1 * 2**e1), times 2**-e_out in
    float32, rounded and saturated (the same per element whichever inner function runs)."""
    a, b = broadcast_pair(np.asarray(q0), np.asarray(q1))
    with np.errstate(all="ignore"):
        y = f(a.astype(F32) * scale(e0), b.astype(F32) * scale(e1)).astype(F32) * scale(-e_out)
    return store(y.astype(F32), rounding, dtype)


def compile_binary(sim: Simulator, node: Node,
                   f: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Fn:
    """The simulator's function of a Pow / Mod node: float32 f on float (F32) nodes, else
    `float_binary` at the node's exponents."""
    g = sim.graph
    dtype = sim.dtype_of(node.outputs[0], np.int8)
    if dtype.kind == "f":
        def ffn(args: list) -> list:
            a, b = broadcast_pair(np.asarray(args[0], F32), np.asarray(args[1], F32))
            with np.errstate(all="ignore"):
                return [f(a, b).astype(F32)]
        return ffn
    e0, e1 = (sim.init_exp(n) if n in g.initializers else sim.exp(n) for n in node.inputs[:2])
    e_out, rounding = sim.exp(node.outputs[0]), sim.rounding
    return lambda args: [float_binary(args[0], args[1], e0, e1, e_out, f, rounding, dtype)]

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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from espstream.sim import check_broadcast

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

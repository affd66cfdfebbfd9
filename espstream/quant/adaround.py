"""AdaRound-style weight rounding: round each weight up or down to reconstruct the layer output.

1. The exponents stay as chosen (calibrate's rule 4); only the rounding direction of each
   weight changes: q = floor(w / 2^e) + h with h in {0, 1}, saturated to the integer range.
   A weight outside the range keeps its saturated value.
2. Objective: the squared error of the layer output on the calibration data between the
   quantized layer on the input the integer model sees (x_q) and the float layer on the float
   model's input (x): sum_r E[(w~_r x_q - w_r x)^2], computed exactly from the patches'
   moments E[x_q x_q^T] and E[x_q x^T] (`espstream.quant.patches` rule 3), so the rounding
   also makes up for the input's own quantization error. `centered`: the covariances instead
   (the mean error is then left to bias correction, which removes it exactly). Normalised by
   sum_r 2^(2 e_r) trace(E[x_q x_q^T]).
3. Relaxation (Nagel et al. 2020, "Up or Down? Adaptive Rounding"): h = clip(sigmoid(V)
   (zeta - gamma) + gamma, 0, 1), zeta 1.1, gamma -0.1, V started where h equals the fraction
   w / 2^e - floor(w / 2^e); Adam on V, plain NumPy gradients; after a warm-up of a fifth of
   the steps a regulariser lambda * mean(1 - |2h - 1|^beta) with beta annealed from 20 to 2
   pushes h to 0 or 1; then h is rounded at 0.5.
4. Never worse than nearest: if the result's objective (rule 2) is not below that of rounding
   to nearest (half to even, like every offline constant), nearest is kept.
5. Deterministic: no random numbers; the same layer and moments give the same integers.
"""

from __future__ import annotations

import numpy as np

from espstream.quant import scheme
from espstream.quant.patches import Layout, Moments, from_rows, to_rows

ZETA, GAMMA = 1.1, -0.1


def _grouped(a: np.ndarray, groups: int, m: np.ndarray) -> np.ndarray:
    """Each row times its group's matrix: [c, K] x [g, K, K] -> [c, K]."""
    c, k = a.shape
    return np.matmul(a.reshape(groups, -1, k), m).reshape(c, k)


def objective(wt: np.ndarray, w: np.ndarray, h: np.ndarray, cross: np.ndarray,
              groups: int) -> float:
    """Rule 2 up to a constant: sum_r wt_r H wt_r^T - 2 wt_r C w_r^T (rows in float units)."""
    return float(np.sum(wt * _grouped(wt, groups, h))
                 - 2.0 * np.sum(wt * _grouped(w, groups, np.swapaxes(cross, 1, 2))))


def adaround(lay: Layout, w: np.ndarray, exps: np.ndarray, moments: Moments, bits: int,
             centered: bool = False, steps: int = 800, lam: float = 0.05, lr: float = 0.05
             ) -> np.ndarray:
    """Rules 1-5: the integer weight (shape and dtype as `scheme.quantize` gives) for `w`
    with exponents `exps` (one per row along the row axis, or one for all)."""
    rows = to_rows(lay, np.asarray(w, np.float64))
    c, k = rows.shape
    e = np.broadcast_to(np.asarray(exps, np.int64).reshape(-1), (c,))
    s = np.ldexp(1.0, e)[:, None]
    x = rows / s
    qmin, qmax = scheme.qrange(bits)
    h_mat, cross = moments.moments(centered)
    groups = lay.groups
    target = _grouped(rows, groups, np.swapaxes(cross, 1, 2))  # w C^T per row
    z = float(np.sum(s[:, 0] ** 2 * np.trace(h_mat, axis1=1, axis2=2)[lay.row_group()]))
    nearest = np.clip(np.rint(x), qmin, qmax)
    if z <= 0.0:
        return _out(lay, nearest, bits)
    fl = np.floor(x)
    free = (fl >= qmin) & (fl + 1 <= qmax)
    frac = np.clip(x - fl, 1e-4, 1 - 1e-4)
    v = -np.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)
    m1 = np.zeros_like(v)
    m2 = np.zeros_like(v)
    n_free = max(int(free.sum()), 1)
    warm = steps // 5
    for t in range(1, steps + 1):
        sig = 1.0 / (1.0 + np.exp(-v))
        h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        wt = np.where(free, fl + h, nearest) * s
        grad_h = 2.0 * s * (_grouped(wt, groups, h_mat) - target) / z
        if t > warm:
            beta = 20.0 + (2.0 - 20.0) * (t - warm) / max(steps - warm, 1)
            u = 2.0 * h - 1.0
            grad_h = grad_h - lam * beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2.0 / n_free
        inside = (h > 0.0) & (h < 1.0) & free
        g = np.where(inside, grad_h * (ZETA - GAMMA) * sig * (1.0 - sig), 0.0)
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g * g
        v -= lr * (m1 / (1 - 0.9**t)) / (np.sqrt(m2 / (1 - 0.999**t)) + 1e-12)
    sig = 1.0 / (1.0 + np.exp(-v))
    h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    q = np.where(free, fl + (h >= 0.5), nearest)
    if (objective(q * s, rows, h_mat, cross, groups)
            < objective(nearest * s, rows, h_mat, cross, groups)):
        return _out(lay, q, bits)
    return _out(lay, nearest, bits)


def _out(lay: Layout, q_rows: np.ndarray, bits: int) -> np.ndarray:
    return from_rows(lay, q_rows).astype(scheme.int_dtype(bits))

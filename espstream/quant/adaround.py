"""AdaRound-style weight rounding: round each weight up or down to reconstruct the layer output.

1. The exponents stay as chosen (calibrate's rule 4); only the rounding direction of each
   weight changes: q = floor(w / 2^e) + h with h in {0, 1}, saturated to the integer range.
   A weight outside the range keeps its saturated value.
2. Objective: the layer's output error on the calibration data, computed exactly from the input
   patches' second moments H (`espstream.quant.patches` rule 3):
   sum_r 2^(2 e_r) d_r H d_r^T with d_r = q_r - w_r / 2^e_r, normalised by
   sum_r 2^(2 e_r) trace(H) (so it is about 1/12 for rounding to nearest with white inputs).
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


def _objective(d: np.ndarray, s2: np.ndarray, h: np.ndarray, groups: int) -> float:
    dg = d.reshape(groups, -1, d.shape[1])
    hd = np.einsum("gri,gij->grj", dg, h).reshape(d.shape)
    return float(np.sum(s2[:, None] * d * hd))


def adaround(lay: Layout, w: np.ndarray, exps: np.ndarray, moments: Moments, bits: int,
             steps: int = 800, lam: float = 0.05, lr: float = 0.05) -> np.ndarray:
    """Rules 1-5: the integer weight (shape and dtype as `scheme.quantize` gives) for `w`
    with exponents `exps` (one per row along the row axis, or one for all)."""
    rows = to_rows(lay, np.asarray(w, np.float64))
    c, k = rows.shape
    e = np.broadcast_to(np.asarray(exps, np.int64).reshape(-1), (c,))
    s = np.ldexp(1.0, e)
    x = rows / s[:, None]
    qmin, qmax = scheme.qrange(bits)
    h_mat = moments.second  # [groups, K, K]
    groups = lay.groups
    s2 = s * s
    z = float(np.sum(s2 * np.trace(h_mat, axis1=1, axis2=2)[lay.row_group()]))
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
        d = np.where(free, fl + h, nearest) - x
        dg = d.reshape(groups, -1, k)
        grad_d = 2.0 * s2[:, None] * np.einsum("gri,gij->grj", dg, h_mat).reshape(c, k) / z
        if t > warm:
            beta = 20.0 + (2.0 - 20.0) * (t - warm) / max(steps - warm, 1)
            u = 2.0 * h - 1.0
            grad_h = grad_d - lam * beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2.0 / n_free
        else:
            grad_h = grad_d
        inside = (h > 0.0) & (h < 1.0) & free
        g = np.where(inside, grad_h * (ZETA - GAMMA) * sig * (1.0 - sig), 0.0)
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g * g
        v -= lr * (m1 / (1 - 0.9**t)) / (np.sqrt(m2 / (1 - 0.999**t)) + 1e-12)
    sig = 1.0 / (1.0 + np.exp(-v))
    h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    q = np.where(free, fl + (h >= 0.5), nearest)
    if _objective(q - x, s2, h_mat, groups) < _objective(nearest - x, s2, h_mat, groups):
        return _out(lay, q, bits)
    return _out(lay, nearest, bits)


def _out(lay: Layout, q_rows: np.ndarray, bits: int) -> np.ndarray:
    return from_rows(lay, q_rows).astype(scheme.int_dtype(bits))

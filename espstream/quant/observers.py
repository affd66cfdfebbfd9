"""Fixed-memory activation observers and the four ways to pick a power-of-two exponent.

`HistogramObserver` never keeps activations. Its state is a fixed number of integers:

1. Two histograms of |x| with `bins` bins each (a power of two), one for x > 0 and one for x < 0,
   over [0, R) with R = 2^k the smallest power of two above every |x| seen so far; exact zeros
   are counted apart (a ReLU output is half zeros, and a zero quantizes without error).
2. When a batch holds a value >= R, R doubles (as often as needed) and each pair of neighbouring
   bins merges into one. Because R and `bins` are powers of two the merge is exact: no value
   changes bin boundaries by interpolation, whatever the order the data arrive in.
3. The exact minimum, maximum and count are kept beside the histograms.

Exponent choices (e means scale 2^e; `bits` gives the integer range [qmin, qmax]):

1. `minmax`: the smallest e with qmin * 2^e <= min and max <= qmax * 2^e (nothing clips).
2. `percentile` P: the minmax exponent of the P-th percentile of |x| (interpolated in its bin).
3. `kl`: among e from the minmax exponent down to 8 below it (a 256 times narrower range), the
   one whose clipped, quantized |x| distribution is closest in KL divergence to the observed
   one (TensorRT's entropy calibration, with the thresholds restricted to 2^(e + bits - 1));
   exact zeros are left out of the distributions. Only thresholds with at least one bin per
   integer level compete; with 16 bits (32768 levels) there is none below the minmax exponent,
   so `kl` gives the minmax exponent there.
4. `mse`: among the same candidates, the e that minimises the expected squared error of
   quantization, rounding and clipping together, taking the density as uniform inside each bin
   and integrating the rounding error exactly over it.
"""

from __future__ import annotations

import math

import numpy as np

from espstream.quant.scheme import E_MIN, exponent_for_absmax, exponent_for_range, qrange

METHODS = ("minmax", "percentile", "kl", "mse")
DEFAULT_BINS = 4096
CANDIDATES_BELOW = 8  # how far below the minmax exponent kl and mse look
CHUNK = 1 << 20  # values binned at once (bounds update's temporaries)


class NonFiniteError(ValueError):
    """An observed tensor held NaN or Inf."""


class HistogramObserver:
    """Statistics of one tensor in fixed memory (see the module docstring)."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError("bins must be a power of two >= 2")
        self.bins = bins
        # [0, bins): x > 0 by |x|; [bins, 2 bins): x < 0 by |x|; [2 bins]: exact zeros.
        self.hist = np.zeros(2 * bins + 1, dtype=np.int64)
        self.top: int | None = None  # k with R = 2^k; None until a non-zero value is seen
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    # ---- state --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Size of the state: constant, whatever the number of samples observed."""
        return int(self.hist.nbytes) + 4 * 8

    @property
    def pos(self) -> np.ndarray:
        return self.hist[: self.bins]

    @property
    def neg(self) -> np.ndarray:
        return self.hist[self.bins : 2 * self.bins]

    @property
    def zeros(self) -> int:
        return int(self.hist[2 * self.bins])

    @property
    def width(self) -> float:
        """Bin width R / bins."""
        return math.ldexp(1.0, (self.top if self.top is not None else 0)) / self.bins

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.dtype != np.float32 and x.dtype != np.float64:
            x = x.astype(np.float32)
        x = x.ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteError("NaN or Inf in the observed values")
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(x.size)
        a = max(-lo, hi)
        if a > 0.0:
            # 2^(k-1) <= a < 2^k; below 2^-100 everything is bin 0 (keeps bins / R in float32)
            k = max(math.frexp(a)[1], -100)
            if self.top is None:
                self.top = k
            elif k > self.top:
                self._grow(k)
        if self.top is None:  # all zeros so far
            self.hist[2 * self.bins] += x.size
            return
        b = self.bins
        # trunc(x * b / R) + b - [x < 0] is a signed bin in [0, 2b): b + j for x in [jw, (j+1)w)
        # and b - 1 - j for -x in [jw, (j+1)w). b / R is a power of two: the product is exact.
        # Counted in slices of CHUNK values: the temporaries stay small whatever the tensor.
        scale = x.dtype.type(math.ldexp(float(b), -self.top))
        h = np.zeros(2 * b, dtype=np.int64)
        zeros = 0
        for start in range(0, x.size, CHUNK):
            xs = x[start : start + CHUNK]
            idx = (xs * scale).astype(np.intp)
            idx += b
            idx -= xs < 0
            np.clip(idx, 0, 2 * b - 1, out=idx)
            h += np.bincount(idx, minlength=2 * b)
            zeros += int(np.count_nonzero(xs == 0))
        self.hist[:b] += h[b:]
        self.hist[:1] -= zeros
        self.hist[b : 2 * b] += h[b - 1 :: -1]
        self.hist[2 * b] += zeros

    def _grow(self, k: int) -> None:
        f_log = k - self.top
        b = self.bins
        for half in (slice(0, b), slice(b, 2 * b)):
            h = self.hist[half]
            if f_log >= int(math.log2(b)):
                total = h.sum()
                h[:] = 0
                h[0] = total
            else:
                f = 1 << f_log
                merged = h.reshape(b // f, f).sum(axis=1)
                h[:] = 0
                h[: b // f] = merged
        self.top = k

    # ---- derived statistics ---------------------------------------------------------------
    def abs_hist(self) -> np.ndarray:
        """Histogram of |x| over the bins, zeros in bin 0."""
        h = self.pos + self.neg
        h = h.copy()
        h[0] += self.zeros
        return h

    def percentile_abs(self, p: float) -> float:
        """The p-th percentile (0..100) of |x|, linear inside its bin."""
        if self.count == 0 or self.top is None:
            return 0.0
        target = self.count * p / 100.0
        if target <= self.zeros:
            return 0.0
        h = (self.pos + self.neg).astype(np.float64)
        cdf = self.zeros + np.cumsum(h)
        j = int(np.searchsorted(cdf, target, side="left"))
        j = min(j, self.bins - 1)
        before = cdf[j - 1] if j > 0 else self.zeros
        frac = (target - before) / h[j] if h[j] > 0 else 1.0
        value = (j + min(max(frac, 0.0), 1.0)) * self.width
        return float(min(value, max(-self.min, self.max)))

    def expected_sq_error(self, e: int, bits: int) -> float:
        """Mean squared error of quantizing the observed values with exponent e (rule 4)."""
        return float(self.expected_sq_errors([e], bits)[0])

    def expected_sq_errors(self, exps: list[int], bits: int) -> np.ndarray:
        """`expected_sq_error` for several exponents at once (one row of work per exponent)."""
        if self.count == 0 or self.top is None:
            return np.zeros(len(exps))
        qmin, qmax = qrange(bits)
        w = self.width
        pos, neg = np.nonzero(self.pos)[0], np.nonzero(self.neg)[0]
        counts = np.concatenate([self.pos[pos], self.neg[neg]]).astype(np.float64)[None, :]
        s = np.ldexp(1.0, np.asarray(exps, dtype=np.int64))[:, None]
        total = _bin_error_edges(counts, [pos, neg], w, s, [float(qmax), float(-qmin)])
        return total / self.count

    def clipped_fraction(self, e: int, bits: int) -> float:
        """Share of the observed values beyond the range of exponent e (uniform inside a bin)."""
        if self.count == 0 or self.top is None:
            return 0.0
        qmin, qmax = qrange(bits)
        s = math.ldexp(1.0, e)
        n = _mass_above(self.pos, self.width, qmax * s)
        n += _mass_above(self.neg, self.width, -qmin * s)
        return float(n / self.count)

    # ---- exponent choices -----------------------------------------------------------------
    def exponent(self, method: str, bits: int, percentile: float = 99.99) -> int:
        if method == "minmax":
            return self.minmax_exponent(bits)
        if method == "percentile":
            return self.percentile_exponent(bits, percentile)
        if method == "kl":
            return self.kl_exponent(bits)
        if method == "mse":
            return self.mse_exponent(bits)
        raise ValueError(f"unknown method {method!r}")

    def minmax_exponent(self, bits: int) -> int:
        if self.count == 0:
            return exponent_for_range(0.0, 0.0, bits)
        return exponent_for_range(min(self.min, 0.0), max(self.max, 0.0), bits)

    def percentile_exponent(self, bits: int, p: float) -> int:
        return min(exponent_for_absmax(self.percentile_abs(p), bits), self.minmax_exponent(bits))

    def _candidates(self, bits: int) -> list[int]:
        top = self.minmax_exponent(bits)
        return list(range(top, max(top - CANDIDATES_BELOW, E_MIN) - 1, -1))

    def mse_exponent(self, bits: int) -> int:
        """The candidate with the smallest `expected_sq_error` (the first of equals: the wider
        range), as if every candidate were evaluated; a candidate is left out only when a lower
        bound of its error already exceeds the error of one evaluated (`clip_lower_bounds`),
        which most narrow candidates do at once (clipping alone costs them too much)."""
        if self.top is None:
            return self.minmax_exponent(bits)
        cands = self._candidates(bits)
        lower = self.clip_lower_bounds(cands, bits)
        first = int(np.argmin(lower))
        best = float(self.expected_sq_errors([cands[first]], bits)[0])
        # 1e-3 relative: far above the rounding of either figure (about 1e-12 relative)
        rest = [i for i in range(len(cands))
                if i != first and lower[i] <= best * (1.0 + 1e-3) + 1e-300]
        errs = np.full(len(cands), np.inf)
        errs[first] = best
        if rest:
            errs[rest] = self.expected_sq_errors([cands[i] for i in rest], bits)
        return cands[int(np.argmin(errs))]  # the first minimum: ties go to the wider range

    def clip_lower_bounds(self, exps: list[int], bits: int) -> np.ndarray:
        """Per exponent, a lower bound of `expected_sq_error`: the clipping error of the bins
        wholly above the range, each counted at its lower edge (in a bin [lo, hi) above the
        largest level L, every value t clips with error (t - L)^2 >= (lo - L)^2, and every other
        term of the error is >= 0)."""
        if self.count == 0 or self.top is None:
            return np.zeros(len(exps))
        qmin, qmax = qrange(bits)
        w = self.width
        out = np.zeros(len(exps))
        for hist, level in ((self.pos, float(qmax)), (self.neg, float(-qmin))):
            j = np.nonzero(hist)[0]
            lo = j * w
            c = hist[j].astype(np.float64)
            for k, e in enumerate(exps):
                clip = level * math.ldexp(1.0, e)
                i = int(np.searchsorted(lo, clip, side="left"))  # first bin with lo >= clip
                if i < len(lo):
                    d = lo[i:] - clip
                    out[k] += float(np.dot(c[i:], d * d))
        return out / self.count

    def kl_exponent(self, bits: int) -> int:
        if self.top is None:
            return self.minmax_exponent(bits)
        levels = 1 << (bits - 1)
        # Exact zeros are left out: they quantize without error, and a ReLU's spike of zeros
        # in bin 0 would otherwise dominate the divergence.
        h = (self.pos + self.neg).astype(np.float64)
        best: tuple[float, int] | None = None
        for e in self._candidates(bits):
            n = math.ldexp(1.0, e + bits - 1) / self.width  # bins below the threshold 2^(e+bits-1)
            if n < levels:  # under one bin per level the comparison means nothing
                break
            n = min(int(n), self.bins)
            kl = _kl_clipped(h, n, levels)
            if best is None or kl < best[0] - 1e-12:
                best = (kl, e)
        return best[1] if best is not None else self.minmax_exponent(bits)


def _h_period(y: np.ndarray, s: np.ndarray | float) -> np.ndarray:
    """Integral over [0, y] of (t mod s - s/2)^2 dt."""
    n = np.floor(y / s)
    r = y - n * s
    half = s / 2.0
    return n * (s**3 / 12.0) + ((r - half) ** 3 + half**3) / 3.0


def _round_err_integral(u: np.ndarray, v: np.ndarray, s: np.ndarray | float) -> np.ndarray:
    """Integral over [u, v] of (t - s * round(t / s))^2 dt, for 0 <= u <= v."""
    half = s / 2.0
    return _h_period(v + half, s) - _h_period(u + half, s)


def _bin_error(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, s: np.ndarray,
               clip: np.ndarray) -> np.ndarray:
    """Per row of `s` / `clip`: sum over bins of count * mean squared error, the density
    uniform inside each bin (bins along the last axis)."""
    inner_hi = np.minimum(hi, clip)
    inner = np.where(inner_hi > lo, _round_err_integral(lo, np.maximum(inner_hi, lo), s), 0.0)
    outer_lo = np.maximum(lo, clip)
    outer = np.where(hi > outer_lo, ((hi - clip) ** 3 - (outer_lo - clip) ** 3) / 3.0, 0.0)
    return np.sum(counts * (inner + outer) / (hi - lo), axis=-1)


_BLOCK = 8192  # values per temporary array in `_bin_error_edges` (64 KiB of float64)


def _bin_error_edges(counts: np.ndarray, halves: list[np.ndarray], w: float, s: np.ndarray,
                     clips: list[float]) -> np.ndarray:
    """`_bin_error(counts, j * w, (j + 1) * w, s, clip)` for the bins j of `halves` laid end to
    end (clip = clips[h] * s over the bins of half h, `counts` [1, bins] in the same order):
    bit for bit the same numbers, about ten times faster (the mse search runs it for every
    observed tensor).

    `_bin_error` is the plain statement; this evaluates the same expressions on the same
    operands, rearranged so that every value stays identical:

    1. A bin's `inner` term is H(min(hi, clip)) - H(lo) where lo < clip and 0 elsewhere, with
       H(y) = _h_period(y + s/2, s); written H(min(hi, clip)) - H(min(lo, clip)) it needs no
       case: bins at or above the clip give H(clip) - H(clip) = 0.
    2. Its `outer` term is ((hi - clip)^3 - (max(lo, clip) - clip)^3) / 3 where hi > clip and
       0 elsewhere: with G(y) = (y - clip)^3 above the clip and 0.0 (= 0.0^3) at or below
       it, that is (G(hi) - G(lo)) / 3 everywhere.
    3. H and G depend on one edge only: computed once per distinct edge (the upper edge of
       bin j is the lower edge of bin j + 1), then gathered.
    4. NumPy's float64 power takes a scalar path for negative and zero bases, some 40 and 4
       times slower than for positive ones: the cubes inside H, (r - s/2)^3, take few distinct
       values and are looked up on their grid (`_cube_on_grid`), and G cubes only positive
       values. A cube of the same operand is the same number, so nothing changes.
    5. hi - lo is exactly w (edges are integers times a power of two); products and sums are
       taken in the same order (IEEE + and * commute).
    6. The work goes in blocks of bins so that temporaries stay small (a fresh large array
       costs more in page faults than the arithmetic on it); each row is still summed in one
       np.sum over a C-ordered array, as `_bin_error` sums it (the order of a row's additions
       decides its last bits).
    """
    rows = s.shape[0]
    out = np.empty((rows, sum(len(j) for j in halves)))
    half = s / 2.0
    cube_half = half**3
    period = s**3 / 12.0
    block = max(64, _BLOCK // max(rows, 1))
    col = 0
    for j, c in zip(halves, clips, strict=True):
        if len(j) == 0:
            continue
        clip = c * s  # [rows, 1]: the same products as `_bin_error`'s clip column
        mark = np.zeros(int(j[-1]) + 2, dtype=bool)
        mark[j] = True
        mark[j + 1] = True
        x = np.flatnonzero(mark).astype(np.float64) * w  # the distinct edges, exactly
        at = np.cumsum(mark) - 1  # edge number -> its index in x
        lo_i, hi_i = at[j], at[j + 1]
        for b0 in range(0, len(j), block):
            b1 = min(b0 + block, len(j))
            e0, e1 = int(lo_i[b0]), int(hi_i[b1 - 1]) + 1  # this block's edges: a range of x
            xb = x[e0:e1]
            y = np.minimum(xb, clip)  # rule 1, then _h_period(y + s/2, s)
            y += half
            n = y / s
            np.floor(n, out=n)
            r = n * s
            np.subtract(y, r, out=r)
            r -= half
            h = _cube_on_grid(r, w)
            h += cube_half
            h /= 3.0
            n *= period
            h += n
            d = np.subtract(xb, clip, out=y)
            below = d <= 0.0
            d[below] = 1.0
            g = d**3  # rule 2: positive bases only
            g[below] = 0.0
            li, hj = lo_i[b0:b1] - e0, hi_i[b0:b1] - e0
            v = out[:, col + b0 : col + b1]
            np.subtract(h[:, hj], h[:, li], out=v)  # inner
            outer = g[:, hj]
            outer -= g[:, li]
            outer /= 3.0
            v += outer
            v *= counts[:, col + b0 : col + b1]
            v /= w
        col += len(j)
    return np.sum(out, axis=-1)


def _cube_on_grid(d: np.ndarray, w: float) -> np.ndarray:
    """`d ** 3` for values that are (nearly all) multiples of w in a short range, computed once
    per grid value; falls back to `d ** 3` when any value is off the grid (bit-checked)."""
    t = d / w  # exact: w is a power of two
    lo, hi = float(t.min()), float(t.max())
    if not (hi - lo <= 4096 and lo == math.floor(lo)):
        return d**3
    k = (t - lo).astype(np.intp)
    grid = (np.arange(int(hi - lo) + 1, dtype=np.float64) + lo) * w
    if not np.array_equal(grid[k].view(np.int64), d.view(np.int64)):
        return d**3
    return (grid**3)[k]


def _mass_above(counts: np.ndarray, width: float, t: float) -> float:
    pos = t / width
    j = int(math.floor(pos))
    if j >= len(counts):
        return 0.0
    partial = counts[j] * (1.0 - (pos - j)) if j >= 0 else 0.0
    return float(counts[j + 1 :].sum() + partial)


def _kl_clipped(h: np.ndarray, n: int, levels: int) -> float:
    """KL(P || Q): P the first n bins with the tail folded into the last, Q those n bins
    merged into `levels` groups and spread back over each group's non-empty bins."""
    p = h[:n].copy()
    p[n - 1] += h[n:].sum()
    base = h[:n]
    if n >= levels:
        g = n // levels
        grouped = base.reshape(levels, g)
        nonzero = (grouped > 0).sum(axis=1, keepdims=True)
        mean = grouped.sum(axis=1, keepdims=True) / np.maximum(nonzero, 1)
        spread = np.where(grouped > 0, mean, 0.0)
        q = spread.reshape(n)
    else:
        q = base.copy()
    ps, qs = p.sum(), q.sum()
    if ps == 0:
        return 0.0
    p = p / ps
    q = q / qs if qs > 0 else q
    mask = p > 0
    q = np.where(mask & (q <= 0), 1e-12, q)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def weight_exponents(
    w: np.ndarray, axis: int | None, bits: int, method: str = "minmax"
) -> np.ndarray:
    """Exponents of a weight tensor: one per slice along `axis`, or one for all (axis None).

    `minmax` covers each slice's range exactly (rule 1 of scheme); `mse` tries that exponent and
    the four below it and keeps the one with the smallest squared error on the actual values.
    """
    w = np.asarray(w, dtype=np.float64)
    rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    lows = np.minimum(rows.min(axis=1), 0.0)
    highs = np.maximum(rows.max(axis=1), 0.0)
    out = []
    qmin, qmax = qrange(bits)
    for row, lo, hi in zip(rows, lows, highs, strict=True):
        e0 = exponent_for_range(float(lo), float(hi), bits)
        if method == "mse":
            best = None
            for e in range(e0, e0 - 5, -1):
                s = math.ldexp(1.0, e)
                err = float(np.sum((np.clip(np.rint(row / s), qmin, qmax) * s - row) ** 2))
                if best is None or err < best[0]:
                    best = (err, e)
            e0 = best[1]
        out.append(e0)
    return np.asarray(out, dtype=np.int64)

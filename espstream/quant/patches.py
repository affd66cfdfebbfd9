"""A linear layer's weight as rows and its input as patches, and the patches' moments.

What bias correction and AdaRound share (`espstream.quant.bias_correction`, `.adaround`):

1. Rows: a Conv weight [cout, cin/g, *k] is `cout` rows of `cin/g * prod(k)` values; a Gemm
   weight is its output rows (transB 1: as stored; transB 0: transposed); a 2-D MatMul weight
   [K, N] is its N columns. `to_rows` / `from_rows` are exact inverses.
2. Patches: the input values one output value of a row sees, in the row's order; a Conv's
   patches come from its input zero-padded as the attributes say (pads, strides, dilations,
   group; auto_pad must be NOTSET), so padding counts as zeros like in the layer itself.
   Row r of a grouped Conv sees the patches of group r // (cout / group).
3. Moments: per group, the sum of patches (K), the sum of their outer products (K x K) and
   their count, accumulated over runs in float64; `mean` and `second` divide by the count.
   `mean_ref`: the mean patch of a reference input (the float model's own) beside it, and
   the cross moment E[x ref^T]; `moments(centered)` gives E[x x^T] and E[x ref^T] or the
   covariances.
   A row's output then has mean `row . mean` and mean square `row H row^T`, exactly.
4. A layer this module cannot take (ConvTranspose, a MatMul weight of more than 2-D, a Gemm
   with transA, an auto_pad) is `None` from `layout`: the techniques leave it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

PATCH_BYTES = 32 << 20  # patches one `Moments.update` step may hold


@dataclass(frozen=True)
class Layout:
    op: str
    groups: int
    cout: int
    w_shape: tuple[int, ...]
    trans_b: bool = False  # Gemm
    kernel: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()

    @property
    def k(self) -> int:
        """Values per row."""
        return int(np.prod(self.w_shape)) // self.cout

    def row_group(self) -> np.ndarray:
        """Group of each row (rule 2)."""
        return np.arange(self.cout) // (self.cout // self.groups)


def layout(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> Layout | None:
    """Rule 4: the layout of a Conv / Gemm / MatMul with a constant weight, else None."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    shape = tuple(int(d) for d in inits[node.input[1]].dims)
    if node.op_type == "Conv":
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        nd = len(shape) - 2
        return Layout("Conv", int(attrs.get("group", 1)), shape[0], shape,
                      kernel=shape[2:], pads=tuple(attrs.get("pads", [0] * 2 * nd)),
                      strides=tuple(attrs.get("strides", [1] * nd)),
                      dilations=tuple(attrs.get("dilations", [1] * nd)))
    if node.op_type == "Gemm" and not attrs.get("transA", 0) and len(shape) == 2:
        tb = bool(attrs.get("transB", 0))
        return Layout("Gemm", 1, shape[0] if tb else shape[1], shape, trans_b=tb)
    if node.op_type == "MatMul" and len(shape) == 2:
        return Layout("MatMul", 1, shape[1], shape)
    return None


def to_rows(lay: Layout, w: np.ndarray) -> np.ndarray:
    """Rule 1: [cout, K]."""
    if lay.op == "Conv" or (lay.op == "Gemm" and lay.trans_b):
        return w.reshape(lay.cout, -1)
    return w.T  # Gemm transB 0, MatMul: [K, N]


def from_rows(lay: Layout, rows: np.ndarray) -> np.ndarray:
    if lay.op == "Conv" or (lay.op == "Gemm" and lay.trans_b):
        return rows.reshape(lay.w_shape)
    return np.ascontiguousarray(rows.T)


def row_axis(lay: Layout) -> int:
    """The weight axis that `to_rows` makes the row axis."""
    return 0 if lay.op == "Conv" or (lay.op == "Gemm" and lay.trans_b) else 1


def patches(lay: Layout, x: np.ndarray) -> np.ndarray:
    """Rule 2: [groups, P, K] patches of the layer input `x`."""
    x = np.asarray(x, dtype=np.float64)
    if lay.op != "Conv":
        return x.reshape(1, -1, lay.k)
    nd = len(lay.kernel)
    pad = [(0, 0), (0, 0)] + [(lay.pads[i], lay.pads[i + nd]) for i in range(nd)]
    xp = np.pad(x, pad)
    v = xp
    for i in range(nd):  # a window per spatial axis, appended as a trailing axis
        span = lay.dilations[i] * (lay.kernel[i] - 1) + 1
        v = np.lib.stride_tricks.sliding_window_view(v, span, axis=2 + i)
        sl = [slice(None)] * v.ndim
        sl[2 + i] = slice(None, None, lay.strides[i])
        sl[-1] = slice(None, None, lay.dilations[i])
        v = v[tuple(sl)]
    n, c = v.shape[:2]
    out = v.shape[2:2 + nd]
    g = lay.groups
    v = v.reshape(n, g, c // g, *out, *lay.kernel)
    # -> [g, n, *out, c/g, *k]
    perm = [1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd)]
    v = v.transpose(perm)
    return v.reshape(g, -1, lay.k)


def _windows(lay: Layout, x: np.ndarray) -> tuple[np.ndarray, list[list[slice]]]:
    """The padded input and, per kernel offset, the slices of the positions it sees."""
    nd = len(lay.kernel)
    xp = np.pad(np.asarray(x, np.float64),
                [(0, 0), (0, 0)] + [(lay.pads[i], lay.pads[i + nd]) for i in range(nd)])
    outs = [(xp.shape[2 + i] - lay.dilations[i] * (lay.kernel[i] - 1) - 1) // lay.strides[i] + 1
            for i in range(nd)]
    offsets = []
    for ks in np.ndindex(*lay.kernel):
        offsets.append([slice(k * lay.dilations[i], k * lay.dilations[i]
                              + (outs[i] - 1) * lay.strides[i] + 1, lay.strides[i])
                        for i, k in enumerate(ks)])
    return xp, offsets


def patch_sums(lay: Layout, x: np.ndarray) -> np.ndarray:
    """[groups, K]: the sum of the patches of `x`, without making them (rule 2's order)."""
    if lay.op != "Conv":
        return patches(lay, x).sum(axis=1)
    xp, offsets = _windows(lay, x)
    sums = np.stack([xp[(slice(None), slice(None), *sl)].sum(
        axis=tuple(range(2, xp.ndim))).sum(axis=0) for sl in offsets], axis=1)  # [C, prod k]
    return sums.reshape(lay.groups, -1)


def patch_count(lay: Layout, x: np.ndarray) -> int:
    if lay.op != "Conv":
        return int(np.prod(x.shape)) // lay.k
    xp, offsets = _windows(lay, x)
    first = xp[(slice(None), slice(None), *offsets[0])]
    return int(first.shape[0] * np.prod(first.shape[2:]))


class Moments:
    """Rule 3: per-group first and second moments of a layer's input patches."""

    def __init__(self, lay: Layout, second: bool = True) -> None:
        """`second` False: the means only (what bias correction needs), without patches."""
        self.lay = lay
        self.has_second = second
        self.sum = np.zeros((lay.groups, lay.k))
        self.outer = np.zeros((lay.groups, lay.k, lay.k))
        self.sum_ref = np.zeros((lay.groups, lay.k))
        self.cross = np.zeros((lay.groups, lay.k, lay.k))  # sum of x (outer) ref
        self.count = 0

    def update(self, x: np.ndarray, ref: np.ndarray | None = None) -> None:
        """`x`: the input as the integer model sees it; `ref`: the float model's (default x).
        A few samples at a time, so the patches (prod(kernel) times the input, in float64)
        stay within PATCH_BYTES."""
        if not self.has_second:
            self.sum += patch_sums(self.lay, x)
            self.sum_ref += patch_sums(self.lay, x if ref is None else ref)
            self.count += patch_count(self.lay, x)
            return
        if x.ndim and x.shape[0] > 1 and self.lay.op == "Conv":
            per = max(1, x[0].size * int(np.prod(self.lay.kernel)) * 8)
            step = max(1, PATCH_BYTES // per)
            if step < x.shape[0]:
                for i in range(0, x.shape[0], step):
                    self.update(x[i:i + step], None if ref is None else ref[i:i + step])
                return
        p = patches(self.lay, x)
        pr = p if ref is None else patches(self.lay, ref)
        self.sum += p.sum(axis=1)
        self.sum_ref += pr.sum(axis=1)
        pt = np.swapaxes(p, 1, 2)
        self.outer += pt @ p  # BLAS: np.einsum would not use it here
        self.cross += pt @ pr
        self.count += p.shape[1]

    @property
    def mean_ref(self) -> np.ndarray:
        return self.sum_ref / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def second(self) -> np.ndarray:
        return self.outer / max(self.count, 1)

    def moments(self, centered: bool) -> tuple[np.ndarray, np.ndarray]:
        """(E[x x^T], E[x ref^T]) per group, or the covariances when `centered`."""
        h, c = self.second, self.cross / max(self.count, 1)
        if centered:
            h = h - np.einsum("gi,gj->gij", self.mean, self.mean)
            c = c - np.einsum("gi,gj->gij", self.mean, self.mean_ref)
        return h, c


def initializer(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray:
    return numpy_helper.to_array(inits[name])

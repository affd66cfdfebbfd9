"""Cross-layer equalization: move per-channel scale between consecutive linear layers.

1. A pair is a Conv / Gemm A (constant weight, constant or no bias) whose output feeds only a
   Conv / Gemm B as its data input, directly or through one Relu (positive homogeneous:
   relu(x / s) = relu(x) / s for s > 0) whose output feeds only B. No tensor between them is a
   graph output, and neither weight (nor A's bias) is shared with another node. Gemm with
   transA, a Gemm bias broadcast from one value, ConvTranspose and Conv with auto_pad are
   not paired.
2. For each channel i between them: r1 = max |row i of A's weight|, r2 = max |input column i
   of B's weight| (for a grouped B: the column of channel i in its group), s = sqrt(r1 / r2);
   A's row i and bias i are divided by s, B's column i multiplied by s. Both ranges become
   sqrt(r1 r2): per-tensor weight exponents (esp32s3, c) then waste fewer bits on the channels
   with small weights. A channel with r1 or r2 zero keeps s = 1.
3. The float function is unchanged up to float32 rounding; the pass runs three sweeps over the
   pairs in graph order so that chains (A -> B -> C) settle.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from espstream.quant.patches import layout, row_axis

SWEEPS = 3


def _pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    uses: Counter[str] = Counter()
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
            uses[i] += 1
    outputs = {o.name for o in g.output}

    def only(t: str) -> onnx.NodeProto | None:
        c = consumers.get(t, [])
        return c[0] if len(c) == 1 and t not in outputs else None

    def linear(n: onnx.NodeProto) -> bool:
        if n.op_type not in ("Conv", "Gemm") or layout(n, inits) is None:
            return False
        own = [n.input[1]] + ([n.input[2]] if len(n.input) > 2 and n.input[2] else [])
        return all(t in inits and uses[t] == 1 for t in own)

    pairs = []
    for a in g.node:
        if not linear(a):
            continue
        nxt = only(a.output[0])
        if nxt is not None and nxt.op_type == "Relu":
            nxt = only(nxt.output[0])
        if nxt is not None and linear(nxt) and nxt.input[0] in (a.output[0], *(
                n.output[0] for n in consumers.get(a.output[0], []) if n.op_type == "Relu")):
            pairs.append((a, nxt))
    return pairs


def equalize_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rules 1-3 in place on `model` (initializers rewritten); returns it and the pair count."""
    inits = {t.name: t for t in model.graph.initializer}
    pairs = _pairs(model)

    def get(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float64)

    def put(name: str, a: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(a.astype(np.float32), name))

    for _ in range(SWEEPS):
        for a, b in pairs:
            la, lb = layout(a, inits), layout(b, inits)
            w1, w2 = get(a.input[1]), get(b.input[1])
            w1r = np.moveaxis(w1, row_axis(la), 0)  # [channels, ...]
            ch = w1r.shape[0]
            # B's input column i: a view [channels, ...] of B's weight
            if lb.op == "Conv":
                cg = w2.shape[1]
                g = lb.groups
                w2v = w2.reshape(g, w2.shape[0] // g, cg, *w2.shape[2:])
                w2c = np.moveaxis(w2v, 2, 1).reshape(g * cg, w2.shape[0] // g, -1)
            else:
                w2c = np.moveaxis(w2, 1 - row_axis(lb), 0)
            if w2c.shape[0] != ch:
                continue
            r1 = np.abs(w1r.reshape(ch, -1)).max(axis=1)
            r2 = np.abs(w2c.reshape(ch, -1)).max(axis=1)
            s = np.ones(ch)
            ok = (r1 > 0) & (r2 > 0)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            b1 = get(a.input[2]) if len(a.input) > 2 and a.input[2] else None
            if b1 is not None and b1.size != ch:
                continue  # a broadcast Gemm bias cannot be scaled per channel
            shape1 = [1] * w1.ndim
            shape1[row_axis(la)] = ch
            put(a.input[1], w1 / s.reshape(shape1))
            if b1 is not None:
                put(a.input[2], b1 / s.reshape(b1.shape))
            if lb.op == "Conv":
                g, cg = lb.groups, w2.shape[1]
                sv = s.reshape(g, 1, cg, *([1] * (w2.ndim - 2)))
                w2n = (w2.reshape(g, w2.shape[0] // g, cg, *w2.shape[2:]) * sv).reshape(w2.shape)
            else:
                shape2 = [1, 1]
                shape2[1 - row_axis(lb)] = ch
                w2n = w2 * s.reshape(shape2)
            put(b.input[1], w2n)
    return model, len(pairs)

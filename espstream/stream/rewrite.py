"""The graph rewrite: turn an analysed offline graph into the streaming graph for one chunk size.

Rules, in the order they run:
1. The rules' `fix` callbacks: time padding to zero, Reshape targets and Slice bounds for one
   chunk, ConvTranspose output crops, last-frame Gather indices.
2. Masks: a tensor whose pre-start frames must read as zero is multiplied by a 0/1 start mask.
   The mask is a StreamingCache over a constant of ones (its zero state is the mask's zeros), so
   the model stays made of ESP-DL operators (StreamingCache, Slice, Mul). In a QDQ model the
   ones are integers of the masked tensor's type (int8; int16 in a 16-bit model) at scale 1.
3. Caches: per tensor, ONE StreamingCache sized for the consumer that reaches furthest back
   (`max(back)` past frames); every consumer gets a Slice of exactly the frames it reads
   (`[p0 - back, p0 + c - drop)`) or the cache output itself. Delay alignment of merging
   branches and last-M windows are consumers like any other.
4. Quantized tensors: a cache is placed on the DequantizeLinear output (so its frames carry that
   tensor's exponent) and each consumer's frames pass through a Quantize/DequantizeLinear pair
   with the same scale and zero point (exact: the values are already on that grid), so every
   integer activation still passes Q -> DQ and no existing pair is split. A mask is quantized
   with scale 1 and a masked tensor is requantized to its own scale.
5. Recurrent layers: the hidden (and cell) state becomes a state input fed as initial_h
   (initial_c) and a state output copied from Y_h (Y_c).
6. Every state is a graph input `<name>.state` paired with a graph output `<name>.next_state`;
   graph inputs get the chunk's frames on their time axis (batch 1), outputs their chunk shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from espstream.stream.axes import Summary, Time
from espstream.stream.cache import DOMAIN, OP
from espstream.stream.rules import Ctx


@dataclass
class StatePair:
    input: gs.Variable
    output: gs.Variable
    tensor: str
    kind: str
    frames: int
    frame_elems: int
    consumers: list[dict[str, Any]] = field(default_factory=list)
    separate_frames: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "state": [self.input.name, self.output.name],
            "window": self.frames + 1 if self.kind != "recurrent" else None,
            "frames": self.frames,
            "frame_elements": self.frame_elems,
            "bytes_float32": self.frames * self.frame_elems * 4,
            "bytes_int8": self.frames * self.frame_elems,
            "consumers": self.consumers,
            "bytes_float32_one_cache_per_consumer": self.separate_frames * self.frame_elems * 4,
        }


def _qparams(t: gs.Tensor):
    """(scale, zero_point) of a per-tensor DequantizeLinear producing `t`, else None."""
    if len(t.inputs) != 1 or t.inputs[0].op != "DequantizeLinear":
        return None
    dq = t.inputs[0]
    scale = dq.inputs[1]
    shape = scale.shape if scale.shape is not None else []
    if isinstance(scale, gs.Constant):
        shape = list(scale.values.shape)
    if int(np.prod(shape or [1])) != 1:
        return None
    zp = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
    return scale, zp


class Rewriter:
    def __init__(self, ctx: Ctx, chunk: int):
        self.ctx = ctx
        self.g = ctx.graph
        self.chunk = chunk
        self.states: list[StatePair] = []
        self._names: set[str] = set(self.g.tensors().keys())
        self._masks: dict[tuple, gs.Variable] = {}

    # -- small builders ------------------------------------------------------------------
    def name(self, base: str) -> str:
        n, k = base, 1
        while n in self._names:
            k += 1
            n = f"{base}.{k}"
        self._names.add(n)
        return n

    def node(self, op: str, inputs, n_out: int = 1, domain: str | None = None, **attrs):
        outs = [gs.Variable(self.name(f"{inputs[0].name}.{op.lower()}")) for _ in range(n_out)]
        for o in outs:
            o.dtype = np.float32 if op != "QuantizeLinear" else None
        node = gs.Node(op, self.name(f"stream/{op}"), attrs, list(inputs), outs)
        if domain:
            node.domain = domain
        self.g.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    def const(self, base: str, arr) -> gs.Constant:
        return gs.Constant(self.name(base), np.asarray(arr))

    def qdq(self, t: gs.Variable, qp) -> gs.Variable:
        scale, zp = qp
        ins = [t, scale] + ([zp] if zp is not None else [])
        q = self.node("QuantizeLinear", ins)
        q.dtype = None
        return self.node("DequantizeLinear", [q, scale] + ([zp] if zp is not None else []))

    def slice(self, t: gs.Variable, lo: int, hi: int, axis: int) -> gs.Variable:
        return self.node(
            "Slice",
            [
                t,
                self.const(f"{t.name}.starts", np.array([lo], np.int64)),
                self.const(f"{t.name}.ends", np.array([hi], np.int64)),
                self.const(f"{t.name}.axes", np.array([axis], np.int64)),
            ],
        )

    def cache(self, x: gs.Variable, frames: int, axis: int, shape: list[int], tensor: str,
              kind: str, elems: int) -> tuple[gs.Variable, StatePair]:
        sshape = list(shape)
        sshape[axis] = frames
        sin = gs.Variable(self.name(f"{tensor}.state"), dtype=np.float32, shape=sshape)
        sout = gs.Variable(self.name(f"{tensor}.next_state"), dtype=np.float32, shape=sshape)
        y = gs.Variable(self.name(f"{tensor}.window"), dtype=np.float32)
        node = gs.Node(
            OP, self.name(f"stream/cache/{tensor}"), {"window_size": frames + 1, "axis": axis},
            [x, sin], [y, sout],
        )
        node.domain = DOMAIN
        self.g.nodes.append(node)
        pair = StatePair(sin, sout, tensor, kind, frames, elems)
        self.states.append(pair)
        return y, pair

    # -- the steps -----------------------------------------------------------------------
    def chunk_of(self, inf: Time) -> int:
        c = Fraction(self.chunk) / inf.stride
        assert c.denominator == 1, "chunk validity is checked before the rewrite"
        return int(c)

    def chunk_shape(self, name: str, inf: Time) -> list[int]:
        shape = list(self.ctx.shapes[name])
        shape[inf.axis] = self.chunk_of(inf)
        return shape

    def mask(self, name: str, inf: Time, qp_of_x) -> gs.Variable:
        rank = len(self.ctx.shapes[name])
        c = self.chunk_of(inf)
        quant = qp_of_x is not None
        # the masked tensor's integer type (int8, or int16 in a 16-bit model): ESP-DL's Mul
        # takes operands of one type
        zp = qp_of_x[1] if quant else None
        itype = np.dtype(zp.values.dtype) if isinstance(zp, gs.Constant) else np.dtype(np.int8)
        key = (rank, inf.axis, c, inf.delay, quant and itype.name)
        if key in self._masks:
            return self._masks[key]
        shape = [1] * rank
        shape[inf.axis] = c
        if quant:  # integer ones at exponent 0, so the cache reads a DequantizeLinear as usual
            sfx = "" if itype == np.int8 else f".{itype.name}"
            qp = (self.const("mask.scale", np.array(1.0, np.float32)),
                  self.const(f"mask.zero_point{sfx}", np.array(0, itype)))
            q1 = self.const(f"mask{inf.delay}.ones_q{sfx}", np.ones(shape, itype))
            ones = self.node("DequantizeLinear", [q1, *qp])
        else:
            ones = self.const(f"mask{inf.delay}.ones", np.ones(shape, np.float32))
        y, pair = self.cache(ones, inf.delay, inf.axis, shape, f"mask{inf.delay}x{c}", "mask", 1)
        pair.consumers.append({"tensor": name})
        m = self.slice(y, 0, c, inf.axis)
        if quant:
            m = self.qdq(m, qp)
        self._masks[key] = m
        return m

    def run(self) -> list[StatePair]:
        ctx = self.ctx
        for f in ctx.fixes:
            f(self.chunk)
        tensors = self.g.tensors()
        for name in sorted(set(ctx.reqs) | ctx.masks):
            x = tensors[name]
            inf = ctx.info[name]
            assert isinstance(inf, Time)
            qp = _qparams(x)
            src = x
            if name in ctx.masks:
                src = self.node("Mul", [x, self.mask(name, inf, qp)])
                if qp is not None:
                    src = self.qdq(src, qp)
            self._serve(name, x, src, inf, qp, ctx.reqs.get(name, []))
        for rec in ctx.recurrent:
            self._recurrent(rec)
        return self.states

    def _serve(self, name, x, src, inf: Time, qp, reqs) -> None:
        c = self.chunk_of(inf)
        shape = self.chunk_shape(name, inf)
        elems = math.prod(d for i, d in enumerate(shape) if i != inf.axis)
        resolved = [(r, *r.resolve(c)) for r in reqs]
        frames = max([0] + [b for _r, b, _d in resolved])
        base, pair = src, None
        if frames > 0:
            kinds = sorted({r.kind for r, _b, _d in resolved})
            base, pair = self.cache(src, frames, inf.axis, shape, name, "+".join(kinds), elems)
            pair.separate_frames = sum(max(b, 0) for _r, b, _d in resolved)
        total = frames + c
        made: dict[tuple[int, int], gs.Variable] = {}
        for r, back, drop in resolved:
            lo, hi = frames - back, frames + c - drop
            assert 0 <= lo < hi <= total, (name, lo, hi, total)
            key = (lo, hi)
            if key not in made:
                t = base if (lo, hi) == (0, total) else self.slice(base, lo, hi, inf.axis)
                if qp is not None and t is not x:
                    t = self.qdq(t, qp)
                made[key] = t
            slot = r.consumer.inputs[r.index]
            assert slot is x, (r.consumer.name, r.index, slot.name, name)
            r.consumer.inputs[r.index] = made[key]
            if pair is not None:
                pair.consumers.append(
                    {"node": r.consumer.name, "kind": r.kind, "frames": max(back, 0)}
                )

    def _recurrent(self, rec) -> None:
        node = rec.node
        for k, (slot, out_slot, shape, *explicit) in enumerate(rec.slots):
            base = f"{node.name or node.outputs[0].name}.{'hc'[k]}"
            if explicit:  # the model's own state input / output become the pair
                sin, sout = explicit
                self.g.inputs.remove(sin)
                self.g.outputs.remove(sout)
                sin.shape, sout.shape = list(shape), list(shape)
                sout.dtype = sout.dtype or np.float32
                pair = StatePair(sin, sout, base, "recurrent", 1, math.prod(shape))
                pair.consumers.append({"node": node.name, "kind": "recurrent", "frames": 1})
                self.states.append(pair)
                continue
            sin = gs.Variable(self.name(f"{base}.state"), dtype=np.float32, shape=shape)
            while len(node.inputs) <= slot:
                node.inputs.append(gs.Variable.empty())
            node.inputs[slot] = sin
            while len(node.outputs) <= out_slot:
                node.outputs.append(gs.Variable.empty())
            if not node.outputs[out_slot].name:
                node.outputs[out_slot] = gs.Variable(self.name(f"{base}.last"), dtype=np.float32)
            sout = gs.Variable(self.name(f"{base}.next_state"), dtype=np.float32, shape=shape)
            self.g.nodes.append(
                gs.Node("Identity", self.name("stream/Identity"), {}, [node.outputs[out_slot]],
                        [sout])
            )
            pair = StatePair(sin, sout, base, "recurrent", 1, math.prod(shape))
            pair.consumers.append({"node": node.name, "kind": "recurrent", "frames": 1})
            self.states.append(pair)


def finish_io(ctx: Ctx, chunk: int, states: list[StatePair], input_axes: dict[str, int]) -> None:
    """Graph inputs/outputs for one chunk; states appended; intermediate shapes cleared."""
    g = ctx.graph
    io = set()
    for t in g.inputs:
        inf = ctx.info.get(t.name)
        shape = list(ctx.shapes[t.name])
        if isinstance(inf, Time):
            shape[inf.axis] = int(Fraction(chunk) / inf.stride)
        t.shape = shape
        io.add(t.name)
    for t in g.outputs:
        inf = ctx.info.get(t.name)
        shape = list(ctx.shapes[t.name])
        if isinstance(inf, Time):
            shape[inf.axis] = int(Fraction(chunk) / inf.stride)
        t.shape = shape
        if t.dtype is None:
            t.dtype = np.float32
        io.add(t.name)
    for p in states:
        g.inputs.append(p.input)
        g.outputs.append(p.output)
        io.update((p.input.name, p.output.name))
    for t in g.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in io:
            t.shape = None


__all__ = ["Rewriter", "StatePair", "finish_io", "Summary"]

"""The streaming rules' mechanics, the rules several operators share, and the dispatch.

Each operator's rule is named by its module of `espstream.ops` (`OpSpec.stream`); the rules
that belong to one operator live there, the shared ones (windows, pointwise, broadcast,
reductions, normalizations) here. `apply_rule` dispatches through the registry.

Each rule reads the offline node and what its inputs carry along time (see `axes`), decides
what its outputs carry, and records what the rewrite must do: a window of past frames on an
input (a `Req`, served by a shared StreamingCache), zeroing of pre-start frames (a mask),
attribute and constant changes that need the chunk size (`fix`), recurrent state. Rules never
change the graph during the analysis except through `fix` callbacks run by the rewrite.

Conventions for a window on input X of a node (`Req(back, drop)`): in every call the node reads
X's stream frames `[p0 - back, p0 + c - drop)` where `p0` is the first frame of the chunk and `c`
the chunk length of X; a cache keeps `max(back)` past frames (zero at start).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.stream.axes import WARM_ALL, Consts, ShapeOf, Summary, Time

INT_MAX = 2**63 - 1


@dataclass
class Req:
    consumer: gs.Node
    index: int
    back: int = 0
    drop: int = 0
    last: int | None = None  # "the last M frames": resolved to back = M - c when c is known
    kind: str = "window"

    def resolve(self, c: int) -> tuple[int, int]:
        if self.last is not None:
            return self.last - c, 0
        return self.back, self.drop


@dataclass
class Recurrent:
    node: gs.Node
    # (input slot, output slot, state shape[, explicit graph input, graph output])
    slots: list[tuple]


@dataclass
class Ctx:
    graph: gs.Graph
    consts: Consts
    shapes: dict[str, list[int]]
    opset: int
    info: dict[str, object] = field(default_factory=dict)
    reqs: dict[str, list[Req]] = field(default_factory=dict)
    masks: set[str] = field(default_factory=set)
    multiples: dict[int, str] = field(default_factory=dict)
    fixes: list[Callable[[int], None]] = field(default_factory=list)
    recurrent: list[Recurrent] = field(default_factory=list)
    pending_pad: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    frames: int = 0  # input frames at the analysis length

    # -- helpers used by the rules -------------------------------------------------------
    def ends_aligned(self, xt: Time) -> bool:
        """After the last chunk of a sequence (a whole number of chunks), the stream's newest
        frame of this tensor is the offline tensor's last frame, reproduced exactly."""
        produced = Fraction(self.frames) / xt.stride - xt.delay
        return produced == xt.length and xt.valid >= xt.length

    def get(self, t: gs.Tensor | None):
        if t is None or not t.name:
            return None
        return self.info.get(t.name)

    def set(self, t: gs.Tensor, info) -> None:
        if t.name:
            self.info[t.name] = info

    def length(self, t: gs.Tensor, axis: int) -> int:
        return self.shapes[t.name][axis]

    def need_multiple(self, stride: Fraction, node: gs.Node) -> None:
        """The chunk must split into whole frames of a tensor at `stride` input frames each."""
        m = Fraction(stride).numerator
        if m > 1 and m not in self.multiples:
            self.multiples[m] = f"{node.op} {node.name!r}"

    def req(self, t: gs.Tensor, r: Req) -> None:
        self.reqs.setdefault(t.name, []).append(r)

    def fix(self, f: Callable[[int], None]) -> None:
        self.fixes.append(f)


def unsupported(node: gs.Node, why: str) -> UserError:
    return UserError(
        f"node {node.name!r} ({node.op}) {why}; no streaming rule covers it: describe the "
        "tensor with --overrides FILE.json (a window, axis or delay; see `espstream streamify "
        "--help`)"
    )


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def rank_of(ctx: Ctx, t: gs.Tensor) -> int:
    return len(ctx.shapes[t.name])


# =========================================================================================
# The window arithmetic shared by Conv, pools, Pad and Slice
# =========================================================================================


def plan_window(
    ctx: Ctx,
    node: gs.Node,
    index: int,
    x: gs.Tensor,
    xt: Time,
    out: gs.Tensor,
    out_axis: int,
    K: int,
    s: int,
    left: int,
    neutral_left: int,
) -> Time:
    """Stream an op whose output frame t reads input frames `t*s - left + j` for j < K.

    1. The chunk of x must hold a whole number of strides: the chunk size must be a multiple of
       `stride(x) * s`.
    2. The op runs with no padding on the time axis and reads `K - 1 + c` frames: `K - 1 + e`
       past frames from the cache, the chunk minus its last `e` frames, where `e` (0 <= e)
       is the least value that puts every window on the offline phase
       (`K - 1 + e + delay(x) - left` divisible by `s` and not negative).
    3. The output lags by `delay = (K - 1 + e + delay(x) - left) / s` frames; future padding
       (`left < K - 1`) shows up here as delay instead of being refused.
    4. Past padding is the cache's zero start. Where the op reads pre-start frames of a delayed,
       dirty x as padding, x's pre-start frames are masked to zero first.
    5. `neutral_left` frames of the left padding are literal zeros; the rest (MaxPool's -inf,
       exclusive AveragePool's uncounted taps) differ from a zero cache: the first
       `ceil(own pads / s)` output frames count as warm-up, and warm-up of x spreads by the window.
    6. Offline frame t is reproduced (valid) when its window ends before x's first invalid frame.
    """
    ctx.need_multiple(xt.stride * s, node)
    base = K - 1 + xt.delay - left
    e = (-base) % s
    while base + e < 0:
        e += s
    back = K - 1 + e
    mask = left > 0 and xt.delay > 0 and xt.dirty
    if back or e or mask:
        ctx.req(x, Req(node, index, back, e))
    if mask:
        ctx.masks.add(x.name)
    own = left - neutral_left
    bad_end = None
    if xt.warmup > 0:
        bad_end = xt.warmup
    elif own > 0:
        bad_end = -neutral_left
    if xt.warmup >= WARM_ALL:
        warm = WARM_ALL
    elif bad_end is None:
        warm = 0
    else:
        warm = max(0, -((-(bad_end + left)) // s))
    t_out = ctx.length(out, out_axis)
    valid = min(t_out, max(0, (xt.valid - K + left) // s + 1))
    d = (base + e) // s
    return Time(
        axis=out_axis,
        stride=xt.stride * s,
        delay=d,
        dirty=d > 0,
        warmup=warm,
        valid=valid,
        length=t_out,
    )


# =========================================================================================
# Rules
# =========================================================================================


def conv_geometry(ctx: Ctx, node: gs.Node, x: gs.Tensor, axis: int):
    rank = rank_of(ctx, x)
    nsp = rank - 2
    i = axis - 2
    if node.op in ("Conv", "ConvTranspose"):
        w = node.inputs[1]
        kshape = node.attrs.get("kernel_shape") or list(ctx.shapes[w.name][2:])
    else:
        kshape = node.attrs["kernel_shape"]
    dils = node.attrs.get("dilations") or [1] * nsp
    strides = node.attrs.get("strides") or [1] * nsp
    pads = list(node.attrs.get("pads") or [0] * (2 * nsp))
    if not (len(kshape) == len(dils) == len(strides) == nsp and len(pads) == 2 * nsp):
        raise UserError(
            f"node {node.name!r} ({node.op}): its kernel ({len(kshape)}-D), dilations, strides "
            f"or pads do not fit its rank-{rank} input; the model is malformed (does it run in "
            "onnxruntime?)")
    k = int(kshape[i])
    dil = int(dils[i])
    st = int(strides[i])
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER") and node.op != "ConvTranspose":
        xs = ctx.shapes[x.name]
        ks = [(int(kshape[j]) - 1) * int((node.attrs.get("dilations") or [1] * nsp)[j]) + 1
              for j in range(nsp)]
        sts = [int(v) for v in (node.attrs.get("strides") or [1] * nsp)]
        pads = [0] * (2 * nsp)
        for j in range(nsp):
            total = max(0, (math.ceil(xs[2 + j] / sts[j]) - 1) * sts[j] + ks[j] - xs[2 + j])
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[j], pads[j + nsp] = lo, total - lo
    elif auto == "VALID":
        pads = [0] * (2 * nsp)
    return k, dil, st, pads, i, nsp


def _set_time_pads(node: gs.Node, pads: list[int], i: int, nsp: int) -> Callable[[int], None]:
    def f(c: int) -> None:
        p = list(pads)
        p[i] = p[i + nsp] = 0
        node.attrs["pads"] = p
        if "auto_pad" in node.attrs:
            node.attrs["auto_pad"] = "NOTSET"
        if node.op in ("MaxPool", "AveragePool"):
            node.attrs["ceil_mode"] = 0

    return f


def rule_conv(ctx: Ctx, node: gs.Node) -> None:
    """Conv, AveragePool, MaxPool (and LpPool) with the time axis among the spatial axes.

    1. Time on the batch axis (frames processed independently): pass through.
    2. Time on the channel axis: unsupported.
    3. Otherwise `plan_window` with K = dilation * (kernel - 1) + 1, the op's stride, and its
       left padding plus that of an explicit constant zero Pad folded in front of it (those are
       literal zeros, so neutral for every op).
    4. Neutral padding: Conv and AveragePool(count_include_pad=1) pad with zero, as the cache
       does. MaxPool pads with -inf: neutral only when its input is known non-negative (ReLU,
       Sigmoid, ... in front). AveragePool(count_include_pad=0) is never neutral. Otherwise the
       report names the leading frames that may differ (ESP-DL's caches start at zero).
    5. The streaming op gets zero time padding (and ceil_mode 0, auto_pad NOTSET).
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    for extra in node.inputs[1:]:
        if isinstance(ctx.get(extra), (Time, Summary)):
            raise unsupported(node, "takes its weights from the data")
    if xt.axis == 0:
        return pass_to_outputs(ctx, node, xt, keep_nonneg=node.op == "MaxPool")
    if xt.axis == 1:
        raise unsupported(node, "mixes frames: the time axis is its channel axis")
    k, dil, st, pads, i, nsp = conv_geometry(ctx, node, x, xt.axis)
    lit_l, _lit_r = ctx.pending_pad.get(x.name, (0, 0))
    K = dil * (k - 1) + 1
    left = pads[i] + lit_l
    neutral = lit_l
    if node.op == "Conv" or (
        node.op == "AveragePool" and int(node.attrs.get("count_include_pad", 0)) == 1
    ):
        neutral = left
    elif node.op == "MaxPool" and xt.nonneg:
        neutral = left
    out = node.outputs[0]
    res = plan_window(ctx, node, 0, x, xt, out, xt.axis, K, st, left, neutral)
    if node.op == "MaxPool":
        res = res.but(nonneg=xt.nonneg)
    elif node.op == "AveragePool":
        res = res.but(nonneg=xt.nonneg)
    if res.warmup and not xt.warmup:
        ctx.notes.append(
            f"{node.op} {node.name!r}: its padding is not zero-neutral and ESP-DL caches start at "
            f"zero, so its first {res.warmup} output frame(s) may differ from offline"
        )
    ctx.set(out, res)
    for extra_out in node.outputs[1:]:  # MaxPool Indices
        if extra_out.name and extra_out.outputs:
            raise unsupported(node, "returns Indices along time")
    ctx.fix(_set_time_pads(node, pads, i, nsp))


def slice_output(ctx: Ctx, node: gs.Node, slot: int, axis: int, start: int, end: int) -> None:
    """Insert a Slice [start, end) along `axis` behind node.outputs[slot]."""
    out = node.outputs[slot]
    raw = gs.Variable(out.name + "__full", dtype=out.dtype)
    node.outputs[slot] = raw
    consts = [
        gs.Constant(f"{out.name}__crop_{n}", np.array(v, dtype=np.int64))
        for n, v in (("starts", [start]), ("ends", [end]), ("axes", [axis]))
    ]
    ctx.graph.nodes.append(
        gs.Node("Slice", name=f"{node.name}__crop", inputs=[raw, *consts], outputs=[out])
    )


# ---- pointwise ----------------------------------------------------------------------------


def unary_time(ctx: Ctx, node: gs.Node) -> Time | None:
    """The time facts of a one-input elementwise node's input, or None when `rule_unary` will
    not treat it as one (no time axis on input 0, or a time input among the others)."""
    xt = ctx.get(node.inputs[0])
    if not isinstance(xt, Time):
        return None
    if any(isinstance(ctx.get(extra), (Time, Summary)) for extra in node.inputs[1:]):
        return None
    return xt


def rule_unary(ctx: Ctx, node: gs.Node, zero: bool | None = None,
               nonneg: bool | None = None) -> None:
    """Elementwise ops of one time input (activations, Cast, Q/DQ, BatchNormalization, ...).

    1. The output carries the input's time axis, stride, delay, warm-up and valid frames.
    2. Pre-start frames stay zero only through ops with f(0) = 0 (the operator's
       `zero_keeping`; `zero` overrides it where it depends on attributes, e.g. Clip's range).
    3. Non-negativity (for MaxPool's neutral padding) comes from the operator's `nonneg`, or
       from a non-negative input through an op that keeps the sign (`keep_sign`); `nonneg`
       overrides both.
    4. A time tensor on another input makes it a broadcast (`rule_broadcast`).
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    if unary_time(ctx, node) is None:
        return rule_broadcast(ctx, node)
    from espstream.ops import registry

    spec = registry.op(node.op)
    if zero is None:
        zero = spec is not None and spec.zero_keeping
    if nonneg is None:
        nonneg = spec is not None and (spec.nonneg or (xt.nonneg and spec.keep_sign))
    out = node.outputs[0]
    ctx.set(out, xt.but(dirty=xt.dirty if zero else xt.delay > 0, nonneg=nonneg))


def rule_mixes_all(ctx: Ctx, node: gs.Node) -> None:
    """Ops that combine every frame of their input (global pools, instance / group norms,
    CumSum): refused on a time input; the generic rule otherwise."""
    if isinstance(ctx.get(node.inputs[0]), Time):
        raise unsupported(node, "mixes every frame of the time axis")
    return generic(ctx, node)


def static_broadcasts_time(ctx: Ctx, t: gs.Tensor, out_rank: int, out_axis: int) -> bool:
    shape = ctx.shapes.get(t.name)
    if shape is None:
        return False
    pos = out_axis - (out_rank - len(shape))
    return 0 <= pos < len(shape) and shape[pos] != 1


def rule_broadcast(ctx: Ctx, node: gs.Node) -> None:
    """Elementwise ops of several inputs (Add, Sub, Mul, Div, Max, Min, Sum, Mean, Where, Pow...)
    and Concat on another axis: the place where branches meet.

    1. Every time input must land on the same output axis and run at the same stride.
    2. A constant that varies along time (e.g. a positional table) cannot stream: refused.
    3. A summary (window/recurrent state) mixed with a time tensor: refused.
    4. Delay alignment: inputs with less delay than the most delayed one are delayed by a cache
       (`Req(back=drop=difference)`) so that frames line up, as offline.
    5. Pre-start frames: Mul stays clean if any input is clean; Add/Sub/Sum/Concat stay clean
       when every input is clean and no constant is added; other ops are dirty when delayed.
    6. Warm-up is the largest of the inputs', valid frames the fewest.
    """
    outs = node.outputs
    out = outs[0]
    out_rank = len(ctx.shapes[out.name])
    times = []
    for k, t in enumerate(node.inputs):
        inf = ctx.get(t)
        if isinstance(inf, Summary):
            if any(isinstance(ctx.get(u), Time) for u in node.inputs):
                raise unsupported(node, "mixes a window summary with per-frame data")
        if isinstance(inf, Time):
            times.append((k, t, inf))
    if not times:
        return generic(ctx, node)
    concat_axis = None
    if node.op == "Concat":
        concat_axis = norm_axis(int(node.attrs["axis"]), out_rank)
    axes = set()
    for _k, t, inf in times:
        axes.add(inf.axis + out_rank - rank_of(ctx, t) if node.op != "Concat" else inf.axis)
    if len(axes) != 1:
        raise unsupported(node, "combines tensors whose time axes do not line up")
    oaxis = axes.pop()
    if concat_axis is not None and concat_axis == oaxis:
        raise unsupported(node, "concatenates along the time axis")
    strides = {inf.stride for _k, _t, inf in times}
    if len(strides) != 1:
        raise unsupported(node, "combines branches at different frame rates")
    static_add = False
    for t in node.inputs:
        if t.name and ctx.get(t) is None:
            if node.op != "Concat" and static_broadcasts_time(ctx, t, out_rank, oaxis):
                raise unsupported(node, "combines frames with a constant that varies along time")
            static_add = True
    D = max(inf.delay for _k, _t, inf in times)
    own_dirty = []
    for k, t, inf in times:
        if inf.delay < D:
            ctx.req(t, Req(node, k, D - inf.delay, D - inf.delay, kind="delay"))
        own_dirty.append(inf.dirty and inf.delay > 0)
    if node.op == "Mul":
        dirty = all(own_dirty) and D > 0
    elif node.op in ("Add", "Sub", "Sum", "Concat"):
        dirty = D > 0 and (any(own_dirty) or (static_add and node.op != "Concat"))
    else:
        dirty = D > 0
    warm = max(inf.warmup for _k, _t, inf in times)
    valid = min(inf.valid for _k, _t, inf in times)
    nonneg = node.op in ("Max",) and any(inf.nonneg for _k, _t, inf in times)
    if node.op == "Mul" or node.op == "Concat":
        nonneg = all(inf.nonneg for _k, _t, inf in times) and len(times) == len(node.inputs)
    length = ctx.length(out, oaxis)
    res = Time(
        axis=oaxis,
        stride=times[0][2].stride,
        delay=D,
        dirty=dirty,
        warmup=warm,
        valid=min(valid, length),
        length=length,
        nonneg=nonneg,
    )
    for o in outs:
        ctx.set(o, res)


# ---- data movement that moves the time axis ---------------------------------------------


def pass_to_outputs(ctx: Ctx, node: gs.Node, xt: Time, keep_nonneg: bool = False) -> None:
    for o in node.outputs:
        if o.name:
            ctx.set(
                o,
                xt.but(
                    length=ctx.length(o, xt.axis),
                    nonneg=xt.nonneg and keep_nonneg,
                    dirty=xt.delay > 0,
                ),
            )


def axes_input_or_attr(ctx: Ctx, node: gs.Node, rank: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = ctx.consts.ints(node.inputs[1])
        if v is None:
            raise unsupported(node, "takes non-constant axes")
        return [norm_axis(a, rank) for a in v]
    a = node.attrs.get("axes")
    return None if a is None else [norm_axis(int(v), rank) for v in a]


def _reduce_axes(ctx: Ctx, node: gs.Node, rank: int) -> list[int]:
    axes = None
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = ctx.consts.ints(node.inputs[1])
        if axes is None:
            raise unsupported(node, "reduces over non-constant axes")
    elif "axes" in node.attrs:
        axes = list(node.attrs["axes"])
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return []
        return list(range(rank))
    return [norm_axis(int(a), rank) for a in axes]


def rule_reduce(ctx: Ctx, node: gs.Node) -> None:
    """Reduce* and ArgMax/ArgMin.

    1. Over the time axis: refused (give the input a `window` override to reduce the last W
       frames every call).
    2. Over other axes: pass through, the time axis shifting when keepdims=0.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    rank = rank_of(ctx, x)
    if node.op in ("ArgMax", "ArgMin"):
        axes = [norm_axis(int(node.attrs.get("axis", 0)), rank)]
    else:
        axes = _reduce_axes(ctx, node, rank)
    if xt.axis in axes:
        raise unsupported(node, "reduces over the time axis")
    keep = int(node.attrs.get("keepdims", 1))
    axis = xt.axis if keep else xt.axis - sum(1 for a in axes if a < xt.axis)
    ctx.set(node.outputs[0], xt.but(axis=axis, dirty=xt.delay > 0, nonneg=False))


def rule_softmax(ctx: Ctx, node: gs.Node) -> None:
    """Softmax, LogSoftmax, Hardmax, LayerNormalization, LpNormalization.

    1. Normalising over the time axis (opset < 13 Softmax: over every axis from `axis` on;
       LayerNormalization: axes from `axis` on) is refused.
    2. Otherwise pointwise in time.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    rank = rank_of(ctx, x)
    default = -1 if (ctx.opset >= 13 or node.op == "LayerNormalization") else 1
    ax = norm_axis(int(node.attrs.get("axis", default)), rank)
    if node.op == "LayerNormalization" or (ctx.opset < 13 and node.op != "LpNormalization"):
        mixes = xt.axis >= ax
    else:
        mixes = xt.axis == ax
    if mixes:
        raise unsupported(node, "normalises over the time axis")
    for o in node.outputs:
        if o.name:
            ctx.set(o, xt.but(dirty=xt.delay > 0, nonneg=node.op == "Softmax"))


def generic(ctx: Ctx, node: gs.Node) -> None:
    """Nodes without time inputs: static stays static, a summary stays a summary, a shape taint
    spreads. A node whose data input has a time axis and no rule: refused."""
    infos = [ctx.get(t) for t in node.inputs]
    if any(isinstance(i, Time) for i in infos):
        raise unsupported(node, "reads a tensor with a time axis")
    if any(isinstance(i, Summary) for i in infos):
        comparable = all(i.comparable for i in infos if isinstance(i, Summary))
        lag = max(i.lag for i in infos if isinstance(i, Summary))
        warm = any(i.warm for i in infos if isinstance(i, Summary))
        for o in node.outputs:
            ctx.set(o, Summary(lag=lag, warm=warm, comparable=comparable))
        return
    if any(isinstance(i, ShapeOf) for i in infos):
        src = next(i for i in infos if isinstance(i, ShapeOf))
        for o in node.outputs:
            ctx.set(o, src)




def apply_rule(ctx: Ctx, node: gs.Node) -> None:
    """Run the operator's streaming rule for `node` (from `espstream.ops.registry`).

    1. A node none of whose inputs carries time, a summary or a data shape is left alone.
    2. Rules marked `stream_first` (Reshape, ops mixing all frames) run on a time input before
       rule 3, whatever the node's domain.
    3. A node mixing the shape of a time tensor with time data is refused.
    4. Nodes of other domains, and operators without a rule, take the generic rule.
    """
    from espstream.ops import registry

    infos = [ctx.get(t) for t in node.inputs]
    if not any(isinstance(i, (Time, Summary, ShapeOf)) for i in infos):
        return
    spec = registry.op(node.op)
    if (spec is not None and spec.stream is not None and spec.stream_first
            and infos and isinstance(infos[0], Time)):
        return spec.stream(ctx, node)
    for k, i in enumerate(infos):
        if isinstance(i, ShapeOf) and any(isinstance(j, (Time, Summary)) for j in infos):
            raise unsupported(
                node,
                f"uses the shape of time tensor {i.source!r} (input {k}); fix the shapes "
                "with `espstream optimize --input-shape`",
            )
    if node.domain not in (None, "", "ai.onnx") or spec is None or spec.stream is None:
        return generic(ctx, node)
    spec.stream(ctx, node)

"""The per-operator streaming rules.

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
    slots: list[tuple[int, int, list[int]]]  # (input slot, output slot, state shape)


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


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _rank(ctx: Ctx, t: gs.Tensor) -> int:
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


def _conv_geometry(ctx: Ctx, node: gs.Node, x: gs.Tensor, axis: int):
    rank = _rank(ctx, x)
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
        return _generic(ctx, node)
    for extra in node.inputs[1:]:
        if isinstance(ctx.get(extra), (Time, Summary)):
            raise unsupported(node, "takes its weights from the data")
    if xt.axis == 0:
        return _pass_to_outputs(ctx, node, xt, keep_nonneg=node.op == "MaxPool")
    if xt.axis == 1:
        raise unsupported(node, "mixes frames: the time axis is its channel axis")
    k, dil, st, pads, i, nsp = _conv_geometry(ctx, node, x, xt.axis)
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


def rule_conv_transpose(ctx: Ctx, node: gs.Node) -> None:
    """ConvTranspose with the time axis among the spatial axes (upsampling by its stride s).

    1. Input frame u adds to output frames `u*s - left + j*dilation`. The op runs on
       `ceil((K - 1) / s)` cached past frames plus the chunk, with no padding, and a Slice keeps
       the `c*s` output frames every input of which is in that span (output_padding is set to
       `s - K` when the kernel is shorter than the stride, so that span exists).
    2. Output stride is stride(x) / s; the output lags by `s * delay(x) + left` frames (the
       cropped `left` frames offline are pre-start frames of the stream).
    3. Pre-start frames of a dirty delayed x are masked: offline there is no input before 0.
    4. `output_shape` (pads derived from a target size) is refused.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    if xt.axis == 0:
        return _pass_to_outputs(ctx, node, xt)
    if xt.axis == 1:
        raise unsupported(node, "mixes frames: the time axis is its channel axis")
    if node.attrs.get("output_shape"):
        raise unsupported(node, "sets output_shape; give explicit pads instead")
    auto = node.attrs.get("auto_pad", "NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET",):
        raise unsupported(node, "uses auto_pad; give explicit pads instead")
    k, dil, s, pads, i, nsp = _conv_geometry(ctx, node, x, xt.axis)
    K = dil * (k - 1) + 1
    left = pads[i]
    E = -(-(K - 1) // s)
    if E:
        ctx.req(x, Req(node, 0, E, 0))
        if xt.delay > 0 and xt.dirty:
            ctx.masks.add(x.name)
    out = node.outputs[0]
    t_out = ctx.length(out, xt.axis)
    valid = min(t_out, max(0, xt.valid * s - left))
    warm = 0
    if xt.warmup >= WARM_ALL:
        warm = WARM_ALL
    elif xt.warmup > 0:
        warm = max(0, (xt.warmup - 1) * s - left + K)
    d = s * xt.delay + left
    ctx.set(
        out,
        Time(
            axis=xt.axis,
            stride=xt.stride / s,
            delay=d,
            dirty=d > 0,
            warmup=warm,
            valid=valid,
            length=t_out,
        ),
    )
    axis = xt.axis
    outpad_old = list(node.attrs.get("output_padding") or [0] * nsp)

    def fix(c: int) -> None:
        p = list(pads)
        p[i] = p[i + nsp] = 0
        node.attrs["pads"] = p
        op = list(outpad_old)
        op[i] = max(0, s - K)
        node.attrs["output_padding"] = op
        c_x = int(Fraction(c) / xt.stride)
        _slice_output(ctx, node, 0, axis, E * s, E * s + c_x * s)

    ctx.fix(fix)


def _slice_output(ctx: Ctx, node: gs.Node, slot: int, axis: int, start: int, end: int) -> None:
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


def _pad_values(ctx: Ctx, node: gs.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        return ctx.consts.ints(node.inputs[1])
    p = node.attrs.get("pads")
    return None if p is None else [int(v) for v in p]


_FOLD_THROUGH = {"QuantizeLinear", "DequantizeLinear", "Identity", "Dropout", "Cast"}


def _fold_target(pad_out: gs.Tensor) -> gs.Tensor | None:
    """The tensor a Pad's output reaches a Conv/Pool through (single-consumer Q/DQ chain)."""
    t = pad_out
    for _ in range(8):
        if len(t.outputs) != 1:
            return None
        n = t.outputs[0]
        if n.op in ("Conv", "AveragePool", "MaxPool") and n.inputs[0] is t:
            return t
        if n.op in _FOLD_THROUGH and n.inputs[0] is t and len(n.outputs) == 1:
            t = n.outputs[0]
            continue
        return None
    return None


def rule_pad(ctx: Ctx, node: gs.Node) -> None:
    """Pad with padding on the time axis.

    1. Only constant-mode padding with a zero value can be streamed on the time axis
       (reflect/edge read the sequence's ends).
    2. If the Pad's output reaches a single Conv/AveragePool/MaxPool (possibly through Q/DQ),
       its time padding is folded into that op's left padding as literal zeros: the Pad keeps
       only its other axes and the op's one cache serves both.
    3. Otherwise it streams as a window of one frame with `left` padding: past padding becomes a
       delay cache of that many zero frames, negative padding (a crop) becomes delay.
    4. Padding on other axes is untouched.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    pads = _pad_values(ctx, node)
    if pads is None:
        raise unsupported(node, "has padding that is not a constant")
    rank = _rank(ctx, x)
    axes = None
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = [_norm(a, rank) for a in ctx.consts.ints(node.inputs[3]) or []]
    full = [0] * (2 * rank)
    if axes is None:
        full = list(pads)
    else:
        for j, a in enumerate(axes):
            full[a], full[a + rank] = pads[j], pads[j + len(axes)]
    lo, hi = full[xt.axis], full[xt.axis + rank]
    out = node.outputs[0]
    if lo == 0 and hi == 0:
        ctx.set(out, xt.but(length=ctx.length(out, xt.axis)))
        return
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = 0.0
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = ctx.consts.value(node.inputs[2])
        value = None if v is None else float(np.asarray(v).reshape(-1)[0])
    if mode != "constant" or value != 0.0:
        raise unsupported(node, f"pads the time axis with mode {mode!r}, value {value}")
    target = _fold_target(out) if lo >= 0 else None
    if target is not None:
        ctx.set(out, xt)
        ctx.pending_pad[target.name] = (lo, hi)
        chain = out
        while chain is not target:
            chain = chain.outputs[0].outputs[0]
            ctx.pending_pad[chain.name] = (lo, hi)
    else:
        ctx.set(out, plan_window(ctx, node, 0, x, xt, out, xt.axis, 1, 1, lo, max(lo, 0)))

    def fix(c: int) -> None:
        new = list(full)
        new[xt.axis] = new[xt.axis + rank] = 0
        if axes is None:
            vals = new
        else:
            vals = [new[a] for a in axes] + [new[a + rank] for a in axes]
        if not any(vals):  # nothing left to pad: a no-op Pad would only cost a copy
            node.op, node.attrs = "Identity", {}
            while len(node.inputs) > 1:
                node.inputs.pop()
        elif len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1] = gs.Constant(node.name + "__pads", np.array(vals, dtype=np.int64))
        else:
            node.attrs["pads"] = vals

    ctx.fix(fix)


def _slice_params(ctx: Ctx, node: gs.Node, rank: int):
    if ctx.opset < 10 or len(node.inputs) == 1:
        starts = list(node.attrs.get("starts", []))
        ends = list(node.attrs.get("ends", []))
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
        return starts, ends, axes, steps
    starts = ctx.consts.ints(node.inputs[1])
    ends = ctx.consts.ints(node.inputs[2])
    if starts is None or ends is None:
        raise unsupported(node, "slices with non-constant starts/ends")
    axes = list(range(len(starts)))
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = ctx.consts.ints(node.inputs[3])
    steps = [1] * len(starts)
    if len(node.inputs) > 4 and node.inputs[4].name:
        steps = ctx.consts.ints(node.inputs[4])
    if axes is None or steps is None:
        raise unsupported(node, "slices with non-constant axes/steps")
    return starts, ends, [_norm(a, rank) for a in axes], steps


def rule_slice(ctx: Ctx, node: gs.Node) -> None:
    """Slice on the time axis (other axes are untouched).

    1. Full range, step 1: pass through.
    2. A negative start to the end with step 1 (`x[..., -M:]`): the last M frames, a window.
       A cache keeps `M - chunk` past frames when M exceeds the chunk; the output is a summary,
       recomputed every call, equal to offline after the last chunk (ESP-DL's tutorial head).
    3. A non-negative start `a`, step `st`, to the end or to an end-relative stop (a crop such as
       the chomp after a symmetric causal conv): `plan_window` with K = 1, stride st and left
       padding `-a`; the streaming Slice takes every st-th frame of what it is given.
    4. Anything else (the first M frames, a reversed time axis) is unsupported.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    for extra in node.inputs[1:]:
        if isinstance(ctx.get(extra), (Time, Summary, ShapeOf)):
            raise unsupported(node, "computes its bounds from the data")
    rank = _rank(ctx, x)
    starts, ends, axes, steps = _slice_params(ctx, node, rank)
    out = node.outputs[0]
    if xt.axis not in axes:
        ctx.set(out, xt.but(length=ctx.length(out, xt.axis)))
        return
    j = axes.index(xt.axis)
    a, b, st = starts[j], ends[j], steps[j]
    T = xt.length
    an = min(max(a + T if a < 0 else a, 0), T)
    bn = min(max(b + T if b < 0 else b, 0), T)
    if st == 1 and a < 0 and bn >= T:
        M = T - an
        ctx.req(x, Req(node, 0, last=M, kind="last"))
        comparable = ctx.ends_aligned(xt) and xt.warmup <= T - M
        why = "" if comparable else "the window lags the offline one or sees warm-up frames"
        ctx.set(out, Summary(lag=xt.delay, warm=xt.warmup > T - M, comparable=comparable, why=why))
        return
    if st == 1 and an == 0 and bn >= T:
        ctx.set(out, xt)
        return
    if st >= 1 and a >= 0 and (b >= T or b < 0):
        res = plan_window(ctx, node, 0, x, xt, out, xt.axis, 1, st, -an, 0)
        ctx.set(out, res)

        def fix(c: int) -> None:
            s2 = [0 if k == j else v for k, v in enumerate(starts)]
            e2 = [INT_MAX if k == j else v for k, v in enumerate(ends)]
            if ctx.opset < 10 or len(node.inputs) == 1:
                node.attrs["starts"], node.attrs["ends"] = s2, e2
                return
            node.inputs[1] = gs.Constant(node.name + "__starts", np.array(s2, dtype=np.int64))
            node.inputs[2] = gs.Constant(node.name + "__ends", np.array(e2, dtype=np.int64))

        ctx.fix(fix)
        return
    raise unsupported(node, f"keeps frames {a}:{b}:{st} of the time axis")


def rule_gather(ctx: Ctx, node: gs.Node) -> None:
    """Gather.

    1. On an axis other than time: pass through (the time axis shifts by the indices' rank - 1).
    2. On the time axis with every index the last frame (-1 or T-1): the last frame, a window
       of one frame (a summary); T-1 is rewritten as -1.
    3. Any other Gather along time: unsupported.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    if isinstance(ctx.get(node.inputs[1]), (Time, Summary)):
        raise unsupported(node, "gathers with data-dependent indices")
    rank = _rank(ctx, x)
    ax = _norm(int(node.attrs.get("axis", 0)), rank)
    idx = ctx.consts.value(node.inputs[1])
    out = node.outputs[0]
    if ax != xt.axis:
        r_idx = 0 if idx is None else np.ndim(idx)
        new_axis = xt.axis if xt.axis < ax else xt.axis + r_idx - 1
        ctx.set(out, xt.but(axis=new_axis, length=ctx.length(out, new_axis)))
        return
    T = xt.length
    if idx is None or not np.all((idx == -1) | (idx == T - 1)):
        raise unsupported(node, "picks frames along time (only the last frame streams)")
    comparable = ctx.ends_aligned(xt) and xt.warmup < T
    ctx.set(out, Summary(lag=xt.delay, warm=xt.warmup >= T, comparable=comparable))
    if np.any(idx == T - 1) and T != 0:
        arr = np.full(np.shape(idx), -1, dtype=np.asarray(idx).dtype)

        def fix(c: int) -> None:
            node.inputs[1] = gs.Constant(node.name + "__last", arr)

        ctx.fix(fix)


# ---- pointwise ----------------------------------------------------------------------------

UNARY = {
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Clip", "Erf",
    "Gelu", "Mish", "Sign", "Floor", "Ceil", "Round", "Cast", "Identity", "Dropout", "Not",
    "IsNaN", "IsInf", "Sin", "Cos", "ThresholdedRelu", "QuantizeLinear", "DequantizeLinear",
    "BatchNormalization", "Shrink", "CastLike", "Swish",
}
# f(0) == 0: pre-start zeros stay zeros
ZERO_KEEPING = {
    "Relu", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "Softsign", "HardSwish", "Neg", "Abs",
    "Erf", "Gelu", "Mish", "Sign", "Floor", "Ceil", "Round", "Cast", "Identity", "Dropout",
    "Sin", "Sqrt", "ThresholdedRelu", "Shrink", "CastLike", "Swish",
}
NONNEG = {"Relu", "Sigmoid", "Softplus", "Abs", "Exp", "HardSigmoid", "Sqrt"}
KEEP_SIGN = {"Identity", "Dropout", "Cast", "QuantizeLinear", "DequantizeLinear", "CastLike"}


def rule_unary(ctx: Ctx, node: gs.Node) -> None:
    """Elementwise ops of one time input (activations, Cast, Q/DQ, BatchNormalization, ...).

    1. The output carries the input's time axis, stride, delay, warm-up and valid frames.
    2. Pre-start frames stay zero only through ops with f(0) = 0 (ReLU, Tanh, ...; Q/DQ with a
       zero zero-point; Clip whose range holds 0).
    3. Non-negativity (for MaxPool's neutral padding) is known after ReLU, Sigmoid, Softplus,
       Abs, Exp, HardSigmoid, a Clip with min >= 0, and kept through Q/DQ, Cast, Identity.
    4. BatchNormalization and per-axis Q/DQ must not act along the time axis.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    rank = _rank(ctx, x)
    for extra in node.inputs[1:]:
        if isinstance(ctx.get(extra), (Time, Summary)):
            return rule_broadcast(ctx, node)
    if node.op == "BatchNormalization" and xt.axis == 1:
        raise unsupported(node, "normalises along the time axis")
    if node.op in ("QuantizeLinear", "DequantizeLinear"):
        sc = ctx.shapes.get(node.inputs[1].name, [])
        if len(sc) == 1 and sc[0] > 1:
            if _norm(int(node.attrs.get("axis", 1)), rank) == xt.axis:
                raise unsupported(node, "quantizes per frame along time")
    zero = node.op in ZERO_KEEPING
    nonneg = node.op in NONNEG or (xt.nonneg and node.op in KEEP_SIGN)
    if node.op in ("QuantizeLinear", "DequantizeLinear"):
        zp = ctx.consts.value(node.inputs[2]) if len(node.inputs) > 2 else None
        zero = zp is None or not np.any(zp)
    if node.op == "Clip":
        lo = _clip_bound(ctx, node, 1, "min", -np.inf)
        hi = _clip_bound(ctx, node, 2, "max", np.inf)
        zero = lo <= 0 <= hi
        nonneg = lo >= 0 or xt.nonneg
    out = node.outputs[0]
    ctx.set(out, xt.but(dirty=xt.dirty if zero else xt.delay > 0, nonneg=nonneg))


def _clip_bound(ctx: Ctx, node: gs.Node, slot: int, attr: str, default: float) -> float:
    if len(node.inputs) > slot and node.inputs[slot].name:
        v = ctx.consts.value(node.inputs[slot])
        return default if v is None else float(np.asarray(v).reshape(-1)[0])
    return float(node.attrs.get(attr, default))


def _static_broadcasts_time(ctx: Ctx, t: gs.Tensor, out_rank: int, out_axis: int) -> bool:
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
        return _generic(ctx, node)
    concat_axis = None
    if node.op == "Concat":
        concat_axis = _norm(int(node.attrs["axis"]), out_rank)
    axes = set()
    for _k, t, inf in times:
        axes.add(inf.axis + out_rank - _rank(ctx, t) if node.op != "Concat" else inf.axis)
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
            if node.op != "Concat" and _static_broadcasts_time(ctx, t, out_rank, oaxis):
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


def _pass_to_outputs(ctx: Ctx, node: gs.Node, xt: Time, keep_nonneg: bool = False) -> None:
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


def rule_transpose(ctx: Ctx, node: gs.Node) -> None:
    """Transpose: the time axis moves to where `perm` puts it (default: reversed axes)."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    rank = _rank(ctx, x)
    perm = list(node.attrs.get("perm") or reversed(range(rank)))
    ctx.set(node.outputs[0], xt.but(axis=perm.index(xt.axis)))


def _axes_input_or_attr(ctx: Ctx, node: gs.Node, rank: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = ctx.consts.ints(node.inputs[1])
        if v is None:
            raise unsupported(node, "takes non-constant axes")
        return [_norm(a, rank) for a in v]
    a = node.attrs.get("axes")
    return None if a is None else [_norm(int(v), rank) for v in a]


def rule_squeeze(ctx: Ctx, node: gs.Node) -> None:
    """Squeeze: 1. squeezing the time axis is refused; 2. the time axis shifts left by the
    squeezed axes before it (all size-1 axes when `axes` is absent)."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    shape = ctx.shapes[x.name]
    axes = _axes_input_or_attr(ctx, node, len(shape))
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    if xt.axis in axes:
        raise unsupported(node, "squeezes the time axis")
    ctx.set(node.outputs[0], xt.but(axis=xt.axis - sum(1 for a in axes if a < xt.axis)))


def rule_unsqueeze(ctx: Ctx, node: gs.Node) -> None:
    """Unsqueeze: the time axis moves to its place among the output axes not inserted."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    out_rank = _rank(ctx, node.outputs[0])
    axes = _axes_input_or_attr(ctx, node, out_rank) or []
    kept = [i for i in range(out_rank) if i not in axes]
    ctx.set(node.outputs[0], xt.but(axis=kept[xt.axis]))


def rule_flatten(ctx: Ctx, node: gs.Node) -> None:
    """Flatten to 2-D at `axis`.

    1. When every other axis on the time axis's side has size 1, time survives as axis 0 or 1.
    2. Otherwise Flatten mixes time with other axes: refused (a window summary in front of it,
       such as the last M frames, flattens fine: it has no time axis left).
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    shape = ctx.shapes[x.name]
    k = _norm(int(node.attrs.get("axis", 1)), len(shape))
    side = range(0, k) if xt.axis < k else range(k, len(shape))
    if any(shape[i] != 1 for i in side if i != xt.axis):
        raise unsupported(node, "flattens the time axis together with other axes")
    ctx.set(node.outputs[0], xt.but(axis=0 if xt.axis < k else 1))


def rule_reshape(ctx: Ctx, node: gs.Node) -> None:
    """Reshape.

    1. The time axis must survive unmerged: an output axis j of the same length with the same
       number of elements before it. Otherwise refused.
    2. The streaming Reshape gets an explicit target shape with the chunk's frames on that
       axis (batch 1), replacing any shape computed from the data.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    ins = ctx.shapes[x.name]
    out = node.outputs[0]
    outs = ctx.shapes[out.name]
    before = math.prod(ins[: xt.axis])
    cand = [
        j for j in range(len(outs))
        if outs[j] == ins[xt.axis] and math.prod(outs[:j]) == before
    ]
    if len(cand) != 1:
        raise unsupported(node, f"reshapes {ins} to {outs}, merging or splitting the time axis")
    j = cand[0]
    res = xt.but(axis=j)
    ctx.set(out, res)

    def fix(c: int) -> None:
        shape = list(outs)
        shape[j] = int(Fraction(c) / xt.stride)
        node.inputs[1] = gs.Constant(node.name + "__shape", np.array(shape, dtype=np.int64))

    ctx.fix(fix)


def rule_split(ctx: Ctx, node: gs.Node) -> None:
    """Split on an axis other than time: every output carries the input's time axis."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    ax = _norm(int(node.attrs.get("axis", 0)), _rank(ctx, x))
    if ax == xt.axis:
        raise unsupported(node, "splits the time axis")
    for o in node.outputs:
        ctx.set(o, xt)


def rule_tile(ctx: Ctx, node: gs.Node) -> None:
    """Tile: repeating along the time axis is refused; other axes pass through."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    reps = ctx.consts.ints(node.inputs[1])
    if reps is None or reps[xt.axis] != 1:
        raise unsupported(node, "repeats along the time axis")
    ctx.set(node.outputs[0], xt)


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
    return [_norm(int(a), rank) for a in axes]


def rule_reduce(ctx: Ctx, node: gs.Node) -> None:
    """Reduce* and ArgMax/ArgMin.

    1. Over the time axis: refused (give the input a `window` override to reduce the last W
       frames every call).
    2. Over other axes: pass through, the time axis shifting when keepdims=0.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    rank = _rank(ctx, x)
    if node.op in ("ArgMax", "ArgMin"):
        axes = [_norm(int(node.attrs.get("axis", 0)), rank)]
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
        return _generic(ctx, node)
    rank = _rank(ctx, x)
    default = -1 if (ctx.opset >= 13 or node.op == "LayerNormalization") else 1
    ax = _norm(int(node.attrs.get("axis", default)), rank)
    if node.op == "LayerNormalization" or (ctx.opset < 13 and node.op != "LpNormalization"):
        mixes = xt.axis >= ax
    else:
        mixes = xt.axis == ax
    if mixes:
        raise unsupported(node, "normalises over the time axis")
    for o in node.outputs:
        if o.name:
            ctx.set(o, xt.but(dirty=xt.delay > 0, nonneg=node.op == "Softmax"))


def rule_matmul(ctx: Ctx, node: gs.Node) -> None:
    """MatMul and Gemm with weights on one side.

    1. Time on a row/batch axis of the data operand (not the contracted one): pointwise.
    2. Time contracted, or both operands per-frame (attention over time): refused.
    """
    a, b = node.inputs[0], node.inputs[1]
    at, bt = ctx.get(a), ctx.get(b)
    if not isinstance(at, Time) and not isinstance(bt, Time):
        return _generic(ctx, node)
    if isinstance(at, (Time, Summary)) and isinstance(bt, (Time, Summary)):
        raise unsupported(node, "multiplies two per-frame tensors (attention over time)")
    out = node.outputs[0]
    r_out = _rank(ctx, out)
    if node.op == "Gemm":
        if not isinstance(at, Time):
            raise unsupported(node, "has the time axis on its weight operand")
        row = 1 if int(node.attrs.get("transA", 0)) else 0
        if at.axis != row:
            raise unsupported(node, "contracts over the time axis")
        ctx.set(out, at.but(axis=0, dirty=at.delay > 0, nonneg=False))
        for extra in node.inputs[2:]:
            if _static_broadcasts_time(ctx, extra, 2, 0):
                raise unsupported(node, "adds a bias that varies along time")
        return
    if isinstance(at, Time):
        ra = _rank(ctx, a)
        if at.axis == ra - 1 or ra == 1:
            raise unsupported(node, "contracts over the time axis")
        ctx.set(out, at.but(axis=at.axis + r_out - ra, dirty=at.delay > 0, nonneg=False))
    else:
        rb = _rank(ctx, b)
        if bt.axis == rb - 2 or rb == 1:
            raise unsupported(node, "contracts over the time axis")
        ctx.set(out, bt.but(axis=bt.axis + r_out - rb, dirty=bt.delay > 0, nonneg=False))


def rule_recurrent(ctx: Ctx, node: gs.Node) -> None:
    """GRU, LSTM, RNN along the time axis.

    1. Forward direction only; no `sequence_lens`; the input's time axis is the sequence axis
       (0, or 1 with layout=1); an initial state, if given, must be constant zeros.
    2. The hidden state (and LSTM's cell state) becomes a state input fed as initial_h
       (initial_c) and a state output taken from Y_h (Y_c): zero at start, like every state.
    3. The input must not lag (a pre-start frame would step the recurrence); a warm-up frame in
       front makes every later frame warm.
    4. Y carries the time axis; Y_h / Y_c are summaries (equal to offline after the last chunk).
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return _generic(ctx, node)
    layout = int(node.attrs.get("layout", 0))
    seq_axis = 1 if layout == 1 else 0
    direction = node.attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction != "forward":
        raise unsupported(node, f"runs {direction} over time")
    if xt.axis != seq_axis:
        raise unsupported(node, "has the time axis off its sequence axis")
    if len(node.inputs) > 4 and node.inputs[4].name:
        raise unsupported(node, "takes sequence_lens")
    if xt.delay > 0:
        raise unsupported(
            node,
            f"reads a tensor that lags {xt.delay} frame(s) behind (lookahead upstream); its "
            "pre-start frames would step the recurrence",
        )
    n_states = 2 if node.op == "LSTM" else 1
    hidden = int(node.attrs["hidden_size"])
    batch = ctx.shapes[x.name][1 - seq_axis]
    slots = []
    for k in range(n_states):
        slot = 5 + k
        if len(node.inputs) > slot and node.inputs[slot].name:
            v = ctx.consts.value(node.inputs[slot])
            if v is None or np.any(v):
                raise unsupported(node, "starts from a non-zero or computed initial state")
        shape = [batch, 1, hidden] if layout == 1 else [1, batch, hidden]
        slots.append((slot, 1 + k, shape))
    ctx.recurrent.append(Recurrent(node, slots))
    warm = WARM_ALL if xt.warmup else 0
    y = node.outputs[0]
    if y.name:
        ctx.set(
            y,
            xt.but(
                axis=seq_axis,
                length=ctx.length(y, seq_axis),
                dirty=False,
                warmup=warm,
                nonneg=False,
            ),
        )
    for o in node.outputs[1:]:
        if o.name:
            ok = not warm and ctx.ends_aligned(xt)
            ctx.set(o, Summary(lag=0, warm=bool(warm), comparable=ok))


def rule_shape(ctx: Ctx, node: gs.Node) -> None:
    """Shape / Size of a time tensor: its value changes with the chunk. It is allowed only where
    it ends in a Reshape's shape input (which the Reshape rule replaces by a constant)."""
    x = node.inputs[0]
    if isinstance(ctx.get(x), (Time, Summary)):
        ctx.set(node.outputs[0], ShapeOf(x.name))
        return
    return _generic(ctx, node)


def _generic(ctx: Ctx, node: gs.Node) -> None:
    """Nodes without time inputs: static stays static, a summary stays a summary, a shape taint
    spreads. A node whose data input has a time axis and no rule: refused."""
    infos = [ctx.get(t) for t in node.inputs]
    if any(isinstance(i, Time) for i in infos):
        if node.op == "Reshape" and isinstance(infos[0], Time):
            return rule_reshape(ctx, node)
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


RULES: dict[str, Callable[[Ctx, gs.Node], None]] = {
    "Conv": rule_conv,
    "AveragePool": rule_conv,
    "MaxPool": rule_conv,
    "LpPool": rule_conv,
    "ConvTranspose": rule_conv_transpose,
    "Pad": rule_pad,
    "Slice": rule_slice,
    "Gather": rule_gather,
    "Transpose": rule_transpose,
    "Squeeze": rule_squeeze,
    "Unsqueeze": rule_unsqueeze,
    "Flatten": rule_flatten,
    "Reshape": rule_reshape,
    "Split": rule_split,
    "Tile": rule_tile,
    "Concat": rule_broadcast,
    "MatMul": rule_matmul,
    "Gemm": rule_matmul,
    "GRU": rule_recurrent,
    "LSTM": rule_recurrent,
    "RNN": rule_recurrent,
    "Shape": rule_shape,
    "Size": rule_shape,
    "Softmax": rule_softmax,
    "LogSoftmax": rule_softmax,
    "Hardmax": rule_softmax,
    "LayerNormalization": rule_softmax,
    "LpNormalization": rule_softmax,
    "ArgMax": rule_reduce,
    "ArgMin": rule_reduce,
}
for _op in UNARY:
    RULES[_op] = rule_unary
for _op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu",
            "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor",
            "Mod", "BitShift"):
    RULES[_op] = rule_broadcast
for _op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
            "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"):
    RULES[_op] = rule_reduce
for _op in ("InstanceNormalization", "GroupNormalization", "GlobalAveragePool",
            "GlobalMaxPool", "GlobalLpPool", "CumSum", "Resize", "Upsample", "Expand",
            "DepthToSpace", "SpaceToDepth", "TopK", "NonZero", "Einsum", "Attention"):
    RULES.setdefault(_op, _generic)


def apply_rule(ctx: Ctx, node: gs.Node) -> None:
    """Run the rule for `node` (the generic rule when none is registered)."""
    infos = [ctx.get(t) for t in node.inputs]
    if not any(isinstance(i, (Time, Summary, ShapeOf)) for i in infos):
        return
    if node.op in ("InstanceNormalization", "GroupNormalization", "GlobalAveragePool",
                   "GlobalMaxPool", "GlobalLpPool", "CumSum") and isinstance(infos[0], Time):
        raise unsupported(node, "mixes every frame of the time axis")
    # a Reshape reading a shape computed from the data: the Reshape rule replaces it
    if node.op == "Reshape" and isinstance(infos[0], Time):
        return rule_reshape(ctx, node)
    for k, i in enumerate(infos):
        if isinstance(i, ShapeOf) and any(isinstance(j, (Time, Summary)) for j in infos):
            raise unsupported(
                node,
                f"uses the shape of time tensor {i.source!r} (input {k}); fix the shapes "
                "with `espstream optimize --input-shape`",
            )
    if node.domain not in (None, "", "ai.onnx"):
        return _generic(ctx, node)
    RULES.get(node.op, _generic)(ctx, node)

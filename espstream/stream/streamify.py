"""The `streamify` stage: offline model in, one-chunk-per-call streaming model out.

`analyze` follows every tensor's time axis through the graph with the rules in `rules.py`;
`streamify_model` checks the chunk size, rewrites the graph (`rewrite.py`), adds the
StreamingCache function (`cache.py`) and the metadata, and measures state memory and MACs.

Output-model contract (metadata_props, every value JSON):
- `espstream.chunk`: input frames per call (int).
- `espstream.time_axes`: {name: axis} for every graph input and output with a time axis.
- `espstream.states`: [[state input, state output], ...]; every state starts at zero.
- `espstream.delay`: {output: frames}: a time output's stream frame p is the offline frame
  p - delay (in that output's frames); for a summary output (no time axis), the lag of the
  window it summarises (0: equal to offline after the last chunk).
- `espstream.warmup`: {output: frames}: leading offline frames that may differ because a cache
  starts at zero where zero is not neutral (MaxPool on signed data, exclusive AveragePool);
  1099511627776 (2^40) means every frame (a recurrent layer behind such a pool).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from espstream import log
from espstream.errors import UserError
from espstream.optimize.check import malformed_is_user_error, onnxruntime_failure
from espstream.stream import cache as cache_fn
from espstream.stream import overrides as ovr
from espstream.stream.axes import (
    DEFAULT_T,
    WARM_ALL,
    Consts,
    Summary,
    Time,
    concrete_shapes,
    detect_axes,
)
from espstream.stream.rewrite import Rewriter, finish_io
from espstream.stream.rules import Ctx, Req, apply_rule, unsupported

META_KEYS = (
    "espstream.chunk",
    "espstream.time_axes",
    "espstream.states",
    "espstream.delay",
    "espstream.warmup",
)


@dataclass
class Analysis:
    ctx: Ctx
    input_axes: dict[str, int]
    axes_why: dict[str, str]
    frames: dict[str, int]
    outputs: dict[str, Any]

    @property
    def chunk_multiple(self) -> int:
        return math.lcm(1, *self.ctx.multiples)


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 13


def _check_offline(model: onnx.ModelProto) -> None:
    meta = {p.key for p in model.metadata_props}
    if "espstream.chunk" in meta or any(
        n.domain == cache_fn.DOMAIN for n in model.graph.node
    ):
        raise UserError(
            "the model is already a streaming model (it has espstream.chunk / StreamingCache); "
            "streamify the offline model instead"
        )


def analyze(
    model: onnx.ModelProto,
    axes: dict[str, int] | None = None,
    overrides: Any = None,
    frames: int | None = None,
) -> Analysis:
    """Follow the time axis through `model` at `frames` input frames (the model's own T if
    fixed, else `frames` or 840). Raises UserError for graphs the rules do not cover."""
    _check_offline(model)
    ov = ovr.parse(overrides)
    opset = _opset(model)
    graph = gs.import_onnx(model)
    graph.toposort()
    all_names = set(graph.tensors().keys())
    for name in ov.tensors:
        if name not in all_names:
            raise UserError(f"--overrides: no tensor named {name!r} in the model")
    ov = _axis_behind_qdq(graph, ov)
    consts = Consts(graph, opset)
    given = dict(axes or {})
    for inp in graph.inputs:
        if "axis" in ov.get(inp.name):
            given.setdefault(inp.name, ov.get(inp.name)["axis"])
    for name in given:
        if name not in {i.name for i in graph.inputs}:
            raise UserError(
                f"--axis {name}:...: the model has no input {name!r} "
                f"(inputs: {', '.join(i.name for i in graph.inputs)})"
            )
    found = detect_axes(graph, consts, given, {})
    if not found.axes:
        names = ", ".join(f"{i.name} {list(i.shape or [])}" for i in graph.inputs)
        raise UserError(
            f"no input has a time axis that can be found automatically ({names}); "
            "pass --axis INPUT:AXIS"
        )
    fixed: dict[str, list[int]] = {}
    frame_count: dict[str, int] = {}
    for inp in graph.inputs:
        dims = list(inp.shape or [])
        ax = found.axes.get(inp.name)
        out = []
        for i, d in enumerate(dims):
            if i == ax:
                if isinstance(d, int) and d > 0:
                    if frames is not None and frames != d:
                        raise UserError(
                            f"input {inp.name!r} has a fixed length of {d} frames; "
                            f"--frames {frames} cannot change it"
                        )
                    out.append(d)
                else:
                    out.append(frames or DEFAULT_T)
                frame_count[inp.name] = out[-1]
            else:
                out.append(d if isinstance(d, int) and d > 0 else 1)
        fixed[inp.name] = out
    shapes = concrete_shapes(model, fixed)
    shapes.update(fixed)
    ctx = Ctx(graph=graph, consts=consts, shapes=shapes, opset=opset)
    ctx.frames = max(frame_count.values())
    moved: dict[str, dict[str, int]] = {}  # window / delay overrides of quantized graph inputs
    for inp in graph.inputs:
        ax = found.axes.get(inp.name)
        if ax is not None:
            T = frame_count[inp.name]
            ctx.set(inp, Time(axis=ax, valid=T, length=T))
            spec = ov.get(inp.name)
            dq = _input_dequantized(inp) if {"window", "delay"} & set(spec) else None
            if dq is not None:  # a QDQ model: the cache goes behind the input's Q/DQ pair
                moved[dq.name] = spec
            else:
                _apply_tensor_override(ctx, inp, spec)
    for node in list(graph.nodes):
        if any("axis" in ov.get(o.name) for o in node.outputs):
            _framewise(ctx, node, ov)
        else:
            apply_rule(ctx, node)
        for o in node.outputs:
            _apply_tensor_override(ctx, o, {**moved.get(o.name, {}), **ov.get(o.name)})
    outputs = {o.name: ctx.info.get(o.name) for o in graph.outputs}
    return Analysis(ctx, dict(found.axes), dict(found.why), frame_count, outputs)


def _axis_behind_qdq(graph: gs.Graph, ov: ovr.Overrides) -> ovr.Overrides:
    """An `axis` override names the tensor the float model's node wrote; in the QDQ model that
    name is the DequantizeLinear's output and the node writes `<name>_float` into the Q/DQ
    pair (calibrate renames it). The override then also holds for what the node writes, so the
    same file streams the float and the QDQ model (`convert --overrides`)."""
    tensors = graph.tensors()
    extra: dict[str, dict[str, int]] = {}
    for name, spec in ov.tensors.items():
        t = tensors[name]
        if "axis" not in spec or len(t.inputs) != 1 or t.inputs[0].op != "DequantizeLinear":
            continue
        q = t.inputs[0].inputs[0]
        if len(q.inputs) != 1 or q.inputs[0].op != "QuantizeLinear":
            continue
        raw = q.inputs[0].inputs[0]
        if len(raw.inputs) == 1 and raw.inputs[0].op not in ("QuantizeLinear",
                                                             "DequantizeLinear") \
                and raw.name not in ov.tensors:
            extra[raw.name] = {"axis": spec["axis"]}
    return ovr.Overrides({**ov.tensors, **extra}) if extra else ov


def _input_dequantized(x: gs.Tensor) -> gs.Tensor | None:
    """The DequantizeLinear output of graph input x's QuantizeLinear -> DequantizeLinear pair
    (calibrate quantizes every time input so), when that pair is all that reads x: a window or
    delay override of x belongs there, or the cache would hold float frames ESP-DL never has."""
    if len(x.outputs) != 1 or x.outputs[0].op != "QuantizeLinear":
        return None
    q = x.outputs[0].outputs[0]
    if q.outputs and len(q.outputs) == 1 and q.outputs[0].op == "DequantizeLinear" \
            and q not in q.outputs[0].outputs:
        return q.outputs[0].outputs[0]
    return None


def _apply_tensor_override(ctx: Ctx, t: gs.Tensor, spec: dict[str, int]) -> None:
    """`window` and `delay` overrides: an Identity in front of every consumer carries them."""
    for key in ("delay", "window"):
        if key not in spec:
            continue
        inf = ctx.get(t)
        if not isinstance(inf, Time):
            raise UserError(f"--overrides: tensor {t.name!r} has no time axis; {key} needs one")
        t2 = gs.Variable(f"{t.name}.{key}", dtype=t.dtype)
        for consumer in list(t.outputs):
            for k, inp in enumerate(consumer.inputs):
                if inp is t:
                    consumer.inputs[k] = t2
        ident = gs.Node("Identity", f"override/{key}/{t.name}", {}, [t], [t2])
        ctx.graph.nodes.append(ident)
        ctx.shapes[t2.name] = list(ctx.shapes[t.name])
        if key == "delay":
            d = spec[key]
            ctx.req(t, Req(ident, 0, d, d, kind="delay"))
            ctx.set(t2, inf.but(delay=inf.delay + d))
        else:
            w = spec[key]
            ctx.req(t, Req(ident, 0, last=w, kind="last"))
            ok = ctx.ends_aligned(inf) and inf.warmup <= inf.length - w
            ctx.set(t2, Summary(lag=inf.delay, warm=inf.warmup > inf.length - w, comparable=ok))
        t = t2


def _framewise(ctx: Ctx, node: gs.Node, ov) -> None:
    """An `axis` override on a node's output: the node is frame-wise (inputs aligned)."""
    times = [(k, t, ctx.get(t)) for k, t in enumerate(node.inputs) if isinstance(ctx.get(t), Time)]
    if not times:
        raise unsupported(node, "has an axis override but reads no tensor with a time axis")
    if len({inf.stride for _k, _t, inf in times}) != 1:
        raise unsupported(node, "combines branches at different frame rates")
    D = max(inf.delay for _k, _t, inf in times)
    for k, t, inf in times:
        if inf.delay < D:
            ctx.req(t, Req(node, k, D - inf.delay, D - inf.delay, kind="delay"))
    first = None
    for o in node.outputs:
        if not o.name:
            continue
        ax = ov.get(o.name).get("axis", first)
        if ax is None:
            raise UserError(f"--overrides: give output {o.name!r} of {node.name!r} an axis too")
        first = ax if first is None else first
        rank = len(ctx.shapes[o.name])
        ax = ax % rank
        length = ctx.shapes[o.name][ax]
        ctx.set(
            o,
            Time(
                axis=ax,
                stride=times[0][2].stride,
                delay=D,
                dirty=D > 0,
                warmup=max(inf.warmup for _k, _t, inf in times),
                valid=min([length] + [inf.valid for _k, _t, inf in times]),
                length=length,
            ),
        )


# =========================================================================================


@dataclass
class StreamifyResult:
    model: onnx.ModelProto
    chunk: int
    input_axes: dict[str, dict[str, Any]]
    caches: list[dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    macs: dict[str, Any]
    chunk_multiple: int
    notes: list[str] = field(default_factory=list)
    # The offline model's analysis as `analyze(model, axes, overrides)` found it: frames per
    # time input and the time-axis info of each output (verify compares with the same).
    offline_frames: dict[str, int] = field(default_factory=dict, repr=False)
    offline_outputs: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def state_bytes_float32(self) -> int:
        return sum(c["bytes_float32"] for c in self.caches)

    @property
    def state_bytes_int8(self) -> int:
        return sum(c["bytes_int8"] for c in self.caches)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": "streamify",
            "chunk": self.chunk,
            "valid_chunks": f"multiples of {self.chunk_multiple}",
            "inputs": self.input_axes,
            "caches": self.caches,
            "state_bytes_float32": self.state_bytes_float32,
            "state_bytes_int8": self.state_bytes_int8,
            "outputs": self.outputs,
            "macs": self.macs,
            "notes": self.notes,
        }


def _check_chunk(an: Analysis, chunk: int) -> None:
    if not isinstance(chunk, int) or chunk < 1:
        raise UserError(f"--chunk {chunk}: must be a positive number of frames")
    m = an.chunk_multiple
    if chunk % m:
        why = "; ".join(
            f"{where} needs a multiple of {k}" for k, where in sorted(an.ctx.multiples.items())
        )
        T = max(an.frames.values()) if an.frames else 0
        sizes = [m * k for k in range(1, 7) if m * k <= max(T, m * 6)]
        listed = ", ".join(str(s) for s in sizes)
        raise UserError(
            f"--chunk {chunk}: every strided op must see whole strides ({why}); valid chunk "
            f"sizes are the multiples of {m}: {listed}, ..."
        )


def count_macs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm, MatMul, GRU, LSTM, RNN."""
    total = 0
    for n in model.graph.node:
        op = n.op_type
        try:
            if op == "Conv":
                total += math.prod(shapes[n.output[0]]) * math.prod(shapes[n.input[1]][1:])
            elif op == "ConvTranspose":
                total += math.prod(shapes[n.input[0]]) * math.prod(shapes[n.input[1]][1:])
            elif op in ("Gemm", "MatMul"):
                a = shapes[n.input[0]]
                trans = any(x.name == "transA" and x.i for x in n.attribute)
                k = a[0] if (op == "Gemm" and trans) else a[-1]
                total += math.prod(shapes[n.output[0]]) * k
            elif op in ("GRU", "LSTM", "RNN"):
                x = shapes[n.input[0]]
                h = next(a.i for a in n.attribute if a.name == "hidden_size")
                gates = {"GRU": 3, "LSTM": 4, "RNN": 1}[op]
                total += x[0] * x[1] * gates * h * (x[2] + h)
        except (KeyError, IndexError, StopIteration):
            continue
    return total


def streamify_model(
    model: onnx.ModelProto,
    chunk: int,
    axes: dict[str, int] | None = None,
    overrides: Any = None,
) -> StreamifyResult:
    """Convert `model` to a streaming model taking `chunk` input frames per call. The model
    written is run once in onnxruntime: a `window` override too small for what reads it is
    refused with the smallest window that works; any other failure is a bug (RuntimeError)."""
    with malformed_is_user_error(model):
        result = _streamify(model, chunk, axes, overrides)
        why = onnxruntime_failure(result.model)
        if why is not None:
            _refuse_small_window(model, chunk, axes, overrides, why)
            raise RuntimeError(f"streamify wrote a model onnxruntime cannot run ({why})")
        return result


def _runs(model: onnx.ModelProto, chunk: int, axes, ov: ovr.Overrides) -> bool:
    try:
        return onnxruntime_failure(_streamify(model, chunk, axes, ov).model) is None
    except UserError:
        return False


def _refuse_small_window(model: onnx.ModelProto, chunk: int, axes, overrides: Any,
                         why: str) -> None:
    """Raise UserError naming the `window` override at fault and the smallest one that runs
    (searched by bisection up to the tensor's offline length; more frames never hurt), when
    enlarging one window override makes the streaming model run."""
    ov = ovr.parse(overrides)
    windows = {n: s["window"] for n, s in ov.tensors.items() if "window" in s}
    if not windows:
        return
    an = analyze(copy.deepcopy(model), axes=axes, overrides=ov)
    for name, w in windows.items():
        inf = an.ctx.info.get(name)
        hi = getattr(inf, "length", None)
        if not isinstance(hi, int) or hi <= w:
            continue

        def with_window(v: int, name: str = name) -> ovr.Overrides:
            tensors = copy.deepcopy(ov.tensors)
            tensors[name]["window"] = v
            return ovr.Overrides(tensors)

        if not _runs(model, chunk, axes, with_window(hi)):
            continue  # not this window's fault
        lo = w  # fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _runs(model, chunk, axes, with_window(mid)):
                hi = mid
            else:
                lo = mid
        raise UserError(
            f"--overrides: window {w} on {name!r} is too small for what reads it (the streaming "
            f"model would not run in onnxruntime: {why}); the smallest window that works is {hi}")


def _streamify(model: onnx.ModelProto, chunk: int, axes: dict[str, int] | None,
               overrides: Any) -> StreamifyResult:
    offline = model
    an = analyze(copy.deepcopy(model), axes=axes, overrides=overrides)
    _check_chunk(an, chunk)
    ctx = an.ctx
    rw = Rewriter(ctx, chunk)
    states = rw.run()
    finish_io(ctx, chunk, states, an.input_axes)
    graph = ctx.graph
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = offline.ir_version
    del out.opset_import[:]
    out.opset_import.extend(copy.deepcopy(offline.opset_import))
    cache_fn.install(out)
    out.producer_name = offline.producer_name or "espstream"
    out.producer_version = offline.producer_version
    out.doc_string = offline.doc_string
    del out.metadata_props[:]
    for p in offline.metadata_props:
        if p.key not in META_KEYS:
            out.metadata_props.add(key=p.key, value=p.value)

    time_axes: dict[str, int] = {}
    for name, ax in an.input_axes.items():
        time_axes[name] = ax
    outputs: dict[str, dict[str, Any]] = {}
    delay: dict[str, int] = {}
    warmup: dict[str, int] = {}
    for name, inf in an.outputs.items():
        if isinstance(inf, Time):
            time_axes[name] = inf.axis
            delay[name] = inf.delay
            warmup[name] = inf.warmup
            outputs[name] = {
                "kind": "time",
                "time_axis": inf.axis,
                "frames_per_chunk": int(Fraction(chunk) / inf.stride),
                "delay": inf.delay,
                "warmup": inf.warmup if inf.warmup < WARM_ALL else "all",
            }
        elif isinstance(inf, Summary):
            delay[name] = inf.lag
            warmup[name] = WARM_ALL if inf.warm else 0
            outputs[name] = {
                "kind": "summary",
                "delay": inf.lag,
                "equal_after_last_chunk": inf.comparable,
            }
        else:
            outputs[name] = {"kind": "static"}
    meta = {
        "espstream.chunk": chunk,
        "espstream.time_axes": time_axes,
        "espstream.states": [[p.input.name, p.output.name] for p in states],
        "espstream.delay": delay,
        "espstream.warmup": warmup,
    }
    for k, v in meta.items():
        out.metadata_props.add(key=k, value=json.dumps(v))
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:  # our bug, never the user's
        raise RuntimeError(f"streamify wrote an invalid model: {e}") from e

    off_macs = count_macs(offline, ctx.shapes)
    T = max(an.frames.values())
    try:
        st_shapes = concrete_shapes(out, {})
        st_macs = count_macs(out, st_shapes)
    except UserError:
        st_macs = None
    macs = {
        "per_chunk": st_macs,
        "per_input_frame_streaming": None if st_macs is None else st_macs / chunk,
        "offline_total": off_macs,
        "offline_frames": T,
        "offline_per_input_frame": off_macs / T if T else None,
    }
    inputs = {n: {"axis": a, "why": an.axes_why.get(n, "")} for n, a in an.input_axes.items()}
    return StreamifyResult(
        model=out,
        chunk=chunk,
        input_axes=inputs,
        caches=[p.to_json() for p in states],
        outputs=outputs,
        macs=macs,
        chunk_multiple=an.chunk_multiple,
        notes=list(ctx.notes),
        offline_frames=dict(an.frames),
        offline_outputs=dict(an.outputs),
    )


def print_summary(res: StreamifyResult) -> None:
    """The stderr report: caches, state memory, delays, MACs."""
    from espstream.report import table

    for name, i in res.input_axes.items():
        log.info(f"input {name}: time axis {i['axis']} ({i['why']}); chunk {res.chunk} frames")
    rows = [
        [
            c["tensor"],
            c["kind"],
            c["window"] if c["window"] is not None else "-",
            c["frames"],
            c["bytes_float32"],
            c["bytes_int8"],
            len(c["consumers"]),
        ]
        for c in res.caches
    ]
    if rows:
        log.info(table(["cached tensor", "kind", "window", "frames", "B f32", "B int8", "users"],
                       rows))
    log.info(
        f"state memory: {res.state_bytes_float32} B float32, {res.state_bytes_int8} B int8 "
        f"({len(res.caches)} state(s))"
    )
    for name, o in res.outputs.items():
        if o["kind"] == "time":
            warm = f", first {o['warmup']} frame(s) may differ" if o["warmup"] else ""
            log.info(
                f"output {name}: time axis {o['time_axis']}, delay {o['delay']} frame(s){warm}"
            )
        elif o["kind"] == "summary":
            eq = "equal to offline after the last chunk" if o["equal_after_last_chunk"] else (
                "NOT comparable to offline (the window lags or sees warm-up frames)")
            log.info(f"output {name}: window summary, {eq}")
    m = res.macs
    if m["per_chunk"] is not None and m["offline_per_input_frame"]:
        log.info(
            f"MACs: {m['per_chunk']:,} per chunk = {m['per_input_frame_streaming']:,.0f} per "
            f"frame streaming vs {m['offline_per_input_frame']:,.0f} per frame offline "
            f"({m['offline_total']:,} over {m['offline_frames']} frames)"
        )
    for n in res.notes:
        log.warn(n)


def parse_axes(specs: tuple[str, ...] | list[str]) -> dict[str, int]:
    """`--axis INPUT:AXIS` options -> {INPUT: AXIS}."""
    out: dict[str, int] = {}
    for spec in specs:
        name, sep, ax = spec.rpartition(":")
        try:
            value = int(ax)
        except ValueError:
            value = None
        if not sep or not name or value is None:
            raise UserError(f"--axis {spec!r}: expected INPUT:AXIS, e.g. x:2")
        out[name] = value
    return out

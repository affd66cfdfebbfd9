"""Calibrating a streaming model: whole offline sequences, cut into chunks, states fed back.

A streaming model is recognised in one of two ways:
1. `streamify` wrote it: its `metadata_props` give the chunk, the time axis of every input and
   output and the state pairs (`espstream.chunk`, `espstream.time_axes`, `espstream.states`).
   `--state` / `--chunk` / `--axis` may repeat what the metadata says, never contradict it.
2. A hand-written one (ESP-DL's manual path: `streaming_forward(x, cache) -> (y, new_cache)`
   exported to ONNX): `--state IN:OUT` (repeatable) names each state input and the output that
   is fed back into it. The time axis of each other input is `--axis INPUT:AXIS`, else its one
   symbolic dimension, else the one dimension where the calibration data differ from the
   model's input shape, else the one dimension equal to `--chunk`; the chunk is the input's
   size on that axis (or `--chunk` where it is symbolic). Outputs with the rank of the time
   input get its time axis (`--axis OUTPUT:AXIS` overrides); the others summarise a window.
   The calibrated model records these facts in the same metadata `streamify` writes (delay 0:
   a hand-written model is taken to compute frame t from frames up to t).

Calibration data are whole sequences shaped like the inputs except along the time axis (no
arrays for the states). Each sequence is cut into `T // chunk` chunks (leftover frames are
dropped, with a warning); the chunks run in order with every state zero at the start and each
state output fed back as the next call's state input, so the observers see the activations
and states the model meets when it streams. Sequences of one length run side by side in a batch
when a batched run is checked to give the same values.

Exponents: a `StreamingCache` state carries the exponent of what it caches (plan rule 9). A
hand-written state input and its state output get one exponent (plan rule 10): the tensors
tied through the pair, through shared exponents (data movement) and adopted ones (Add / Concat
inputs) form a group; where the usual choice already gives them one exponent it is kept,
otherwise the observers of the group's tensors are merged and the method picks one exponent
for all. So the fake-quant loop `state -> ... -> next state` has no requantization.

The report's per-layer table runs each chunk with the float model's states (local and
cumulative SQNR inside a chunk); the output SQNR compares the fake-quant model streaming with
its own states against the float model streaming with its own.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espstream import log
from espstream.errors import UserError, first_line
from espstream.quant.data import CalibrationData, InputSpec, model_inputs, random_data
from espstream.quant.observers import HistogramObserver

STREAM_DOMAIN = "espstream"
META_CHUNK = "espstream.chunk"


@dataclass
class StreamSpec:
    """How a streaming model is driven: chunk, time axes, state pairs."""

    chunk: int
    input_axes: dict[str, int]  # every non-state graph input -> its time axis
    output_axes: dict[str, int]  # non-state graph outputs with a time axis
    states: list[tuple[str, str]]
    source: str  # "metadata" (streamify) or "options" (--state)
    state_shapes: dict[str, list[int]] = field(default_factory=dict)

    def manual_pairs(self, model: onnx.ModelProto) -> list[tuple[str, str]]:
        """State pairs whose state is not read by a StreamingCache node (hand-written). An LSTM's
        (initial_c, Y_c) pair is left out: both are int16 at that node's gate exponent by
        construction (ops/recurrent.py), with no activation exponent to tie."""
        cache_states = {n.input[1] for n in model.graph.node
                        if n.domain == STREAM_DOMAIN and n.op_type == "StreamingCache"
                        and len(n.input) > 1}
        cells = {(n.input[6], n.output[2]) for n in model.graph.node
                 if n.op_type == "LSTM" and len(n.input) > 6 and len(n.output) > 2}
        return [(a, b) for a, b in self.states if a not in cache_states and (a, b) not in cells]

    def metadata(self) -> dict[str, str]:
        """The streaming metadata (as `streamify` writes it) for a hand-written model."""
        return {
            "espstream.chunk": json.dumps(self.chunk),
            "espstream.time_axes": json.dumps({**self.input_axes, **self.output_axes}),
            "espstream.states": json.dumps([list(p) for p in self.states]),
            "espstream.delay": json.dumps({o: 0 for o in self.output_axes}),
            "espstream.warmup": json.dumps({o: 0 for o in self.output_axes}),
        }

    def to_json(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "input_axes": self.input_axes,
                "output_axes": self.output_axes, "states": [list(p) for p in self.states],
                "source": self.source}


# ---- recognising a streaming model ---------------------------------------------------------


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def _fmt(dims: Iterable[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def parse_state_specs(specs: Iterable[str], model: onnx.ModelProto) -> list[tuple[str, str]]:
    """`--state IN:OUT` options -> pairs, each checked against the model's inputs / outputs."""
    inits = {t.name for t in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in inits}
    outputs = {vi.name: vi for vi in model.graph.output}
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        # A name may hold ':' itself: take the split whose halves name an input and an output.
        cuts = [i for i, ch in enumerate(spec) if ch == ":"]
        found = [(spec[:i], spec[i + 1:]) for i in cuts
                 if spec[:i] in inputs and spec[i + 1:] in outputs]
        if not cuts:
            raise UserError(f"--state {spec!r}: expected STATE_INPUT:STATE_OUTPUT, e.g. "
                            "cache:new_cache")
        if not found:
            a, b = spec[:cuts[-1]], spec[cuts[-1] + 1:]
            if a not in inputs:
                raise UserError(f"--state {spec}: the model has no input {a!r} (inputs: "
                                f"{', '.join(inputs)})")
            raise UserError(f"--state {spec}: the model has no output {b!r} (outputs: "
                            f"{', '.join(outputs)})")
        a, b = found[0]
        da, db = _dims(inputs[a]), _dims(outputs[b])
        if db and da != db:
            raise UserError(f"--state {spec}: input {a!r} is {_fmt(da)} but output {b!r} is "
                            f"{_fmt(db)}; a state output is fed back, so it needs the state's "
                            "shape")
        if any(d is None for d in da):
            raise UserError(f"--state {spec}: state input {a!r} has shape {_fmt(da)}; states "
                            "start at zero and need a fixed shape (espstream optimize "
                            "--input-shape fixes it)")
        ea = inputs[a].type.tensor_type.elem_type
        eb = outputs[b].type.tensor_type.elem_type
        if eb and ea != eb:
            raise UserError(f"--state {spec}: input and output element types differ")
        for p in pairs:
            if a == p[0] or b == p[1]:
                raise UserError(f"--state {spec}: {a!r} or {b!r} already belongs to the pair "
                                f"{p[0]}:{p[1]}")
        pairs.append((a, b))
    return pairs


def _peek_shapes(path: str | None) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays in the first data file (by input name; '' for a .npy)."""
    if not path:
        return {}
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".npy", ".npz") and f.is_file())
        if not files:
            return {}
        p = files[0]
    try:
        if p.suffix == ".npy":
            return {"": tuple(np.load(p, mmap_mode="r", allow_pickle=False).shape)}
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: tuple(z[k].shape) for k in z.files}
    except (ValueError, OSError, EOFError):
        return {}  # read_calibration_data names the file and the problem later
    return {}


def _auto_axis(name: str, dims: list[int | None], data: tuple[int, ...] | None,
               chunk: int | None) -> int:
    rank = len(dims)
    symbolic = [i for i in range(1, rank) if dims[i] is None]
    if len(symbolic) == 1:
        return symbolic[0]
    if data is not None and len(data) >= rank - 1 and rank > 1:
        tail = data[len(data) - (rank - 1):]
        differ = [i + 1 for i, (a, b) in enumerate(zip(tail, dims[1:], strict=True))
                  if b is not None and a != b]
        if len(differ) == 1:
            return differ[0]
    if chunk is not None:
        same = [i for i in range(1, rank) if dims[i] == chunk]
        if len(same) == 1:
            return same[0]
    raise UserError(f"input {name!r} {_fmt(dims)}: its time axis cannot be told from the model "
                    f"or the data; pass --axis {name}:AXIS")


def stream_spec(
    model: onnx.ModelProto,
    states: Iterable[str] = (),
    chunk: int | None = None,
    axes: dict[str, int] | None = None,
    data_path: str | None = None,
) -> StreamSpec | None:
    """The streaming facts of `model` (module docstring), or None for an offline model."""
    states = list(states)
    axes = dict(axes or {})
    meta = {p.key: p.value for p in model.metadata_props}
    if "espstream.stage" in meta:
        raise UserError("the model is one part of a staged deployment (espstream.stage); "
                        "calibrate the whole model, then split it with streamify --stages")
    if META_CHUNK in meta:
        return _spec_from_metadata(model, meta, states, chunk, axes)
    if not states:
        if chunk is not None or axes:
            raise UserError("--chunk / --axis describe a hand-written streaming model: name its "
                            "states with --state STATE_INPUT:STATE_OUTPUT")
        return None
    if chunk is not None and chunk < 1:
        raise UserError(f"--chunk {chunk}: must be a positive number of frames")
    pairs = parse_state_specs(states, model)
    inits = {t.name for t in model.graph.initializer}
    state_in = {a for a, _ in pairs}
    state_out = {b for _, b in pairs}
    ins = {vi.name: _dims(vi) for vi in model.graph.input
           if vi.name not in inits and vi.name not in state_in}
    outs = {vi.name: _dims(vi) for vi in model.graph.output if vi.name not in state_out}
    for name in axes:
        if name not in ins and name not in outs:
            what = "a state" if name in state_in | state_out else "not an input or output"
            raise UserError(f"--axis {name}:{axes[name]}: {name!r} is {what} of the model "
                            f"(inputs: {', '.join(ins)})")
    if not ins:
        raise UserError("every input of the model is a state; a streaming model needs an input "
                        "that takes the new frames")
    peek = _peek_shapes(data_path)
    input_axes: dict[str, int] = {}
    chunks: dict[str, int] = {}
    for name, dims in ins.items():
        rank = len(dims)
        if name in axes:
            ax = axes[name]
            if -rank <= ax < rank and ax % rank == 0:
                from espstream.stream.axes import batch_axis_error

                raise batch_axis_error(name, list(dims))
            if not -rank <= ax < rank:
                raise UserError(f"--axis {name}:{ax}: input {name!r} {_fmt(dims)} has no such "
                                "time axis")
            ax %= rank
        else:
            data = peek.get(name, peek.get("") if len(ins) == 1 else None)
            ax = _auto_axis(name, dims, data, chunk)
        input_axes[name] = ax
        size = dims[ax]
        if size is None:
            if chunk is None:
                raise UserError(f"input {name!r} {_fmt(dims)} has a symbolic time axis {ax}; "
                                "give the frames per call with --chunk N")
            size = chunk
        elif chunk is not None and chunk != size:
            raise UserError(f"--chunk {chunk}: input {name!r} {_fmt(dims)} takes {size} frames "
                            f"per call on its time axis {ax}")
        chunks[name] = size
    if len(set(chunks.values())) != 1:
        raise UserError(f"the inputs take different frames per call ({chunks}); "
                        "a streaming model takes one chunk for all its time inputs")
    first = next(iter(input_axes))
    rank0, ax0 = len(ins[first]), input_axes[first]
    output_axes: dict[str, int] = {}
    for name, dims in outs.items():
        if name in axes:
            if not -len(dims) <= axes[name] < len(dims):
                raise UserError(f"--axis {name}:{axes[name]}: output {name!r} {_fmt(dims)} "
                                "has no such axis")
            output_axes[name] = axes[name] % len(dims)
        elif len(dims) == rank0:
            output_axes[name] = ax0
    inputs = {vi.name: vi for vi in model.graph.input}
    shapes = {a: [int(d) for d in _dims(inputs[a])] for a, _ in pairs}
    for a, shape in shapes.items():
        if shape[0] != 1:
            raise UserError(f"state input {a!r} {_fmt(shape)}: a streaming model runs batch 1")
    return StreamSpec(next(iter(chunks.values())), input_axes, output_axes, pairs, "options",
                      shapes)


def _spec_from_metadata(model: onnx.ModelProto, meta: dict[str, str], states: list[str],
                        chunk: int | None, axes: dict[str, int]) -> StreamSpec:
    try:
        m_chunk = int(json.loads(meta[META_CHUNK]))
        m_axes = {k: int(v) for k, v in json.loads(meta.get("espstream.time_axes",
                                                             "{}")).items()}
        m_states = [(str(a), str(b)) for a, b in json.loads(meta.get("espstream.states", "[]"))]
    except (ValueError, TypeError) as e:
        raise UserError(f"the model's espstream streaming metadata is malformed ({e})") from None
    if chunk is not None and chunk != m_chunk:
        raise UserError(f"--chunk {chunk}: the model was made for chunks of {m_chunk} frames "
                        "(espstream.chunk); drop --chunk or streamify again")
    for name, ax in axes.items():
        if m_axes.get(name) != ax:
            raise UserError(f"--axis {name}:{ax}: the model's metadata gives "
                            f"{name!r} time axis {m_axes.get(name)}; drop --axis")
    if states:
        given = parse_state_specs(states, model)
        if set(given) != set(m_states):
            raise UserError("--state: the model's metadata (espstream.states) already lists its "
                            "states, and they differ; drop --state")
    inits = {t.name for t in model.graph.initializer}
    state_in = {a for a, _ in m_states}
    inputs = {vi.name: vi for vi in model.graph.input}
    outputs = {vi.name for vi in model.graph.output}
    for a, b in m_states:
        if a not in inputs or b not in outputs:
            raise UserError(f"espstream.states names {a!r} -> {b!r}, which is not a graph input "
                            "/ output pair of the model")
    input_axes = {}
    for vi in model.graph.input:
        if vi.name in inits or vi.name in state_in:
            continue
        if vi.name not in m_axes:
            raise UserError(f"input {vi.name!r} has no time axis in espstream.time_axes; a "
                            "streaming input needs one")
        input_axes[vi.name] = m_axes[vi.name]
    shapes = {}
    for a, _ in m_states:
        dims = _dims(inputs[a])
        if any(d is None for d in dims):
            raise UserError(f"state input {a!r} has shape {_fmt(dims)}: states need a fixed "
                            "shape")
        shapes[a] = [int(d) for d in dims]
    out_axes = {k: v for k, v in m_axes.items() if k in outputs}
    return StreamSpec(m_chunk, input_axes, out_axes, m_states, "metadata", shapes)


# ---- data -----------------------------------------------------------------------------------


def sequence_inputs(model: onnx.ModelProto, spec: StreamSpec,
                    frames: int | None = None) -> list[InputSpec]:
    """InputSpecs of whole sequences: the time inputs, any length (or `frames`) in time."""
    out = []
    for s in model_inputs(model):
        if s.name not in spec.input_axes:
            continue
        shape = list(s.shape)
        shape[spec.input_axes[s.name]] = frames
        out.append(InputSpec(s.name, tuple(shape), s.dtype))
    return out


def random_sequences(model: onnx.ModelProto, spec: StreamSpec, n: int,
                     seed: int = 0) -> CalibrationData:
    """n standard-normal sequences of max(64, 8 * chunk) frames."""
    T = max(64, 8 * spec.chunk)
    specs = sequence_inputs(model, spec, T)
    data = random_data(specs, n, seed)
    data.description = f"--random {n} sequences of {T} frames (standard normal, seed {seed})"
    return data


def _take(x: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(lo, hi)
    return np.ascontiguousarray(x[tuple(idx)])


def sequence_length(seq: dict[str, np.ndarray], spec: StreamSpec, index: int) -> int:
    lengths = {seq[n].shape[ax] for n, ax in spec.input_axes.items()}
    if len(lengths) != 1:
        raise UserError(f"sequence {index}: the time inputs have different lengths "
                        f"{sorted(lengths)}")
    T = lengths.pop()
    if T < spec.chunk:
        raise UserError(f"sequence {index} has {T} frames, fewer than one chunk of "
                        f"{spec.chunk}; calibrate on whole sequences")
    return T


# ---- running the chunks with the states fed back ---------------------------------------------


class StreamRunner:
    """Runs a streaming model chunk by chunk over whole sequences, states fed back.

    `run(sequences)` yields, per chunk, (sequences in the run, values of `names`); sequences
    of one length are stacked in a batch when that is checked to be exact.
    """

    def __init__(self, model: onnx.ModelProto, names: list[str], spec: StreamSpec,
                 batch: int = 64) -> None:
        from espstream.quant.engine import session, with_outputs

        self.spec = spec
        self.names = list(names)
        outs = [b for _, b in spec.states]
        self.fetch = self.names + [b for b in outs if b not in self.names]
        self.model = with_outputs(model, self.fetch)
        self.sess = session(self.model)
        self.batch = max(1, batch)
        self.batched: Any = None
        self._tried = False
        self.chunks = 0
        self.dropped = 0

    def _session_for(self, n: int):
        return self.batched if n > 1 else self.sess

    def _zeros(self, n: int) -> dict[str, np.ndarray]:
        return {a: np.zeros([n, *self.spec.state_shapes[a][1:]], np.float32)
                for a, _ in self.spec.states}

    def _calls(self, sess, seqs: list[dict[str, np.ndarray]], T: int
               ) -> Iterator[list[np.ndarray]]:
        spec, n = self.spec, len(seqs)
        states = self._zeros(n)
        idx = {name: i for i, name in enumerate(self.fetch)}
        for k in range(T // spec.chunk):
            feeds = dict(states)
            for name, ax in spec.input_axes.items():
                parts = [_take(s[name], ax, k * spec.chunk, (k + 1) * spec.chunk) for s in seqs]
                feeds[name] = parts[0] if n == 1 else np.concatenate(parts)
            try:
                vals = sess.run(self.fetch, feeds)
            except Exception as e:  # noqa: BLE001 - onnxruntime's own types
                first = first_line(e)
                raise UserError(f"onnxruntime cannot run the model on a chunk: {first}") from None
            for a, b in spec.states:
                states[a] = vals[idx[b]]
            yield vals

    def _try_batching(self, seqs: list[dict[str, np.ndarray]], T: int) -> None:
        self._tried = True
        if self.batch < 2 or len(seqs) < 2:
            return

        from espstream.quant.engine import _quiet_opts, dynamic_batch, new_session

        dyn = dynamic_batch(self.model)
        if dyn is None:
            return
        two = seqs[:2]
        try:
            sess = new_session(dyn, _quiet_opts())
            together = [v for _, v in zip(range(2), self._calls(sess, two, min(T, 2 *
                                                                self.spec.chunk)),
                                          strict=False)]
        except Exception:  # noqa: BLE001 - a fixed-batch Reshape and the like
            return
        for i, s in enumerate(two):
            alone = list(self._calls(self.sess, [s], min(T, 2 * self.spec.chunk)))
            for va, vt in zip(alone, together, strict=True):
                for a, t in zip(va, vt, strict=True):
                    if a.ndim == 0 or a.shape[0] != 1 or t.shape != (2, *a.shape[1:]):
                        return
                    tol = 1e-5 * (float(np.abs(a).max(initial=0.0)) + 1e-30) + 1e-7
                    if not np.allclose(t[i:i + 1], a, rtol=1e-4, atol=tol):
                        return
        self.batched = sess

    def run(self, data: Iterable[dict[str, np.ndarray]]
            ) -> Iterator[tuple[int, list[np.ndarray]]]:
        group: list[dict[str, np.ndarray]] = []
        group_T = None
        for i, seq in enumerate(data):
            T = sequence_length(seq, self.spec, i)
            if T % self.spec.chunk:
                self.dropped += 1
            if group and (T != group_T or len(group) >= self.batch):
                yield from self._flush(group, group_T)
                group = []
            group.append(seq)
            group_T = T
        if group:
            yield from self._flush(group, group_T)

    def _flush(self, group: list[dict[str, np.ndarray]], T: int
               ) -> Iterator[tuple[int, list[np.ndarray]]]:
        if not self._tried:
            self._try_batching(group, T)
        if self.batched is not None and len(group) > 1:
            for vals in self._calls(self.batched, group, T):
                self.chunks += len(group)
                yield len(group), vals[: len(self.names)]
            return
        for s in group:
            for vals in self._calls(self.sess, [s], T):
                self.chunks += 1
                yield 1, vals[: len(self.names)]


def observe_stream(model: onnx.ModelProto, names: list[str], data: CalibrationData,
                   spec: StreamSpec, batch: int = 64, bins: int = 4096
                   ) -> tuple[dict[str, HistogramObserver], bool, int]:
    """Observers of `names` over every chunk of every sequence; (observers, batched, chunks)."""
    from espstream.quant.engine import Progress, feed

    observers = {n: HistogramObserver(bins) for n in names}
    runner = StreamRunner(model, names, spec, batch)
    progress = Progress("calibrate (chunks)", 0)
    try:
        for _count, values in runner.run(data):
            feed(observers, names, values, "a chunk of the calibration data")
    finally:
        progress.close()
    if runner.dropped:
        log.warn(f"{runner.dropped} sequence(s) are not a whole number of chunks of "
                 f"{spec.chunk} frames; their last frames were left out")
    return observers, runner.batched is not None, runner.chunks


# ---- one exponent per state loop ---------------------------------------------------------------


def merge_observers(observers: list[HistogramObserver]) -> HistogramObserver:
    """One observer holding the counts of all of `observers` (exact: bins merge by powers of 2)."""
    bins = observers[0].bins
    out = HistogramObserver(bins)
    tops = [o.top for o in observers if o.top is not None]
    out.top = max(tops) if tops else None
    for o in observers:
        h = copy.deepcopy(o)
        if out.top is not None and h.top is not None and h.top < out.top:
            h._grow(out.top)
        out.hist += h.hist
        out.min = min(out.min, h.min)
        out.max = max(out.max, h.max)
        out.count += h.count
    return out


def tie_exponents(plan: Any, observers: dict[str, HistogramObserver], exps: dict[str, int],
                  opts: Any) -> None:
    """Plan rule 10: one exponent for each state pair and the tensors bound to it (in place)."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for t in plan.share_root:
        union(t, plan.root(t))
    adopters = set()
    for out, ins in plan.adopt:
        for i in ins:
            union(i, out)
            adopters.add(i)
    for a, b in plan.ties:
        for t in (a, b):
            if t not in exps:
                kind = plan.state.get(t, "unused")
                raise UserError(
                    f"state {a!r} -> {b!r}: {t!r} carries no integer exponent (it is {kind}: "
                    "e.g. a Softmax output, or not read); a state must be an integer tensor"
                )
        union(a, b)
    groups: dict[str, list[str]] = {}
    for t in exps:
        groups.setdefault(find(t), []).append(t)
    for root in dict.fromkeys(find(a) for a, _ in plan.ties):
        members = groups[root]
        if len({exps[m] for m in members}) == 1:
            continue
        observed = [m for m in members if m in observers]
        deciders = [m for m in observed if m not in adopters] or observed
        merged = merge_observers([observers[m] for m in deciders])
        e = merged.exponent(opts.method, opts.bits, opts.percentile)
        for m in members:
            exps[m] = e


# ---- the report ---------------------------------------------------------------------------------


def _float_chunk_feeds(model: onnx.ModelProto, spec: StreamSpec,
                       seqs: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Per chunk, the feeds of the float stream: the chunk and the float model's states."""
    from espstream.quant.engine import session

    sess = session(model)
    outs = [o.name for o in sess.get_outputs()]
    for i, seq in enumerate(seqs):
        T = sequence_length(seq, spec, i)
        states = {a: np.zeros(spec.state_shapes[a], np.float32) for a, _ in spec.states}
        for k in range(T // spec.chunk):
            feeds = dict(states)
            for name, ax in spec.input_axes.items():
                feeds[name] = _take(seq[name], ax, k * spec.chunk, (k + 1) * spec.chunk)
            yield feeds
            vals = dict(zip(outs, sess.run(outs, feeds), strict=True))
            for a, b in spec.states:
                states[a] = vals[b]


def stream_outputs_sqnr(float_model: onnx.ModelProto, qmodel: onnx.ModelProto,
                        spec: StreamSpec, seqs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Output SQNR of the fake-quant model streaming against the float model streaming."""
    from espstream.quant import scheme

    names = [o.name for o in qmodel.graph.output if o.name not in {b for _, b in spec.states}]
    fr = StreamRunner(float_model, names, spec, batch=1)
    qr = StreamRunner(qmodel, names, spec, batch=1)
    acc = {n: [0.0, 0.0] for n in names}
    for (_, fv), (_, qv) in zip(fr.run(seqs), qr.run(seqs), strict=True):
        for n, f, q in zip(names, fv, qv, strict=True):
            f = f.astype(np.float64)
            acc[n][0] += float(np.sum(f * f))
            acc[n][1] += float(np.sum((f - q) ** 2))
    return {n: scheme.sqnr_from_sums(*v) for n, v in acc.items()}


def build_stream_report(result: Any, data: CalibrationData, spec: StreamSpec,
                        samples: int) -> Any:
    """The per-layer report over chunks (float states) and the streaming output SQNR."""
    from espstream.quant.qreport import build_report

    seqs = [s for _, s in zip(range(samples), data, strict=False)]
    # Before build_report: onnx-graphsurgeon's export renames initializers of the float model
    # it imported in place.
    outputs = stream_outputs_sqnr(result.float_model, result.model, spec, seqs)
    feeds = list(_float_chunk_feeds(result.float_model, spec, seqs))
    rep = build_report(result, feeds, len(feeds))
    rep.outputs = outputs
    return rep


__all__ = [
    "StreamRunner",
    "StreamSpec",
    "build_stream_report",
    "merge_observers",
    "observe_stream",
    "parse_state_specs",
    "random_sequences",
    "sequence_inputs",
    "stream_spec",
    "tie_exponents",
]

"""`verify`: prove that a streaming model, run chunk by chunk with its states fed back,
computes what the offline model computes over the whole sequence.

How outputs are compared:
- Time outputs frame by frame: offline frame t against the stream's frame t + delay (the
  delay from the streaming model's `espstream.delay`). Compared frames are those the stream can
  reproduce from the frames fed: from the first frame after the declared warm-up up to the last
  frame that depends neither on right padding nor on frames beyond the end of the sequence
  (found by the time-axis analysis of the offline model at this length), and only frames the
  stream has produced after `T // chunk` calls.
- Summary outputs (no time axis: the last M frames, a recurrent final state) after the last
  chunk, when T is a multiple of the chunk and the window does not lag.
- Per output: largest absolute error, SQNR (dB), the first offline frame that differs beyond
  the tolerance, how many frames were compared.

Engines (`ENGINES`, extend with `register_engine`): an engine turns an ONNX model into a runner
with `run(feeds) -> {name: array}` and `reset()`, and states a tolerance per output. `reset()`
starts a new sequence: a runner that keeps state itself (the int8 simulator's StreamingCaches)
forgets it; `run_stream` calls it before the first chunk of every sequence. States listed in
`espstream.states` are fed explicitly as well (zeros first, then each call's next state).
- `float`: onnxruntime with its graph optimizations off (its Pad fusion changes what a zero Pad
  in front of a MaxPool computes); pass when |err| <= 1e-5 + 1e-4 * |offline|.
- `fakequant`: onnxruntime on QDQ models; both models compute the same integer grid, but the
  float arithmetic inside a layer may sum in another order on a chunk than on the whole
  sequence, which can move a value across a rounding boundary and change it by one
  quantization step; such a flip can then grow through the layers behind it. Pass when
  |err| <= N quantization steps of the output (the scale of the DequantizeLinear producing it,
  else the largest activation scale in the model) + 1e-6 (`FakeQuantEngine.tolerance`), with
  1. N = 1 + S on an 8-bit output grid, S the recurrent layers (GRU / LSTM / RNN) on a path to
     the output (`rounding_depth`). A float32 sum of K terms of size |x| differs between two
     summation orders by about eps32 * sqrt(K) * |x|: eps32 * sqrt(K) * 2^7 steps of an 8-bit
     grid (1.5e-5 * sqrt(K), a flip in about one value in a thousand at K = 4096), so two flips
     meeting on one output are rarer still: one step. A recurrent layer's state is another
     matter, not float32's: the streaming model rounds it to Y's grid at every call (it is a
     model output), the offline one keeps it in float inside onnxruntime's operator, so each
     call perturbs the state by up to half a step; vad_lstm at chunk 1 shows 2 steps on y and
     1 on hn (16 sequences): one step more per recurrent layer.
  2. N = R (at least 1) on a 16-bit grid, R the roundings on a path to the output
     (`rounding_depth`: each QuantizeLinear of a computed value, and each recurrent state).
     The float32 difference is eps32 * sqrt(K) * 2^15 steps there (0.1 at K = 600): flips are
     the rule at every layer, not the exception. A rounding turns a difference of d steps into
     at most d + 1 (|round(a) - round(b)| <= |a - b| + 1), so, as long as no layer passes on
     more steps than it receives, the output is within R steps. Measured on the bundled models
     at --bits 16 (esp32p4 and esp32s3, chunk 1 and a larger one, 16 sequences): at most 2
     steps (stream_tcn, R = 14; vad_lstm, R = 5).
  A real streaming error (a frame lost or repeated, a state not fed back) moves outputs by a
  share of their range: thousands of steps of a 16-bit grid, far beyond R. The report also gives
  the fraction of values that are bit-exact, so a growing flip is visible.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import onnx

from espstream import log
from espstream.errors import CheckFailed, UserError, first_line

# ---- engines -----------------------------------------------------------------------------


class Runner(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def reset(self) -> None:
        """Start a new sequence (forget any state kept inside the runner)."""
        ...


class Engine(Protocol):
    name: str

    def load(self, model: onnx.ModelProto, label: str) -> Runner: ...

    def tolerance(self, model: onnx.ModelProto, output: str) -> tuple[float, float]:
        """(atol, rtol) for one output of the offline model."""
        ...


class OrtRunner:
    def __init__(self, model: onnx.ModelProto, label: str):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        # The model as written, not as onnxruntime rewrites it: its Pad fusion folds an explicit
        # zero Pad into a MaxPool's -inf padding (seen with onnxruntime 1.31), which changes
        # the result and would make the reference wrong.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # One thread: verification runs one sample (or one chunk) at a time through models
        # small enough for a microcontroller, where a thread pool costs more than it gains
        # (measured on the bundled models: 0.05 ms per call instead of 0.09-0.2 ms, and
        # sessions made in 0.7 ms instead of 1-15 ms on a busy 2-core machine).
        so.intra_op_num_threads = 1
        try:
            self.sess = ort.InferenceSession(
                model.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001
            first = first_line(e)
            raise UserError(f"{label}: onnxruntime cannot load it: {first}") from None
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self._kept: OutputMemo | None = None

    def reset(self) -> None:
        """Nothing to forget: onnxruntime sees the states only as inputs."""

    def keep_outputs(self) -> None:
        """From now on run the model once per distinct input and answer repeats from memory
        (its outputs depend on its inputs only: states come in as inputs)."""
        if self._kept is None:
            self._kept = OutputMemo()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = feeds_key(feeds) if self._kept is not None else None
        if key is not None and key in self._kept:
            return self._kept.get(key)
        try:
            out = self.sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001 - bad data shapes and the like
            first = first_line(e)
            raise UserError(f"onnxruntime cannot run the model on this data: {first}") from None
        res = dict(zip(self.outputs, out, strict=True))
        if key is not None:
            self._kept.put(key, res)
        return res


def feeds_key(feeds: dict[str, np.ndarray]) -> tuple:
    """A dict key that is equal for equal inputs (names, types, shapes and a SHA-256 of every
    byte): a digest rather than the bytes, so a kept entry does not hold a copy of its input."""
    return tuple(
        (name, a.dtype.str, a.shape, hashlib.sha256(np.ascontiguousarray(a).data).digest())
        for name, a in sorted((n, np.asarray(x)) for n, x in feeds.items())
    )


#: what one runner's kept outputs may hold (`OutputMemo`): convert's checks run the same few
#: samples through each offline model several times, and that reuse must not grow memory with
#: the sequence length or the number of samples (beyond the budget a repeat just runs again)
KEEP_BYTES = 64 << 20


class OutputMemo:
    """Outputs of an offline model by input (`feeds_key`), within `max_bytes` of arrays. An
    input whose outputs do not fit is kept only until the next one (so a check that asks for
    the same sample twice in a row still runs it once); beyond that it runs again when
    repeated, giving the same values."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = KEEP_BYTES if max_bytes is None else max_bytes
        self.bytes = 0
        self._entries: dict[tuple, dict[str, np.ndarray]] = {}
        self._last: tuple[tuple, dict[str, np.ndarray]] | None = None  # did not fit

    def __len__(self) -> int:
        """Inputs kept within the budget."""
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries or (self._last is not None and self._last[0] == key)

    def get(self, key: tuple) -> dict[str, np.ndarray]:
        if key in self._entries:
            return dict(self._entries[key])
        assert self._last is not None and self._last[0] == key
        return dict(self._last[1])

    def put(self, key: tuple, outputs: dict[str, np.ndarray]) -> None:
        n = sum(int(np.asarray(a).nbytes) for a in outputs.values())
        if self.bytes + n <= self.max_bytes:
            self._entries[key] = frozen(dict(outputs))
            self.bytes += n
        else:
            self._last = (key, frozen(dict(outputs)))


def frozen(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays made read-only: kept outputs are handed out again, so nobody may edit them."""
    for a in outputs.values():
        if isinstance(a, np.ndarray):
            a.flags.writeable = False
    return outputs


class KeptOutputs:
    """A runner of an offline (stateless) model that runs once per distinct input: for engines
    whose runners have no `keep_outputs()` of their own."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._kept = OutputMemo()

    def reset(self) -> None:
        self.runner.reset()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = feeds_key(feeds)
        if key in self._kept:
            return self._kept.get(key)
        out = dict(self.runner.run(feeds))
        self._kept.put(key, out)
        return out


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


class FloatEngine:
    name = "float"
    atol, rtol = 1e-5, 1e-4

    def load(self, model: onnx.ModelProto, label: str) -> Runner:
        return OrtRunner(model, label)

    def tolerance(self, model: onnx.ModelProto, output: str) -> tuple[float, float]:
        return self.atol, self.rtol


class FakeQuantEngine(FloatEngine):
    name = "fakequant"

    def load(self, model: onnx.ModelProto, label: str) -> Runner:
        if not _has_qdq(model):
            raise UserError(
                f"{label}: --engine fakequant needs a QDQ model (from `espstream calibrate`); "
                "use --engine float"
            )
        return OrtRunner(model, label)

    def tolerance(self, model: onnx.ModelProto, output: str) -> tuple[float, float]:
        """Module docstring, `fakequant`: 1 + S steps of an 8-bit grid, R steps of a 16-bit
        one (`rounding_depth`)."""
        step, bits = quant_grid(model, output)
        r, states = rounding_depth(model, output)
        steps = 1 + states if bits <= 8 else max(1, r)
        return steps * step + 1e-6, 0.0


#: operators that move values without computing (a QuantizeLinear behind them re-rounds nothing new)
MOVERS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Identity",
                    "MaxPool", "Concat", "Gather"})
#: the zero point's ONNX type -> bits of the grid
_ZP_BITS = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT16: 16,
            onnx.TensorProto.UINT16: 16}


def rounding_depth(model: onnx.ModelProto, output: str) -> tuple[int, int]:
    """(R, S) of the fake-quant tolerance, each the most on one path from a graph input to
    `output`. R: roundings, a QuantizeLinear of a value some node computed (not of a graph
    input, nor behind data movement only: MOVERS), and one more per recurrent node (GRU / LSTM
    / RNN). S: recurrent nodes, whose state the streaming model rounds between calls while the
    offline one keeps it in float inside the operator."""
    prod = {o: n for n in model.graph.node for o in n.output}
    depth: dict[str, tuple[int, int]] = {}
    for n in model.graph.node:
        r = max((depth.get(i, (0, 0))[0] for i in n.input if i), default=0)
        rec = max((depth.get(i, (0, 0))[1] for i in n.input if i), default=0)
        if n.op_type == "QuantizeLinear":
            p = prod.get(n.input[0])
            r += p is not None and p.op_type not in MOVERS
        elif n.op_type in ("GRU", "LSTM", "RNN"):
            r, rec = r + 1, rec + 1
        for o in n.output:
            depth[o] = (r, rec)
    return depth.get(output, (0, 0))


def quant_step(model: onnx.ModelProto, output: str) -> float:
    """Scale of the DequantizeLinear that produces `output` (through data movement), else the
    largest per-tensor activation scale of the model."""
    return quant_grid(model, output)[0]


def quant_grid(model: onnx.ModelProto, output: str) -> tuple[float, int]:
    """(step, bits) of `output`'s grid: the scale and zero-point width of the DequantizeLinear
    that produces it (through data movement), else the largest per-tensor activation scale of
    the model and the widest activation grid."""
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def scalar(name: str) -> float | None:
        if name in inits:
            v = onnx.numpy_helper.to_array(inits[name])
        elif name in consts:
            v = onnx.numpy_helper.to_array(consts[name].attribute[0].t)
        else:
            return None
        return float(v) if v.size == 1 else None

    def bits(n: onnx.NodeProto) -> int:
        zp = n.input[2] if len(n.input) > 2 else ""
        if zp in inits:
            return _ZP_BITS.get(inits[zp].data_type, 8)
        if zp in consts:
            return _ZP_BITS.get(consts[zp].attribute[0].t.data_type, 8)
        return 8  # no zero point: ONNX's default, uint8

    t = output
    for _ in range(64):
        n = prod.get(t)
        if n is None:
            break
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            s = scalar(n.input[1])
            if s is not None:
                return s, bits(n)
        if n.op_type not in MOVERS:
            break
        t = n.input[0]
    grids = [
        (scalar(n.input[1]), bits(n))
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits
    ]
    grids = [g for g in grids if g[0] is not None]
    if not grids:
        raise UserError("the model has no per-tensor activation DequantizeLinear: not a QDQ model")
    return max(g[0] for g in grids), max(g[1] for g in grids)


ENGINES: dict[str, Callable[[], Engine]] = {"float": FloatEngine, "fakequant": FakeQuantEngine}


def register_engine(name: str, factory: Callable[[], Engine]) -> None:
    """Add an engine (e.g. the integer simulator) under `name`."""
    ENGINES[name] = factory


def get_engine(name: str | None, offline: onnx.ModelProto) -> Engine:
    if name is None:
        name = "fakequant" if _has_qdq(offline) else "float"
    if name not in ENGINES:
        raise UserError(f"--engine {name}: unknown; choose one of {', '.join(sorted(ENGINES))}")
    return ENGINES[name]()


# ---- the streaming contract ----------------------------------------------------------------


@dataclass
class StreamMeta:
    chunk: int
    time_axes: dict[str, int]
    states: list[tuple[str, str]]
    delay: dict[str, int]
    warmup: dict[str, int]


def read_meta(model: onnx.ModelProto, label: str = "streaming model") -> StreamMeta:
    meta = {p.key: p.value for p in model.metadata_props}
    if "espstream.chunk" not in meta:
        raise UserError(
            f"{label}: not a streaming model (no espstream.chunk metadata); make one with "
            "`espstream streamify`"
        )
    try:
        res = StreamMeta(
            chunk=int(json.loads(meta["espstream.chunk"])),
            time_axes={k: int(v) for k, v in json.loads(meta["espstream.time_axes"]).items()},
            states=[tuple(p) for p in json.loads(meta.get("espstream.states", "[]"))],
            delay={k: int(v) for k, v in json.loads(meta.get("espstream.delay", "{}")).items()},
            warmup={k: int(v) for k, v in json.loads(meta.get("espstream.warmup", "{}")).items()},
        )
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{label}: malformed espstream metadata ({e})") from None
    for name, dims, _ in _input_specs(model):
        if res.time_axes.get(name) == 0:  # streamify refuses it; a hand-edited file may not
            from espstream.stream.axes import batch_axis_error

            raise batch_axis_error(name, dims)
    return res


def _input_specs(model: onnx.ModelProto) -> list[tuple[str, list[int | None], np.dtype]]:
    """(name, dims with None where unknown, dtype) of each graph input (calibrate's listing)."""
    from espstream.quant.data import model_inputs

    return [(s.name, list(s.shape), s.dtype) for s in model_inputs(model)]


# ---- results ----------------------------------------------------------------------------------


@dataclass
class OutputCheck:
    name: str
    kind: str
    compared: int = 0  # frames (time) or 1 (summary)
    frames: str = ""
    max_abs: float = 0.0
    sqnr_db: float = math.inf
    first_diff: int | None = None
    exact: float = 1.0
    atol: float = 0.0
    rtol: float = 0.0
    ok: bool = True
    skipped: str = ""
    _sig: float = 0.0
    _err: float = 0.0
    _n: int = 0
    _n_exact: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.name,
            "kind": self.kind,
            "compared": self.compared,
            "frames": self.frames,
            "max_abs_error": self.max_abs,
            "sqnr_db": None if math.isinf(self.sqnr_db) else self.sqnr_db,
            "first_differing_frame": self.first_diff,
            "exact_fraction": self.exact,
            "atol": self.atol,
            "rtol": self.rtol,
            "ok": self.ok,
            "skipped": self.skipped or None,
        }


@dataclass
class VerifyResult:
    engine: str
    chunk: int
    frames: int
    samples: int
    outputs: list[OutputCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refused: str | None = None  # why this chunk size could not be streamed (verify --chunks)

    @property
    def ok(self) -> bool:
        compared = [o for o in self.outputs if not o.skipped]
        return self.refused is None and bool(compared) and all(o.ok for o in compared)

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "chunk": self.chunk,
            "frames": self.frames,
            "samples": self.samples,
            "ok": self.ok,
            "outputs": [o.to_json() for o in self.outputs],
            "notes": self.notes,
            "refused": self.refused,
        }

    def failure(self) -> str:
        if self.refused is not None:
            return f"chunk {self.chunk}: not checked: {self.refused}"
        bad = [o for o in self.outputs if not o.skipped and not o.ok]
        if bad:
            o = bad[0]
            shape = next((n for n in self.notes if n.startswith(f"{o.name}: shape ")), None)
            if shape is not None:
                return f"chunk {self.chunk}: output {shape}"
            return (
                f"chunk {self.chunk}: output {o.name!r} differs from offline: max |err| "
                f"{o.max_abs:.3g} (tolerance {o.atol:.3g} + {o.rtol:.3g}*|ref|), first at frame "
                f"{o.first_diff}"
            )
        reasons = [f"output {o.name!r}: {o.skipped}" for o in self.outputs if o.skipped]
        why = "; ".join(reasons + self.notes) or "the model has no outputs"
        return f"chunk {self.chunk}: no output could be compared ({why})"

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise CheckFailed(self.failure())


# ---- running --------------------------------------------------------------------------------


def _take(x: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(lo, hi)
    return x[tuple(idx)]


def run_stream(runner: Runner, model: onnx.ModelProto, meta: StreamMeta,
               inputs: dict[str, np.ndarray], n_calls: int) -> dict[str, np.ndarray]:
    """A new sequence (`runner.reset()`), then `n_calls` chunks with the states fed back; time
    outputs laid end to end, others from the last call."""
    specs = {n: (d, t) for n, d, t in _input_specs(model)}
    fed = set(inputs) | {si for si, _so in meta.states}
    for name in specs:
        if name not in fed:
            raise UserError(
                f"streaming model: input {name!r} is neither an offline input nor a state "
                "listed in espstream.states"
            )
    states = {}
    for sin, _sout in meta.states:
        dims, dt = specs[sin]
        if any(d is None for d in dims):
            raise UserError(f"streaming model: state {sin!r} has no static shape")
        states[sin] = np.zeros(dims, dtype=dt)
        if sin in inputs:  # an explicit recurrent state the offline model also takes
            states[sin] = np.asarray(inputs[sin], dtype=dt).reshape(dims)
    inputs = {n: x for n, x in inputs.items() if n not in states}
    collected: dict[str, list[np.ndarray]] = {}
    last: dict[str, np.ndarray] = {}
    runner.reset()
    c = meta.chunk
    state_outs = {so for _si, so in meta.states}
    for k in range(n_calls):
        feeds = dict(states)
        for name, x in inputs.items():
            ax = meta.time_axes[name]
            feeds[name] = np.ascontiguousarray(_take(x, ax, k * c, (k + 1) * c))
        res = runner.run(feeds)
        for sin, sout in meta.states:
            states[sin] = res[sout]
        for name, v in res.items():
            if name in state_outs:
                last[name] = v  # an explicit state output is also an offline summary output
                continue
            if name in meta.time_axes:
                collected.setdefault(name, []).append(v)
            else:
                last[name] = v
    out = {n: np.concatenate(v, axis=meta.time_axes[n]) for n, v in collected.items()}
    out.update(last)
    return out


def _accumulate(chk: OutputCheck, ref: np.ndarray, got: np.ndarray, axis: int | None,
                first_frame: int) -> None:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    err = np.abs(got - ref)
    bad = err > chk.atol + chk.rtol * np.abs(ref)
    chk.max_abs = max(chk.max_abs, float(err.max(initial=0.0)))
    chk._sig += float(np.sum(ref * ref))
    chk._err += float(np.sum(err * err))
    chk._n += err.size
    chk._n_exact += int(np.sum(err == 0))
    if bad.any():
        chk.ok = False
        if axis is not None:
            per_frame = np.moveaxis(bad, axis, 0).reshape(bad.shape[axis], -1).any(axis=1)
            f = first_frame + int(np.argmax(per_frame))
            chk.first_diff = f if chk.first_diff is None else min(chk.first_diff, f)
    chk.sqnr_db = math.inf if chk._err == 0 else 10 * math.log10(max(chk._sig, 1e-300) / chk._err)
    chk.exact = chk._n_exact / chk._n if chk._n else 1.0


def _make_inputs(offline: onnx.ModelProto, meta: StreamMeta, data, random: int | None,
                 frames: int | None, seed: int) -> tuple[list[dict[str, np.ndarray]], int]:
    specs = _input_specs(offline)
    time_inputs = [s for s in specs if s[0] in meta.time_axes]
    if not time_inputs:
        raise UserError("the streaming model's metadata names none of the offline inputs")
    samples: list[dict[str, np.ndarray]] = []
    if data is not None:
        if isinstance(data, np.ndarray):
            if len(specs) != 1:
                raise UserError(
                    "--data: the model has several inputs; give an .npz with one array per input"
                )
            data = {specs[0][0]: data}
        n = None
        for name, dims, dt in specs:
            if name not in data:
                raise UserError(f"--data: no array for input {name!r}")
            arr = np.asarray(data[name])
            if arr.ndim == len(dims) - 1:
                arr = arr[None]
            if arr.ndim != len(dims):
                raise UserError(
                    f"--data: input {name!r} expects [N, {', '.join(map(str, dims[1:]))}], "
                    f"got shape {list(arr.shape)}"
                )
            tax = meta.time_axes.get(name)
            for i in range(1, len(dims)):
                if i != tax and dims[i] and arr.shape[i] != dims[i]:
                    raise UserError(
                        f"--data: input {name!r} expects "
                        f"[N, {', '.join(str(d) for d in dims[1:])}], got {list(arr.shape)}"
                    )
            n = arr.shape[0] if n is None else min(n, arr.shape[0])
            data[name] = arr.astype(dt)
        for k in range(n):
            samples.append({name: data[name][k : k + 1] for name, _d, _t in specs})
    else:
        rng = np.random.default_rng(seed)
        for _ in range(random or 4):
            sample = {}
            for name, dims, dt in specs:
                shape = []
                for i, d in enumerate(dims):
                    if name in meta.time_axes and i == meta.time_axes[name]:
                        shape.append(d if d else (frames or max(64, 8 * meta.chunk)))
                    else:
                        shape.append(d if d else 1)
                sample[name] = rng.standard_normal(shape).astype(dt)
            samples.append(sample)
    lengths = {s[name].shape[meta.time_axes[name]] for s in samples for name, *_ in time_inputs}
    if len(lengths) != 1:
        raise UserError(f"the time inputs have different lengths {sorted(lengths)}")
    T = lengths.pop()
    for name, dims, _dt in time_inputs:
        fixed = dims[meta.time_axes[name]]
        if fixed and fixed != T:
            raise UserError(
                f"input {name!r} of the offline model has a fixed length of {fixed} frames; "
                f"the data has {T}"
            )
    if frames is not None and frames != T:
        raise UserError(f"--frames {frames}: the offline model / data has {T} frames")
    return samples, T


def offline_analysis(offline: onnx.ModelProto, axes: dict[str, int], overrides: Any,
                     frames: int) -> tuple[dict[str, Any] | None, str | None]:
    """(the time-axis analysis of each output of `offline` at `frames` frames, None) or, when
    the rules do not cover the graph, (None, a note saying every produced frame is compared)."""
    from espstream.stream.streamify import analyze

    try:
        return analyze(offline, axes=axes, overrides=overrides, frames=frames).outputs, None
    except UserError as e:
        return None, f"offline analysis failed ({e}); every produced frame is compared"


class VerifyCache:
    """What several `verify_models` calls on the same offline model can share (`convert`
    verifies one offline model with several engines and then measures its SQNR):

    1. the offline model's time-axis analysis, per input axes and length (one `analyze`
       instead of one per call);
    2. one runner per engine and offline model, which runs the model once per distinct input
       (an offline model keeps no state: the same input gives the same outputs). A streaming
       model gets a new runner, or the one given with `add_runner`; its outputs are never
       kept (they depend on the calls before), and `run_stream` resets it per sequence.

    Models are told apart by identity and kept referenced, so the cache must not outlive a
    model that is edited in place.
    """

    def __init__(self) -> None:
        self._analyses: dict[tuple, tuple[dict[str, Any] | None, str | None]] = {}
        self._runners: dict[tuple[str, int], Runner] = {}
        self._models: list[Any] = []  # keeps every keyed object alive, so ids stay unique

    def analysis(self, offline: onnx.ModelProto, axes: dict[str, int], overrides: Any,
                 frames: int) -> tuple[dict[str, Any] | None, str | None]:
        key = (id(offline), tuple(sorted(axes.items())), id(overrides), frames)
        if key not in self._analyses:
            self._models += [offline, overrides]
            self._analyses[key] = offline_analysis(offline, axes, overrides, frames)
        return self._analyses[key]

    def add_streamify_analysis(self, offline: onnx.ModelProto, result: Any,
                               overrides: Any) -> None:
        """Take the offline analysis `streamify_model(offline, ..., overrides=overrides)` made
        (`result`, a StreamifyResult): `analyze` of the same model with the same overrides and
        the time axes it found, so it is what `analysis` would compute at those frames. Used
        only when every time input had the same length (verify runs one length)."""
        lengths = set(result.offline_frames.values())
        if len(lengths) != 1:
            return
        axes = {n: int(i["axis"]) for n, i in result.input_axes.items()}
        key = (id(offline), tuple(sorted(axes.items())), id(overrides), lengths.pop())
        self._models += [offline, overrides]
        self._analyses.setdefault(key, (dict(result.offline_outputs), None))

    def runner(self, engine: Engine, model: onnx.ModelProto, label: str) -> Runner:
        """The engine's runner for an offline `model` (made on first use, with `label`)."""
        key = (engine.name, id(model))
        if key not in self._runners:
            r = engine.load(model, label)
            keep = getattr(r, "keep_outputs", None)
            if keep is not None:
                keep()
            else:
                r = KeptOutputs(r)
            self.add_runner(engine.name, model, r)
        return self._runners[key]

    def add_runner(self, engine: str, model: onnx.ModelProto, runner: Runner) -> None:
        """Use `runner` (made by the caller, e.g. on a graph it lowered already) as the
        `engine` runner of `model`. A streaming model's runner serves one call after another:
        `run_stream` resets it before every sequence."""
        self._models.append(model)
        self._runners[(engine, id(model))] = runner

    def streaming_runner(self, engine: Engine, model: onnx.ModelProto, label: str) -> Runner:
        """The runner given for a streaming `model` with `add_runner`, else a new one."""
        return self._runners.get((engine.name, id(model))) or engine.load(model, label)


def verify_models(
    offline: onnx.ModelProto,
    streaming: onnx.ModelProto,
    data: Any = None,
    random: int | None = None,
    frames: int | None = None,
    engine: str | None = None,
    seed: int = 0,
    overrides: Any = None,
    cache: VerifyCache | None = None,
) -> VerifyResult:
    """Run both models and compare (module docstring). Never raises CheckFailed itself.

    cache: shares the offline analysis and the offline runner with other calls on the same
    offline model (`VerifyCache`); the comparison is the same.
    """
    meta = read_meta(streaming)
    eng = get_engine(engine, offline)
    samples, T = _make_inputs(offline, meta, data, random, frames, seed)
    res = VerifyResult(engine=eng.name, chunk=meta.chunk, frames=T, samples=len(samples))
    names = {s[0] for s in _input_specs(offline)}
    in_axes = {n: a for n, a in meta.time_axes.items() if n in names}
    if cache is not None:
        infos, note = cache.analysis(offline, in_axes, overrides, T)
        off = cache.runner(eng, offline, "offline model")
        st = cache.streaming_runner(eng, streaming, "streaming model")
    else:
        infos, note = offline_analysis(offline, in_axes, overrides, T)
        off = eng.load(offline, "offline model")
        st = eng.load(streaming, "streaming model")
    if note:
        res.notes.append(note)
    C = meta.chunk
    n_calls = T // C
    if n_calls == 0:
        raise UserError(f"{T} frames is less than one chunk of {C}; use --frames >= {C}")
    from espstream.stream.axes import Time

    checks: dict[str, OutputCheck] = {}
    for sample in samples:
        ref = off.run(sample)
        got = run_stream(st, streaming, meta, sample, n_calls)
        for name, r in ref.items():
            inf = infos.get(name) if infos is not None else None
            kind = "time" if name in meta.time_axes else "summary"
            chk = checks.get(name)
            if chk is None:
                atol, rtol = eng.tolerance(offline, name)
                chk = checks[name] = OutputCheck(name, kind, atol=atol, rtol=rtol)
            if name not in got:
                chk.skipped = "the streaming model has no such output"
                continue
            g = got[name]
            if kind == "time" and isinstance(inf, Time):
                d = meta.delay.get(name, 0)
                if inf.delay != d:
                    note = f"{name}: metadata delay {d} differs from the analysis ({inf.delay})"
                    if note not in res.notes:
                        res.notes.append(note)
            compare_output(chk, res, r, g, meta, inf, T, C)
    res.outputs = list(checks.values())
    return res


def compare_output(chk: OutputCheck, res: VerifyResult, r: np.ndarray, g: np.ndarray,
                   meta: StreamMeta, inf: Any, T: int, C: int) -> None:
    """Fold one sequence's offline output `r` and streamed output `g` into `chk`.

    A time output is compared frame by frame after shifting the stream by its delay, over the
    frames the stream can reproduce (from the warm-up to the last frame not made of offline
    right padding, as the offline analysis `inf` says); a window output after the last chunk,
    when the stream ends on the offline last frame.
    """
    from espstream.stream.axes import Summary, Time

    name = chk.name
    if chk.kind == "time":
        ax = meta.time_axes[name]
        d = meta.delay.get(name, 0)
        w = meta.warmup.get(name, 0)
        valid = r.shape[ax]
        if isinstance(inf, Time):
            w, valid = max(w, inf.warmup), inf.valid
        lo, hi = w, min(valid, r.shape[ax], g.shape[ax] - d)
        if hi <= lo:
            chk.skipped = f"no frame to compare (frames {lo}..{hi - 1}); use more frames"
            return
        chk.frames, chk.compared = f"{lo}..{hi - 1}", hi - lo
        _accumulate(chk, _take(r, ax, lo, hi), _take(g, ax, lo + d, hi + d), ax, lo)
        return
    if isinstance(inf, Summary) and not inf.comparable:
        chk.skipped = "the window lags the offline one or sees warm-up frames"
        return
    if T % C:
        chk.skipped = f"{T} frames is not a multiple of the chunk {C}"
        return
    if g.shape != r.shape:
        chk.ok = False
        chk.skipped = ""
        res.notes.append(f"{name}: shape {list(g.shape)} vs offline {list(r.shape)}")
        return
    chk.compared, chk.frames = 1, "after the last chunk"
    _accumulate(chk, r, g, None, 0)


def print_result(res: VerifyResult) -> None:
    from espstream.report import table

    if res.refused is not None:
        log.info(f"verify: engine {res.engine}, chunk {res.chunk}: not checked: {res.refused}")
        return
    rows = []
    for o in res.outputs:
        if o.skipped:
            rows.append([o.name, o.kind, "-", "-", "-", "-", "-", f"skipped: {o.skipped}"])
            continue
        sq = "inf" if math.isinf(o.sqnr_db) else f"{o.sqnr_db:.1f}"
        rows.append([
            o.name, o.kind, o.frames, f"{o.max_abs:.3g}", sq,
            "-" if o.first_diff is None else o.first_diff, f"{100 * o.exact:.1f}%",
            "ok" if o.ok else "FAIL",
        ])
    log.info(
        f"verify: engine {res.engine}, chunk {res.chunk}, {res.samples} sequence(s) of "
        f"{res.frames} frames"
    )
    log.info(table(["output", "kind", "frames", "max|err|", "SQNR dB", "first diff", "exact",
                    "result"], rows))
    for n in res.notes:
        log.warn(n)


def verify_chunks(
    offline: onnx.ModelProto,
    chunks: list[int],
    axes: dict[str, int] | None = None,
    overrides: Any = None,
    **kw: Any,
) -> list[VerifyResult]:
    """Streamify `offline` at each chunk size and verify each. A size streamify or verify
    refuses (a UserError) is a result with `refused` set, and the other sizes are still
    checked; when every size is refused, the first refusal is raised."""
    from espstream.stream.streamify import streamify_model

    out = []
    for c in chunks:
        try:
            sm = streamify_model(offline, c, axes=axes, overrides=overrides)
            out.append(verify_models(offline, sm.model, overrides=overrides, **kw))
        except UserError as e:
            out.append(VerifyResult(engine=kw.get("engine") or "float", chunk=c, frames=0,
                                    samples=0, refused=str(e)))
    if out and all(r.refused is not None for r in out):
        raise UserError("; ".join(f"--chunks {r.chunk}: {r.refused}" for r in out))
    return out


__all__ = [
    "ENGINES",
    "Engine",
    "Runner",
    "VerifyCache",
    "VerifyResult",
    "register_engine",
    "read_meta",
    "run_stream",
    "verify_chunks",
    "verify_models",
    "Fraction",
]


def parse_chunks(text: str) -> list[int]:
    """`--chunks 1,2,4` -> [1, 2, 4]; an empty entry (`1,,2`, a trailing comma) is an error,
    not skipped, since it is most likely a size the user meant to give."""
    try:
        chunks = [int(v) for v in text.split(",")]
    except ValueError:
        chunks = []
    if not chunks or any(c < 1 for c in chunks):
        raise UserError(f"--chunks {text!r}: expected positive frame counts such as 1,2,4")
    return chunks


def with_input_values(model: onnx.ModelProto, data: Any, values: dict[str, float]) -> Any:
    """--data plus `--input-value NAME=V`: the named inputs get V in every sample.

    1. Every name must be an input of `model` and none may have an array in `data` too.
    2. A single .npy array goes to the one input left unnamed (with several left: an .npz).
    3. A named input's array is V in the input's type, [N, *its shape after axis 0], N the
       data's sample count; its shape must be fixed (states are).
    """
    if not values:
        return data
    from espstream.quant.data import check_value_names, model_inputs

    specs = model_inputs(model)
    check_value_names(values, specs)
    rest = [s.name for s in specs if s.name not in values]
    if isinstance(data, np.ndarray):
        if len(rest) != 1:
            raise UserError("--data: with --input-value, a single array needs exactly one "
                            f"input left unnamed (left: {', '.join(rest) or 'none'}); give an "
                            ".npz with one array per input")
        data = {rest[0]: data}
    both = sorted(set(values) & set(data))
    if both:
        raise UserError(f"--input-value {both[0]}: --data has an array for it too; give one")
    n = min((np.asarray(a).shape[0] for a in data.values() if np.asarray(a).ndim), default=1)
    out = dict(data)
    for spec in specs:
        if spec.name in values:
            if any(d is None for d in spec.shape[1:]):
                raise UserError(f"--input-value {spec.name}: its shape {list(spec.shape)} is "
                                "not fixed; give its values in an .npz")
            out[spec.name] = np.full((n, *spec.shape[1:]), values[spec.name], spec.dtype)
    return out


def load_data(path: str) -> Any:
    """--data: an .npy array [N, ...] (one input) or an .npz with one array per input."""
    import io
    import zipfile

    from espstream.modelio import read_bytes

    raw = read_bytes(path, "data file")
    try:
        obj = np.load(io.BytesIO(raw), allow_pickle=False)
        arrays = {"": obj} if isinstance(obj, np.ndarray) else {k: obj[k] for k in obj.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not an .npy/.npz file ({e})") from None
    for key, a in arrays.items():
        where = f"{path}" + (f", array {key!r}" if key else "")
        if a.dtype.kind not in "fiub":  # complex would lose its imaginary part silently
            raise UserError(f"{where}: element type {a.dtype}; expected real numbers")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = "NaN" if np.isnan(a).any() else "Inf"
            raise UserError(f"{where}: contains {bad}; input data must be finite")
    return arrays[""] if isinstance(obj, np.ndarray) else arrays

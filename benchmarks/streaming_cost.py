"""Cost per new frame of a streamify'd model against re-running the offline model on a window.

    .venv/bin/python benchmarks/streaming_cost.py [--out benchmarks/results/streaming_cost.json]
                                                  [--seconds 3]

Models: models/tutorial_tcn (chunk 3), models/stream_tcn (chunk 4), models/kws2d (chunk 1) and
the ESP-PPQ fixtures tests/data/esp-ppq/{tutorial_tcn (chunk 3), stream_tcn (chunk 4)}. Each
float model goes through `optimize_model`; the optimized model is the offline model, and
`streamify_model(optimized, chunk)` the streaming one. Both run in onnxruntime on one thread
(intra- and inter-op), default graph optimizations, plain `InferenceSession.run` with NumPy
feeds, as a user's loop would.

- streaming: one call per chunk of new frames, states carried from call to call over a long
  signal; cost per new frame = time per call / chunk.
- sliding window: what a user without streaming does: on every new chunk, re-run the offline
  model on the latest W frames; cost per new frame = time per window run / chunk. Two windows:
  - `offline`: W = the model's offline input length (24, 64, 32 frames);
  - `receptive`: the shortest window that still gives the new chunk's outputs exactly: the
    receptive field R of the last output frame (measured: the fewest trailing input frames
    that leave it unchanged when every earlier frame is replaced), plus chunk - 1 for outputs
    that keep the time axis. It is used only when it is shorter than the offline length and
    valid: the model, re-optimized with that input length, runs and gives the new chunk's
    outputs equal to the offline-length window's (else the row says why not).
Timing: the contenders of one model (streaming, each window, and an onnxruntime call of a lone
Identity on one chunk, the floor of any call from Python) are called in turn, the order rotating,
for `--seconds` in all, each call timed on its own; so every contender meets the same load from
the other processes on this shared machine. A time is the median per call (the 10th percentile
is kept beside it), and a ratio is the ratio of medians.
Before timing, the streaming outputs for the last chunk of a long signal are checked against the
window's outputs on the same trailing frames (rtol 1e-4, atol 1e-5).

Ceiling: the offline model is also timed at chunk, 2 chunks, T/4, T/2 and T input frames (the
lengths it accepts). At `chunk` frames it runs the model's operators on the new frames alone with
no state at all, which no streaming model can undercut; t(window) / t(chunk alone) is therefore
the most any streaming conversion can reach in onnxruntime, and is reported as the ceiling. A
straight line t(n) = a + b * n through the timed lengths gives the fixed cost a of a call and the
cost b of a frame: with a > 0, (a + b W) / (a + b chunk) < W / chunk for every W > chunk, so the
wall-time goal below is out of reach of any implementation and approached only as b W >> a.

Goal (issue 7): streaming at least (W / chunk) times cheaper per new frame than the window, i.e.
the measured ratio t(window) / t(chunk call) >= W / chunk. MACs per call come from streamify's
report (`per_chunk`) and from `count_macs` on the window model; their ratio is the arithmetic
saving, which the time ratio can reach only where compute, not the per-call overhead of
onnxruntime, dominates. One more row, not judged, is context: a synthetic wide TCN (stream_tcn's
layout with dense 128-channel convolutions, 128 frames offline, chunk 4), whose calls carry far
more arithmetic than the per-call overhead, to show how the time ratio moves as a model grows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from espstream.optimize import optimize_model
from espstream.stream.streamify import count_macs, streamify_model
from espstream.verify import read_meta

ROOT = Path(__file__).resolve().parent.parent
MODELS = [
    ("tutorial_tcn", ROOT / "models" / "tutorial_tcn.onnx", 3),
    ("stream_tcn", ROOT / "models" / "stream_tcn.onnx", 4),
    ("kws2d", ROOT / "models" / "kws2d.onnx", 1),
    ("esp-ppq/tutorial_tcn", ROOT / "tests" / "data" / "esp-ppq" / "tutorial_tcn" / "model.onnx",
     3),
    ("esp-ppq/stream_tcn", ROOT / "tests" / "data" / "esp-ppq" / "stream_tcn" / "model.onnx", 4),
]
RTOL, ATOL = 1e-4, 1e-5
# Context, not judged: a wide synthetic TCN (built here with models/build.py's Builder) where
# compute, not onnxruntime's per-call and per-node overhead, dominates a call.
WIDE = ("synthetic/wide_tcn", None, 4)
WIDE_CHANNELS, WIDE_FRAMES = 128, 128


def wide_tcn() -> onnx.ModelProto:
    """stream_tcn's shape with dense 128-channel kernel-3 convs: [1, 16, 128] -> [1, 16, 128]."""
    sys.path.insert(0, str(ROOT / "models"))
    from build import Builder

    c = WIDE_CHANNELS
    b = Builder(seed=11)
    h = b.conv("x", "pre", 16, c, [1], gain=1.0)
    for i, dilation in enumerate((1, 2, 4, 8)):
        scope = f"blocks.{i}"
        r = b.torch_pad(h, scope, [2 * dilation, 0], rank=3)
        r = b.conv(r, f"{scope}/conv", c, c, [3], dilations=[dilation], gain=0.5)
        r = b.unary("Relu", r, f"/{scope}/Relu")
        h = b.node("Add", [h, r], f"/Add_{i}")
    b.conv(h, "out", c, 16, [1], gain=0.5)
    return b.model("wide_tcn", "x", [1, 16, WIDE_FRAMES], "y", [1, 16, WIDE_FRAMES], "")


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _take(x: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(lo, hi)
    return np.ascontiguousarray(x[tuple(idx)])


def interleaved(calls: dict[str, Callable[[], object]], seconds: float) -> dict[str, dict]:
    """Seconds per call of each contender, calls interleaved (one of each in turn, the order
    rotating) for about `seconds` in all, so that every contender meets the same load from the
    other processes on the machine. Per contender: the median and the 10th percentile."""
    names = list(calls)
    for fn in calls.values():
        fn()  # warm-up: the first run allocates
    times: dict[str, list[float]] = {n: [] for n in names}
    clock = time.perf_counter
    start = clock()
    k = 0
    while clock() - start < seconds or k < 50:
        for j in range(len(names)):
            n = names[(j + k) % len(names)]
            fn = calls[n]
            t0 = clock()
            fn()
            times[n].append(clock() - t0)
        k += 1
    return {n: {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)),
                "calls": len(t)} for n, t in times.items()}


# ---- the two ways to process a stream ---------------------------------------------------------


class Streamer:
    """One chunk per call, states carried over; `step()` consumes the next chunk of `signal`."""

    def __init__(self, model: onnx.ModelProto, x_name: str, signal: np.ndarray) -> None:
        self.meta = read_meta(model)
        self.sess = session(model)
        self.x_name, self.signal = x_name, signal
        self.axis = self.meta.time_axes[x_name]
        self.state_outs = [so for _si, so in self.meta.states]
        shapes = {i.name: i.shape for i in self.sess.get_inputs()}
        self.zero = {si: np.zeros(shapes[si], np.float32) for si, _so in self.meta.states}
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.reset()

    def reset(self) -> None:
        self.states = dict(self.zero)
        self.pos = 0

    def step(self) -> dict[str, np.ndarray]:
        c = self.meta.chunk
        if self.pos + c > self.signal.shape[self.axis]:
            self.reset()
        feeds = dict(self.states)
        feeds[self.x_name] = _take(self.signal, self.axis, self.pos, self.pos + c)
        outs = dict(zip(self.out_names, self.sess.run(None, feeds), strict=True))
        for si, so in self.meta.states:
            self.states[si] = outs.pop(so)
        self.pos += c
        return outs


class Window:
    """Re-run an offline model on the latest `length` frames, sliding by `chunk` per call."""

    def __init__(self, model: onnx.ModelProto, x_name: str, axis: int, signal: np.ndarray,
                 length: int, chunk: int) -> None:
        self.sess = session(model)
        self.x_name, self.axis, self.signal = x_name, axis, signal
        self.length, self.chunk = length, chunk
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.end = length

    def run_at(self, end: int) -> dict[str, np.ndarray]:
        x = _take(self.signal, self.axis, end - self.length, end)
        return dict(zip(self.out_names, self.sess.run(None, {self.x_name: x}), strict=True))

    def step(self) -> dict[str, np.ndarray]:
        if self.end > self.signal.shape[self.axis]:
            self.end = self.length
        out = self.run_at(self.end)
        self.end += self.chunk
        return out


# ---- receptive field and the window model -----------------------------------------------------


def with_time_length(model: onnx.ModelProto, x_name: str, axis: int, frames: int,
                     out_axes: dict[str, int]) -> onnx.ModelProto:
    """The float model with `frames` input frames (outputs' time dims left open), optimized."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name == x_name:
            vi.type.tensor_type.shape.dim[axis].dim_value = frames
    for vi in m.graph.output:
        if vi.name in out_axes:
            d = vi.type.tensor_type.shape.dim[out_axes[vi.name]]
            d.Clear()
            d.dim_param = "T"
    del m.graph.value_info[:]
    return optimize_model(m).model


def last_frames(outs: dict[str, np.ndarray], out_axes: dict[str, int], k: int) -> dict:
    """Per output: its last k frames (time outputs) or all of it (summary outputs)."""
    return {n: (_take(v, out_axes[n], v.shape[out_axes[n]] - k, v.shape[out_axes[n]])
                if n in out_axes else v) for n, v in outs.items()}


def receptive_field(sess: ort.InferenceSession, x_name: str, shape: list[int], axis: int,
                    out_axes: dict[str, int]) -> int:
    """Fewest trailing input frames that fix the last output frame (earlier frames replaced)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    ref = last_frames(dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {x_name: x}),
                               strict=True)), out_axes, 1)
    T = shape[axis]
    noise = rng.standard_normal(shape).astype(np.float32) * 3.0
    for keep in range(1, T + 1):
        y = x.copy()
        idx = [slice(None)] * y.ndim
        idx[axis] = slice(0, T - keep)
        y[tuple(idx)] = noise[tuple(idx)]
        got = last_frames(dict(zip([o.name for o in sess.get_outputs()],
                                   sess.run(None, {x_name: y}), strict=True)), out_axes, 1)
        if all(np.allclose(got[n], ref[n], rtol=1e-6, atol=1e-7) for n in ref):
            return keep
    return T


# ---- one model --------------------------------------------------------------------------------


def identity_model(shape: list[int]) -> onnx.ModelProto:
    """One Identity node: the floor of what any onnxruntime call costs from Python."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "floor",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def measure(name: str, path: Path | None, chunk: int, seconds: float) -> dict:
    float_model = onnx.load(str(path)) if path is not None else wide_tcn()
    offline = optimize_model(float_model).model
    st = streamify_model(offline, chunk)
    meta = read_meta(st.model)
    x_vi = offline.graph.input[0]
    x_name = x_vi.name
    shape = [d.dim_value for d in x_vi.type.tensor_type.shape.dim]
    axis = meta.time_axes[x_name]
    T = shape[axis]
    out_axes = {n: a for n, a in meta.time_axes.items() if n != x_name}
    macs_chunk = int(st.macs["per_chunk"])
    row: dict = {"model": name, "chunk": chunk, "offline_frames": T,
                 "delay": meta.delay, "time_outputs": sorted(out_axes),
                 "state_bytes_float32": st.state_bytes_float32,
                 "macs": st.macs}

    long_shape = list(shape)
    long_shape[axis] = T * 8
    signal = np.random.default_rng(0).standard_normal(long_shape).astype(np.float32)
    streamer = Streamer(st.model, x_name, signal)

    rf = receptive_field(session(offline), x_name, shape, axis, out_axes)
    row["receptive_field"] = rf
    windows = {"offline": (T, offline, int(st.macs["offline_total"]))}
    need = rf + (chunk - 1 if out_axes else 0)
    if any(d for d in meta.delay.values()):
        row["receptive_window"] = "not used: an output has a delay"
    elif need >= T:
        row["receptive_window"] = f"not used: {need} frames is not shorter than the offline {T}"
    else:
        try:
            short = with_time_length(float_model, x_name, axis, need, out_axes)
            sshape = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
                      for vi in [*short.graph.input, *short.graph.output, *short.graph.value_info]}
            sshape.update({i.name: list(i.dims) for i in short.graph.initializer})
            windows["receptive"] = (need, short, count_macs(short, sshape))
        except Exception as e:  # the model may hard-code its length: then no shorter window
            row["receptive_window"] = f"not used: the model does not take {need} frames ({e})"

    # Same answer (and the short window's validity): after streaming the signal up to `end`,
    # the last chunk's outputs equal each window's on the frames that end at `end`.
    end = (T // chunk + 2) * chunk
    for _ in range(end // chunk):
        got = streamer.step()
    got = last_frames(got, out_axes, chunk)
    streamer.reset()
    contenders: dict[str, Window] = {}
    diffs: dict[str, float] = {}
    for kind, (length, model, _macs) in list(windows.items()):
        win = Window(model, x_name, axis, signal, length, chunk)
        ref = last_frames(win.run_at(end), out_axes, chunk)
        diffs[kind] = max(float(np.max(np.abs(ref[n] - got[n]))) for n in ref)
        if not all(np.allclose(got[n], ref[n], rtol=RTOL, atol=ATOL) for n in ref):
            if kind == "receptive":
                row["receptive_window"] = (f"not used: its outputs differ from streaming by "
                                           f"{diffs[kind]:.3g}")
                del windows[kind]
                continue
            raise SystemExit(f"{name}: streaming and the offline window disagree by "
                             f"{diffs[kind]:.3g}")
        contenders[kind] = win

    chunk_shape = list(shape)
    chunk_shape[axis] = chunk
    floor_sess = session(identity_model(chunk_shape))
    floor_x = np.zeros(chunk_shape, np.float32)
    calls = {"streaming": streamer.step, **{k: w.step for k, w in contenders.items()},
             "ort_floor": lambda: floor_sess.run(None, {"x": floor_x})}
    # The offline model at several input lengths: its cost t(n) = a + b*n, and, at n = chunk,
    # what the model's operators cost on the new frames alone, with no state at all.
    lengths, notes = length_calls(float_model, offline, x_name, axis, T, chunk, out_axes)
    for n, call in lengths.items():
        calls[f"frames_{n}"] = call
    if notes:
        row["length_notes"] = notes
    t = interleaved(calls, seconds)
    t_stream = t["streaming"]["median"]
    row["ort_floor_us_per_call"] = round(1e6 * t["ort_floor"]["median"], 2)
    row["streaming"] = {"us_per_call": _us(t["streaming"]), "calls": t["streaming"]["calls"],
                        "us_per_new_frame": round(1e6 * t_stream / chunk, 2),
                        "macs_per_call": macs_chunk, "macs_per_new_frame": macs_chunk / chunk}
    row["macs"]["streaming_per_frame_over_offline_per_frame"] = round(
        (macs_chunk / chunk) / (int(st.macs["offline_total"]) / T), 4)
    t_alone = t[f"frames_{chunk}"]["median"] if chunk in lengths else None
    if lengths:
        ns = sorted(lengths)
        a, b = np.polyfit(ns, [t[f"frames_{n}"]["median"] for n in ns], 1)[::-1]
        row["offline_cost_fit"] = {
            "frames": ns, "us_per_call": [_us(t[f"frames_{n}"]) for n in ns],
            "fixed_us": round(1e6 * a, 2), "us_per_frame": round(1e6 * b, 3),
            "frames_where_compute_equals_fixed": round(a / b, 1) if b > 0 else None}
    if t_alone is not None:
        row["chunk_alone"] = {"frames": chunk, "us_per_call": _us(t[f"frames_{chunk}"]),
                              "streaming_over_chunk_alone": round(t_stream / t_alone, 2)}
    row["windows"] = {}
    for kind, (length, _model, macs) in windows.items():
        t_win = t[kind]["median"]
        ratio = t_win / t_stream
        goal = length / chunk
        row["windows"][kind] = {
            "frames": length, "us_per_call": _us(t[kind]),
            "us_per_new_frame": round(1e6 * t_win / chunk, 2), "macs_per_call": macs,
            "macs_per_new_frame": macs / chunk, "max_abs_diff_vs_streaming": diffs[kind],
            "time_ratio": round(ratio, 2),
            "time_ratio_p10": round(t[kind]["p10"] / t["streaming"]["p10"], 2),
            "macs_ratio": round(macs / macs_chunk, 2),
            "goal_ratio": round(goal, 2), "goal_met": ratio >= goal,
        }
        if t_alone is not None:
            ceiling = t_win / t_alone
            row["windows"][kind]["ceiling_ratio"] = round(ceiling, 2)
            row["windows"][kind]["goal_reachable"] = ceiling >= goal
    return row


def fixed_call(model: onnx.ModelProto, x_name: str) -> Callable[[], object]:
    """One onnxruntime call of `model` on a fixed random input (timing only)."""
    sess = session(model)
    x = next(i for i in sess.get_inputs() if i.name == x_name)
    feed = {x_name: np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)}
    return lambda: sess.run(None, feed)


def length_calls(float_model: onnx.ModelProto, offline: onnx.ModelProto, x_name: str,
                 axis: int, T: int, chunk: int, out_axes: dict[str, int],
                 ) -> tuple[dict[int, Callable[[], object]], list[str]]:
    """A timed call of the optimized offline model at chunk, 2 chunks, T/4, T/2 and T input
    frames (those it accepts, each run once here), for the cost fit; the lengths it refuses
    are named in the notes."""
    calls = {T: fixed_call(offline, x_name)}
    notes = []
    for n in sorted({chunk, 2 * chunk, T // 4, T // 2} - {T}):
        if n < chunk:
            continue
        try:
            call = fixed_call(with_time_length(float_model, x_name, axis, n, out_axes), x_name)
            call()
        except Exception as e:  # a model may hard-code its length
            notes.append(f"{n} frames: not accepted ({str(e).splitlines()[0][:120]})")
            continue
        calls[n] = call
    return calls, notes


def _us(t: dict) -> dict:
    return {"median": round(1e6 * t["median"], 2), "p10": round(1e6 * t["p10"], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out",
                        default=str(ROOT / "benchmarks" / "results" / "streaming_cost.json"))
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="timing budget per model (all contenders interleaved)")
    args = parser.parse_args()

    rows = []
    for name, path, chunk in [*MODELS, WIDE]:
        print(f"-- {name} chunk {chunk}", flush=True)
        rows.append(measure(name, path, chunk, args.seconds))

    print(f"{'model':<22}{'chunk':>6}{'R':>4}{'window':>16}{'us/frame stream':>17}"
          f"{'us/frame window':>17}{'time x':>8}{'ceiling x':>10}{'goal x':>8}{'MACs x':>8}")
    headline: dict = {}
    for r in rows:
        for kind, w in r["windows"].items():
            ceiling = w.get("ceiling_ratio")
            print(f"{r['model']:<22}{r['chunk']:>6}{r['receptive_field']:>4}"
                  f"{kind + ' ' + str(w['frames']):>16}{r['streaming']['us_per_new_frame']:>17.1f}"
                  f"{w['us_per_new_frame']:>17.1f}{w['time_ratio']:>7.1f}x"
                  f"{ceiling if ceiling is not None else float('nan'):>9.1f}x"
                  f"{w['goal_ratio']:>7.1f}x{w['macs_ratio']:>7.1f}x")
            headline[f"{r['model']}.{kind}{w['frames']}"] = (
                f"window / streaming per new frame: time {w['time_ratio']}x "
                f"(ceiling {ceiling}x), MACs {w['macs_ratio']}x (goal {w['goal_ratio']}x)")
        for note in [r.get("receptive_window"), *r.get("length_notes", [])]:
            if note:
                print(f"{'':<22}{note}")
        fit = r.get("offline_cost_fit")
        if fit:
            print(f"{'':<22}offline model t(n) = {fit['fixed_us']} us + {fit['us_per_frame']} us "
                  f"x frames (compute equals the fixed cost at "
                  f"{fit['frames_where_compute_equals_fixed']} frames)")
    judged = [w for r in rows if not r["model"].startswith("synthetic/")
              for w in r["windows"].values()]
    headline["onnxruntime_floor_us_per_call"] = rows[0]["ort_floor_us_per_call"]
    headline["goal_met_all"] = all(w["goal_met"] for w in judged)
    headline["goal_met"] = (f"{sum(w['goal_met'] for w in judged)} of {len(judged)} windows "
                            "(synthetic row not judged)")
    reachable = [w for w in judged if "goal_reachable" in w]
    headline["goal_reachable"] = (
        f"{sum(w['goal_reachable'] for w in reachable)} of {len(reachable)} windows: the "
        "ceiling, window time / the offline model's time on one chunk alone (no state), "
        "bounds what any streaming model can reach in onnxruntime")
    headline["streaming_macs_per_frame_over_offline"] = {
        r["model"]: r["macs"]["streaming_per_frame_over_offline_per_frame"] for r in rows}
    result = {
        "benchmark": "streaming_cost",
        "engine": f"onnxruntime {ort.__version__}, 1 thread, CPUExecutionProvider",
        "timing": f"per call, contenders interleaved, {args.seconds} s per model; "
                  "ratios of medians",
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "headline": headline,
        "models": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

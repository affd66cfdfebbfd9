"""Simulator frames/s against onnxruntime on the same QDQ model, offline and chunked.

    .venv/bin/python benchmarks/simulator.py [--out benchmarks/results/simulator.json]
                                             [--seconds 2] [--frames 2000] [--chunk 8]

Models: a 6-block 128-channel TCN built here (input conv 40->128, six residual blocks
conv k3 dilation 1..32 + Relu + Add, output conv 128->16) at T = --frames, and the bundled
models/*.onnx at their own input length. Each goes through `convert_model` (--random 8, chunk
--chunk, target esp32p4); the calibrated QDQ model (offline) and the streamify'd QDQ model
(chunked) are the references, run in onnxruntime on one thread (intra- and inter-op), default
graph optimizations. The simulator runs `lower(...)` of the same two models (espstream.kernels,
Cython) on the integer inputs: offline one call on the whole signal, chunked one call per chunk
(the simulator keeps the caches; onnxruntime gets its states fed back). A GRU / LSTM model's
other inputs (initial states) are zeros offline; chunked, both engines start its recurrent
state from zeros and feed each call's state output to the next call.

`--zoo` adds the evaluation zoo's models (benchmarks/zoo.py, both halves; the ones streamify
refuses are rows with the reason) as models the simulator's fast paths were not tuned on: the
speed work was measured on the TCN and the bundled models only. Their rows are tagged `zoo`.

Timing: the contenders of a row alternate call for call for `--seconds`, so both meet the same
load on this shared machine; a figure is the median time per run (whole signal), converted to
frames/s; ratio = simulator frames/s / onnxruntime frames/s (>= 1.0 is the issue-18 goal).
Before timing, the simulator's offline output is checked bit-exact against `Simulator.run` with
the reference (NumPy) kernels on a short prefix, so a fast wrong path cannot score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from espstream.convert import convert_model  # noqa: E402
from espstream.kernels import reference  # noqa: E402
from espstream.lower import lower  # noqa: E402
from espstream.sim import Simulator  # noqa: E402


def tcn(frames: int, ch: int = 128, blocks: int = 6, n_in: int = 40, n_out: int = 16,
        seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(x: str, name: str, cin: int, cout: int, k: int, d: int) -> str:
        w = (rng.standard_normal((cout, cin, k)) / np.sqrt(cin * k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        inits.extend([onnx.numpy_helper.from_array(w, name + "_w"),
                      onnx.numpy_helper.from_array(b, name + "_b")])
        pad = d * (k - 1)
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name],
                                      name=name, kernel_shape=[k], dilations=[d],
                                      pads=[pad, 0]))
        return name

    h = conv("x", "inp", n_in, ch, 1, 1)
    for i in range(blocks):
        c = conv(h, f"b{i}_conv", ch, ch, 3, 2 ** i)
        r = f"b{i}_relu"
        nodes.append(helper.make_node("Relu", [c], [r], name=r))
        a = f"b{i}_add"
        nodes.append(helper.make_node("Add", [h, r], [a], name=a))
        h = a
    y = conv(h, "out", ch, n_out, 1, 1)
    nodes.append(helper.make_node("Identity", [y], ["y"], name="y_id"))
    g = helper.make_graph(nodes, "tcn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, n_in, frames])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out, frames])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def stream_meta(model: onnx.ModelProto):
    from espstream.verify import read_meta

    return read_meta(model)


def make_contenders(res, x: np.ndarray, chunk: int):
    """(name -> callable running the whole signal) for offline and chunked, both engines."""
    from espstream.verify_int8 import Int8Runner

    off_q = res.calibrated.model
    st_q = res.streamed.model
    meta = stream_meta(st_q)
    name = off_q.graph.input[0].name
    ax = meta.time_axes[name]
    T = x.shape[ax]
    n_calls = T // chunk
    x = np.take(x, np.arange(n_calls * chunk), axis=ax)

    ort_off = ort_session(off_q)
    ort_st = ort_session(st_q)
    st_inputs = {i.name: i for i in st_q.graph.input}

    # other inputs (a GRU / LSTM's initial state): zeros, for both engines
    off_feeds = {name: x}
    for i in off_q.graph.input[1:]:
        off_feeds[i.name] = np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim],
                                     np.float32)

    def ort_offline():
        ort_off.run(None, off_feeds)

    states0 = {}
    for sin, _so in meta.states:
        t = st_inputs[sin].type.tensor_type
        states0[sin] = np.zeros([d.dim_value for d in t.shape.dim], np.float32)
    out_names = [o.name for o in st_q.graph.output]
    chunks = [np.ascontiguousarray(np.take(x, np.arange(k * chunk, (k + 1) * chunk), axis=ax))
              for k in range(n_calls)]

    def ort_chunked():
        states = dict(states0)
        for c in chunks:
            feeds = dict(states)
            feeds[name] = c
            outs = dict(zip(out_names, ort_st.run(None, feeds), strict=True))
            for sin, sout in meta.states:
                states[sin] = outs[sout]

    r_off = Int8Runner(off_q, "offline")
    r_st = Int8Runner(st_q, "streaming")
    sim_off, sim_st = r_off.sim, r_st.sim
    q_off = {name: r_off.quantize(name, x)}
    for vi in sim_off.graph.inputs:
        if vi.name != name:
            q_off[vi.name] = np.zeros(vi.shape, vi.dtype)
    q_chunks = [{name: r_st.quantize(name, c)} for c in chunks]
    # GRU / LSTM states of the streaming model: zeros at start, each call's output fed back
    # (as `espstream.sim.run_chunks` and the application do)
    recurrent = json.loads(sim_st.graph.metadata.get("espstream.recurrent_states", "[]"))
    state0 = {r["input"]: np.zeros(sim_st.graph.value_info(r["input"]).shape,
                                   sim_st.graph.value_info(r["input"]).dtype) for r in recurrent}

    def chunked(sim, qs):
        sim.reset()
        state = dict(state0)
        outs = []
        for q in qs:
            res = sim.run({**q, **state})
            for r in recurrent:
                state[r["input"]] = res[r["output"]]
            outs.append(res)
        return outs

    def sim_offline():
        sim_off.run(q_off)

    def sim_chunked():
        chunked(sim_st, q_chunks)

    # bit-exactness guard: fast kernels == NumPy twin, offline and chunked (first 4 chunks)
    ref_off = Simulator(lower(off_q), reference, check_shapes=False)
    got = sim_off.run(q_off)
    want = ref_off.run(q_off)
    ok = all(np.array_equal(got[k], want[k]) for k in want)
    ref_st = Simulator(lower(st_q), reference)
    for g, w in zip(chunked(sim_st, q_chunks[:4]), chunked(ref_st, q_chunks[:4]), strict=True):
        ok = ok and all(np.array_equal(g[k], w[k]) for k in w)
    return T - T % chunk, ok, {
        "offline": (sim_offline, ort_offline),
        "chunked": (sim_chunked, ort_chunked),
    }


def time_pair(a, b, seconds: float) -> tuple[float, float]:
    a(), b()  # warm up
    ta, tb = [], []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end or len(ta) < 3:
        for f, acc in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
        i += 1
    return float(np.median(ta)), float(np.median(tb))


def bench(label: str, model: onnx.ModelProto, x: np.ndarray, chunk: int, seconds: float):
    res = convert_model(model, random=8, chunk=chunk, target="esp32p4", verify_samples=1)
    frames, ok, pairs = make_contenders(res, x, chunk)
    rows = []
    for mode, (s, o) in pairs.items():
        ts, to = time_pair(s, o, seconds)
        row = {"model": label, "mode": mode, "frames": frames, "chunk": chunk if mode ==
               "chunked" else None, "sim_frames_per_s": frames / ts,
               "ort_qdq_frames_per_s": frames / to, "ratio": to / ts, "bit_exact": ok}
        rows.append(row)
        print(f"{label:14s} {mode:8s} T={frames:5d}  simulator {frames / ts:10.0f} f/s  "
              f"onnxruntime QDQ {frames / to:10.0f} f/s  ratio {to / ts:5.2f}x"
              f"  bit-exact {ok}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/simulator.json"))
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--only-tcn", action="store_true")
    ap.add_argument("--zoo", action="store_true",
                    help="also the evaluation zoo's models (not tuned on)")
    a = ap.parse_args()
    rng = np.random.default_rng(1)
    rows = bench("tcn128x6", tcn(a.frames), rng.standard_normal((1, 40, a.frames))
                 .astype(np.float32), a.chunk, a.seconds)
    if not a.only_tcn:
        for p in sorted((ROOT / "models").glob("*.onnx")):
            m = onnx.load(str(p))
            x = np.load(str(p.with_suffix(".input.npy"))).astype(np.float32)
            try:
                rows += bench(p.stem, m, x, a.chunk, a.seconds)
            except Exception as e:  # a chunk this model cannot take is a row, not a crash
                print(f"{p.stem:14s} skipped: {type(e).__name__}: {e}", flush=True)
                rows.append({"model": p.stem, "error": f"{type(e).__name__}: {e}"})
    if a.zoo:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from zoo import make_inputs, zoo

        for zm in zoo():
            m = zm.build()
            shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
            x = make_inputs(zm.inputs, shape, 1, 7)
            try:
                got = bench(zm.name, m, x, a.chunk, a.seconds)
            except Exception as e:  # streamify's refusal (global pools, 2-D, lookahead)
                print(f"{zm.name:14s} skipped: {type(e).__name__}: {e}", flush=True)
                got = [{"model": zm.name, "error": f"{type(e).__name__}: {e}"}]
            for r in got:
                r["set"] = f"zoo ({zm.half})"
            rows += got
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    from espstream.kernels import _int8

    ok_rows = [r for r in rows if "ratio" in r]
    headline = {f"{r['model']} {r['mode']}": round(r["ratio"], 2) for r in ok_rows}
    for tag, sel in (("", lambda r: "set" not in r), ("zoo ", lambda r: "set" in r)):
        for mode in ("offline", "chunked"):
            low = [r["ratio"] for r in ok_rows if sel(r) and r["mode"] == mode]
            if low:
                headline[f"{tag}lowest {mode} ratio"] = round(min(low), 2)
        rs = [r for r in ok_rows if sel(r)]
        if rs:
            headline[f"{tag}goal >= 1.0x met on"] = (f"{sum(r['ratio'] >= 1.0 for r in rs)} of "
                                                     f"{len(rs)} rows")
    with open(a.out, "w") as f:
        json.dump({"headline": headline, "rows": rows, "seconds": a.seconds,
                   "conv_loop": "AVX-512 VNNI" if _int8.has_vnni() else "AVX2 / SSE2 / C",
                   "cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
                  f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

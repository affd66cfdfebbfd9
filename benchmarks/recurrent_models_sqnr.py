"""int8 / int16 SQNR of the bundled recurrent models: espstream's export beside ESP-PPQ 1.3.12's.

    PYTHONPATH=. .venv/bin/python benchmarks/recurrent_models_sqnr.py [--targets esp32p4,esp32s3]
        [--bits 8,16] [--held-out 16] [--chunk 4] [--no-ppq]
        [--out benchmarks/results/recurrent_models_sqnr.json]

Models: `models/kws_gru.onnx` (conv + GRU keyword spotter, `x [1, 10, 32] -> y [1, 12, 32]`) and
`models/vad_lstm.onnx` (LSTM VAD, `x [1, 16, 32]`, `h`, `c [1, 1, 16]` -> `y [1, 1, 32]`, `hn`,
`cn`), per target (esp32p4, esp32s3; any ESP-DL target name is taken) and width (int8, int16).

1. Calibration data, the same for both tools: the model's committed `models/NAME.calib.npy`
   (32 standard-normal samples); for vad_lstm with `h` = `c` = 0 (a stream's start), as
   models/README.md says to give it.
2. Held-out inputs, the same for every side: `--held-out` samples of `x` ~ N(0, 1) from seed
   4242 (neither the calibration data nor NAME.input.npy); vad_lstm's `h`, `c` at zero, as in
   calibration. The reference is onnxruntime on the float model.
3. espstream (its defaults): `optimize_model`, `calibrate_model`, then
   - `espstream_fakequant`: the QDQ model in onnxruntime;
   - `espstream`: `export_model`'s .espdl in espstream's integer simulator as the target (the
     headline figure: what the chip computes); `espstream_sim_vs_fakequant` is the SQNR of
     that against the QDQ model. The two differ by design on GRU / LSTM: the QDQ model keeps
     the gates and the state update float inside onnxruntime's operator, ESP-DL's computes
     them from tables and requantizes the state every step;
   - `espstream_stream`: `convert_model(..., chunk=--chunk)`'s streaming .espdl, chunk by
     chunk from a zero state with its recurrent states fed back (`espstream.sim.run_chunks`),
     and whether convert's checks all passed.
4. ESP-PPQ: benchmarks/ppq_side.py in benchmarks/.venv-ppq (`espdl_quantize_onnx` defaults,
   calib_steps 32, error report off; one tensor per model input from the same .npz), on up to
   three forms of the same float function, each recorded with its failure if it fails:
   - `esp_ppq`: the bundled ONNX as it is (ESP-PPQ 1.3.12 has no Dropout executor: "Op
     Execution Error: /head/Dropout");
   - `esp_ppq_optimized`: the float ONNX espstream's `optimize` writes from it (Dropout,
     Identity, the Pad chains and BatchNormalization folded, checked against the input in
     onnxruntime). kws_gru's GRU has no initial_h and no Y_h (legal ONNX, both optional), and
     ESP-PPQ's RNN alignment indexes both unconditionally (IndexError);
   - `esp_ppq_adapted` (only where a GRU / LSTM lacks them): that model with the layer's
     initial_h a graph input and Y_h a graph output (`with_explicit_state`), as ESP-DL's own
     operator tests give it, fed zeros for the new input.
   Its .espdl runs in the simulator (which reproduces ESP-PPQ's own test values,
   tests/test_ops_suite.py). The headline delta pairs `espstream` with the first form ESP-PPQ
   quantizes (`esp_ppq_compared_on`). On that form ESP-PPQ's `auto_streaming` export with
   `--chunk` frames a call is also run (`esp_ppq_stream`), chunk by chunk with the state pairs
   the model has as graph input / output fed back as an application would; the [ERROR] lines
   it logged and carried on after are kept (`esp_ppq_stream_logged_errors`).
5. SQNR = 10 log10(sum ref^2 / sum (ref - got)^2) over the held-out samples, per output and
   over all outputs pooled ("all"; for kws_gru that is `y`).

Neither side was tuned on these models or inputs: both run their defaults, and the held-out
inputs were not looked at before this script measured them. A step that fails (ESP-PPQ refusing
or crashing, a file the simulator cannot run) is recorded in the JSON with its error text, and
the other rows still run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from convert_vs_ppq import ANSI, LOG_PREFIX, PPQ_SIDE, _subprocess_json, ppq_available  # noqa: E402
from quant_quality import sqnr as _sqnr  # noqa: E402

MODELS = ("kws_gru", "vad_lstm")
STATE_ZERO = {"vad_lstm": ("h", "c")}  # explicit state inputs, given at zero
HELD_OUT_SEED = 4242
PPQ_PYTHON = ROOT / "benchmarks" / ".venv-ppq" / "bin" / "python"
if not PPQ_PYTHON.exists():
    PPQ_PYTHON = Path("/work/main/benchmarks/.venv-ppq/bin/python")


# ---- ESP-PPQ's side: benchmarks/ppq_side.py in benchmarks/.venv-ppq ---------------------------


def run_ppq(model: Path, calib: Path, out: Path, target: str, bits: int, steps: int,
            chunk: int | None = None) -> dict:
    """One `espdl_quantize_onnx` call (its JSON line: seconds, versions, and the [ERROR] lines
    ESP-PPQ logged and carried on after); RuntimeError with ESP-PPQ's own error line when it
    stops."""
    cmd = [str(PPQ_PYTHON), str(PPQ_SIDE), str(model), str(calib), str(out), "--target", target,
           "--bits", str(bits), "--calib-steps", str(steps)]
    cmd += ["--chunk", str(chunk)] if chunk else []
    res, _wall, err = _subprocess_json(cmd, timeout=1800)
    if res is None or not out.exists():
        raise RuntimeError(f"ESP-PPQ failed ({_error_line(err)})")
    return res


def _error_line(tail: str) -> str:
    """The line of a failure's stderr tail that names the error (ANSI colours removed)."""
    lines = [LOG_PREFIX.sub("", ANSI.sub("", s).strip()) for s in tail.splitlines()]
    lines = [s for s in lines if s]
    errs = [s for s in lines if "Error" in s or "ERROR" in s or "error" in s]
    return (errs or lines or ["no output"])[-1][:400]


# ---- the simulator and the measurements -------------------------------------------------------


def sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """quant_quality's SQNR (dB, pooled over the arrays), rounded; inf when exact."""
    db = _sqnr(ref, got)
    return db if db == math.inf else round(db, 2)


def _perm(graph, name: str, onnx_shape: list[int]) -> list[int]:
    """ONNX layout -> the graph's runtime layout for one tensor: espstream records it
    (espstream.layout); for ESP-PPQ's files it follows from the shapes (channels last; a
    streaming input declares one chunk, so its frames are not compared)."""
    layout = json.loads(graph.metadata.get("espstream.layout", "{}"))
    if name in layout:
        return list(layout[name])
    want = list(graph.value_info(name).shape)
    if list(onnx_shape) == want:
        return list(range(len(onnx_shape)))
    perm = [0, *range(2, len(onnx_shape)), 1]
    if len(want) != len(perm) or [onnx_shape[i] for i in perm][2:] != want[2:]:
        raise ValueError(f"'{name}': ONNX shape {onnx_shape} does not fit the .espdl's {want}")
    return perm


def _quantized(graph, target: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from espstream.quant import scheme

    rounding = scheme.get_target(target).rounding
    out = {}
    for name, x in feeds.items():
        vi = graph.value_info(name)
        q = scheme.quantize(x, vi.exponent, 16 if vi.dtype == np.int16 else 8, rounding)
        out[name] = np.ascontiguousarray(np.transpose(q, _perm(graph, name, list(x.shape))))
    return out


def _to_onnx(graph, name: str, q: np.ndarray, like: tuple) -> np.ndarray:
    """Integer output in the runtime layout -> real values in the ONNX layout of `like`."""
    real = q.astype(np.float64) * 2.0 ** graph.value_info(name).exponent
    for perm in (json.loads(graph.metadata.get("espstream.layout", "{}")).get(name),
                 list(range(real.ndim)), [0, *range(2, real.ndim), 1]):
        if perm is not None and len(perm) == real.ndim:
            y = np.transpose(real, np.argsort(perm))
            if y.shape == tuple(like):
                return y
    raise ValueError(f"output '{name}': shape {list(q.shape)} does not fit the float {list(like)}")


def offline_outputs(graph, target: str, samples: list[dict], refs: list[dict]) -> list[dict]:
    from espstream.sim import Simulator

    sim = Simulator(graph, target=target)
    got = []
    for feeds, ref in zip(samples, refs, strict=True):
        out = sim.run(_quantized(graph, target, feeds))
        got.append({n: _to_onnx(graph, n, out[n], r.shape) for n, r in ref.items()})
    return got


def streaming_outputs(graph, target: str, samples: list[dict], refs: list[dict],
                      time_outputs: set[str]) -> list[dict]:
    """Chunk by chunk from a zero state (`espstream.sim.run_chunks`: recurrent states fed back
    as metadata espstream.recurrent_states pairs them), the frames of each output in
    `time_outputs` concatenated (offline frame t is streamed frame t + espstream.delay), the
    others (final states) taken after the last chunk. Time axes: espstream.time_axes, else
    runtime axis 1 (ESP-PPQ's channels-last [1, T, C])."""
    from espstream.sim import Simulator, run_chunks

    sim = Simulator(graph, target=target)
    time_axes = json.loads(graph.metadata.get("espstream.time_axes", "{}"))
    delay = json.loads(graph.metadata.get("espstream.delay", "{}"))
    if any(int(d) for d in delay.values()):
        raise ValueError(f"a streaming output has a delay ({delay}); not handled here")
    axis = int(time_axes.get("x", 1))
    got = []
    for feeds, ref in zip(samples, refs, strict=True):
        sim.reset()
        calls = run_chunks(sim, _quantized(graph, target, feeds), axis)
        row = {}
        for n, r in ref.items():
            q = (np.concatenate([c[n] for c in calls], axis=int(time_axes.get(n, 1)))
                 if n in time_outputs else calls[-1][n])
            row[n] = _to_onnx(graph, n, q, r.shape)
        got.append(row)
    return got


def measure(refs: list[dict], got: list[dict]) -> dict:
    names = list(refs[0])
    res = {n: sqnr([r[n] for r in refs], [g[n] for g in got]) for n in names}
    res["all"] = sqnr([r[n] for r in refs for n in names], [g[n] for g in got for n in names])
    return res


def state_pairs(model) -> list[tuple[str, str]]:
    """(graph input, graph output) of each GRU / LSTM initial_h -> Y_h and initial_c -> Y_c that
    are both graph tensors: what an application copies back after each call."""
    ins = {i.name for i in model.graph.input}
    outs = {o.name for o in model.graph.output}
    pairs = []
    for n in model.graph.node:
        if n.op_type in ("GRU", "LSTM"):
            for i, o in ((5, 1), (6, 2)):
                a = n.input[i] if len(n.input) > i else ""
                b = n.output[o] if len(n.output) > o else ""
                if a in ins and b in outs:
                    pairs.append((a, b))
    return pairs


def with_explicit_state(model):
    """(model, {new input: shape}) with each GRU / LSTM's initial_h a graph input and its Y_h
    a graph output, the form ESP-PPQ 1.3.12's RNN alignment indexes unconditionally
    (refine.py, align_to_first_output: output 1 and input 5) and its own operator tests use.
    A constant zero initial_h would not do: ESP-PPQ's onnxsim pass removes it (zero is ONNX's
    default). Fed zeros, the new inputs leave the function as it was; the new output is what
    a stream copies back to the input. None when every recurrent node has both already."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    extra: dict[str, list[int]] = {}
    changed = False
    for n in m.graph.node:
        if n.op_type not in ("GRU", "LSTM"):
            continue
        ins, outs = list(n.input), list(n.output)
        if len(ins) > 5 and ins[5] and len(outs) > 1 and outs[1]:
            continue
        hidden = next(a.i for a in n.attribute if a.name == "hidden_size")
        dirs = 2 if any(a.name == "direction" and a.s == b"bidirectional"
                        for a in n.attribute) else 1
        if len(ins) <= 5 or not ins[5]:
            name = f"{n.op_type.lower()}{len(extra)}_h0"
            extra[name] = [dirs, 1, hidden]
            m.graph.input.append(helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, extra[name]))
            ins = (ins + [""] * 6)[:5] + [name] + ins[6:]
        if len(outs) <= 1 or not outs[1]:
            outs = (outs + [""])[:1] + [f"{n.output[0]}.Y_h"] + outs[2:]
            m.graph.output.append(helper.make_tensor_value_info(
                outs[1], onnx.TensorProto.FLOAT, [dirs, 1, hidden]))
        del n.input[:], n.output[:]
        n.input.extend(ins)
        n.output.extend(outs)
        changed = True
    if not changed:
        return None
    onnx.checker.check_model(m)
    return m, extra


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}"


PPQ_KEYS = ("esp_ppq", "esp_ppq_optimized", "esp_ppq_adapted")


def run_model(name: str, targets: list[str], widths: list[int], n_held: int, chunk: int,
              use_ppq: bool, work: Path) -> list[dict]:
    import onnx
    import onnxruntime as ort

    from espstream import espdl, log

    log.set_quiet(True)  # convert's progress lines; the table is this script's output
    from espstream.convert import convert_model
    from espstream.export import export_model
    from espstream.optimize import optimize_model
    from espstream.quant import calibrate_model, model_inputs, read_calibration_data

    mpath = ROOT / "models" / f"{name}.onnx"
    model = onnx.load(str(mpath))
    x_cal = np.load(ROOT / "models" / f"{name}.calib.npy").astype(np.float32)
    inputs = [i.name for i in model.graph.input]
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input}
    cal = {"x": x_cal}
    for s in STATE_ZERO.get(name, ()):
        cal[s] = np.zeros([len(x_cal), *shapes[s][1:]], np.float32)
    assert set(cal) == set(inputs), (name, inputs)
    calib = work / f"{name}.calib.npz"
    np.savez(calib, **cal)
    rng = np.random.default_rng(HELD_OUT_SEED)
    samples = [{n: (rng.standard_normal(shapes[n]) if n == "x" else np.zeros(shapes[n]))
                .astype(np.float32) for n in inputs} for _ in range(n_held)]

    def run_onnx(m, feeds: list[dict]) -> list[dict]:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return [dict(zip(names, sess.run(None, f), strict=True)) for f in feeds]

    refs = run_onnx(model, samples)
    # outputs with frames (T on the last ONNX axis, as x has it); the others are final states
    time_outputs = {o for o, v in refs[0].items() if v.ndim == 3 and v.shape[-1] == shapes["x"][-1]}
    opt = optimize_model(model).model
    opt_path = work / f"{name}.optimized.onnx"  # ESP-PPQ's second input (module doc, 3)
    onnx.save(opt, str(opt_path))
    # (key, model, calibration file, zero inputs the float model does not have, state pairs)
    ppq_inputs = [("esp_ppq", mpath, calib, {}, state_pairs(model)),
                  ("esp_ppq_optimized", opt_path, calib, {}, state_pairs(opt))]
    adapted = with_explicit_state(opt)
    if adapted is not None:
        ad, extra = adapted
        ad_calib = work / f"{name}.adapted.calib.npz"
        np.savez(ad_calib, **cal, **{k: np.zeros([len(x_cal), *sh[1:]], np.float32)
                                     for k, sh in extra.items()})
        ppq_inputs.append(("esp_ppq_adapted", work / f"{name}.adapted.onnx", ad_calib, extra,
                           state_pairs(ad)))
        onnx.save(ad, str(ppq_inputs[-1][1]))
    rows = []
    for target in targets:
        for bits in widths:
            row: dict = {"model": name, "target": target, "bits": bits}
            t0 = time.perf_counter()
            try:
                data = read_calibration_data(str(calib), model_inputs(opt))
                c = calibrate_model(opt, data, target=target, bits=bits, report_samples=0)
                fq = run_onnx(c.model, samples)  # fake-quant (QDQ) in onnxruntime
                row["espstream_fakequant"] = measure(refs, fq)
                graph = export_model(c.model, target=target).graph
                sim = offline_outputs(graph, target, samples, refs)
                row["espstream"] = measure(refs, sim)
                # the integer simulator on the .espdl against the QDQ model it was exported from
                row["espstream_sim_vs_fakequant"] = measure(fq, sim)
            except Exception as e:  # a failing side is a figure too: recorded with its reason
                row.setdefault("espstream_fakequant", None)
                row["espstream"], row["espstream_error"] = None, _error(e)
            row["espstream_seconds"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            try:
                r = convert_model(model, str(calib), chunk=chunk, target=target, bits=bits)
                row["espstream_stream_checks_ok"] = r.ok
                if not r.ok:
                    row["espstream_stream_failure"] = r.failure()
                row["espstream_stream"] = measure(refs, streaming_outputs(
                    r.exported.graph, target, samples, refs, time_outputs))
            except Exception as e:
                row["espstream_stream"], row["espstream_stream_error"] = None, _error(e)
            row["espstream_stream_seconds"] = round(time.perf_counter() - t0, 2)
            if use_ppq:
                run_ppq_forms(row, ppq_inputs, name, target, bits, len(x_cal), chunk, samples,
                              refs, time_outputs, work, espdl)
            rows.append(row)
            _print_row(row)
    return rows


def run_ppq_forms(row: dict, ppq_inputs: list, name: str, target: str, bits: int, steps: int,
                  chunk: int, samples: list[dict], refs: list[dict], time_outputs: set[str],
                  work: Path, espdl) -> None:
    """ESP-PPQ offline on each form; streaming (auto_streaming, chunk frames a call) on the
    first form it quantizes offline, run chunk by chunk with the recurrent states that are
    graph inputs / outputs fed back, as an application would."""
    for key, src, src_calib, zeros, pairs in ppq_inputs:
        out = work / f"{name}.{target}.int{bits}.{key}.espdl"
        fed = [{**x, **{k: np.zeros(sh, np.float32) for k, sh in zeros.items()}}
               for x in samples]
        t0 = time.perf_counter()
        step = "export"
        try:
            res = run_ppq(src, src_calib, out, target, bits, steps)
            row[f"{key}_export_seconds"] = res["seconds"]
            row["esp_ppq_version"] = res["versions"]["esp-ppq"]
            step = "simulate"
            graph = espdl.read(out.read_bytes())
            row[key] = measure(refs, offline_outputs(graph, target, fed, refs))
        except Exception as e:
            row[key], row[f"{key}_error"] = None, f"{step}: {_error(e)}"
        row[f"{key}_seconds"] = round(time.perf_counter() - t0, 2)
        a, b = row.get("espstream"), row.get(key)
        if a and b and math.isfinite(a["all"]) and math.isfinite(b["all"]):
            row[f"delta_{key}_db"] = round(a["all"] - b["all"], 2)
        if row[key] is None or "esp_ppq_compared_on" in row:
            continue
        row["esp_ppq_compared_on"] = key
        if f"delta_{key}_db" in row:
            row["delta_db"] = row[f"delta_{key}_db"]
        out = work / f"{name}.{target}.int{bits}.{key}.chunk{chunk}.espdl"
        step = "export"
        try:
            res = run_ppq(src, src_calib, out, target, bits, steps, chunk=chunk)
            if res.get("logged_errors"):
                row["esp_ppq_stream_logged_errors"] = res["logged_errors"]
            step = "simulate"
            graph = espdl.read(out.read_bytes())
            graph.metadata["espstream.recurrent_states"] = json.dumps(
                [{"input": a, "output": b} for a, b in pairs])
            row["esp_ppq_stream_state_fed_back"] = [f"{b} -> {a}" for a, b in pairs]
            row["esp_ppq_stream"] = measure(refs, streaming_outputs(
                graph, target, fed, refs, time_outputs))
        except Exception as e:
            row["esp_ppq_stream"], row["esp_ppq_stream_error"] = None, f"{step}: {_error(e)}"


def _f(side: dict | None, key: str = "all") -> str:
    if side is None:
        return "fail"
    v = side[key]
    return "exact" if v == math.inf else f"{v:.2f}"


def _print_row(r: dict) -> None:
    if not getattr(_print_row, "done", False):
        print("dB against float, all outputs pooled (vad_lstm: its y alone on the next line). "
              "fq: espstream's QDQ model in onnxruntime; sim: its .espdl in the simulator; "
              "stream: its streaming .espdl chunk by chunk. ESP-PPQ on: PPQ the bundled ONNX, "
              "opt espstream's optimized ONNX, adapt that with the GRU state as graph input / "
              "output; PPQst: ESP-PPQ's streaming file. delta: sim - the first ESP-PPQ that ran")
        print(f"{'model':9s} {'target':8s} {'bits':>4s} {'fq':>6s} {'sim':>6s} {'stream':>6s} "
              f"{'PPQ':>6s} {'opt':>6s} {'adapt':>6s} {'PPQst':>6s} {'delta':>7s}")
        _print_row.done = True  # type: ignore[attr-defined]

    def cols(key: str) -> str:
        ks = ("espstream_fakequant", "espstream", "espstream_stream", *PPQ_KEYS, "esp_ppq_stream")
        return " ".join(f"{_f(r[k], key) if k in r else '-':>6s}" for k in ks)

    d = r.get("delta_db")
    print(f"{r['model']:9s} {r['target']:8s} {r['bits']:4d} {cols('all')} "
          f"{'' if d is None else f'{d:+.2f}':>7s}", flush=True)
    if r["model"] == "vad_lstm" and r.get("espstream") is not None:
        print(f"{'':9s} {'  y':8s} {'':4s} {cols('y')}")
    for k in ("espstream_error", "espstream_stream_error", "espstream_stream_failure",
              *(f"{k}_error" for k in PPQ_KEYS), "esp_ppq_stream_error"):
        if k in r:
            print(f"      {k}: {r[k]}")


def _stat(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None
    return {"median": round(float(np.median(xs)), 2), "min": min(xs), "max": max(xs)}


def headline(rows: list[dict]) -> dict:
    h: dict = {}
    for bits in sorted({r["bits"] for r in rows}):
        sel = [r for r in rows if r["bits"] == bits]

        def all_of(key: str, rs: list[dict] = sel) -> list[float]:
            return [r[key]["all"] for r in rs if r.get(key)]

        h[f"int{bits}_espstream_sim_db"] = _stat(all_of("espstream"))
        h[f"int{bits}_espstream_fakequant_db"] = _stat(all_of("espstream_fakequant"))
        h[f"int{bits}_sim_vs_fakequant_db"] = _stat(all_of("espstream_sim_vs_fakequant"))
        d = [r["delta_db"] for r in sel if "delta_db" in r]
        h[f"int{bits}_espstream_minus_esp_ppq_db"] = _stat(d)
        h[f"int{bits}_compared"] = f"{len(d)}/{len(sel)}"
        for key in (*PPQ_KEYS, "esp_ppq_stream"):
            ran = [r for r in sel if key in r]
            if ran:
                h[f"int{bits}_{key}_failed"] = f"{sum(r[key] is None for r in ran)}/{len(ran)}"
        h[f"int{bits}_espstream_failed"] = f"{sum(r['espstream'] is None for r in sel)}/{len(sel)}"
        st = [r["espstream_stream"]["all"] - r["espstream"]["all"] for r in sel
              if r.get("espstream_stream") and r.get("espstream")]
        h[f"int{bits}_streaming_minus_offline_db_max_abs"] = (
            round(max(abs(x) for x in st), 2) if st else None)
        pst = [r["esp_ppq_stream"]["all"] - r[r["esp_ppq_compared_on"]]["all"] for r in sel
               if r.get("esp_ppq_stream") and r.get("esp_ppq_compared_on")]
        h[f"int{bits}_esp_ppq_streaming_minus_offline_db"] = _stat(pst)
    return h


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="esp32p4,esp32s3")
    ap.add_argument("--bits", default="8,16")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--no-ppq", action="store_true", help="espstream's side only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "recurrent_models_sqnr.json"))
    a = ap.parse_args()
    ppq_skip = "--no-ppq" if a.no_ppq else ppq_available(PPQ_PYTHON)
    targets, widths = a.targets.split(","), [int(b) for b in a.bits.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rnn-sqnr-") as tmp:
        for name in a.models.split(","):
            rows += run_model(name, targets, widths, a.held_out, a.chunk, not ppq_skip,
                              Path(tmp))
    h = headline(rows)
    for k, v in h.items():
        print(f"  {k}: {v}")
    res = {"models": a.models.split(","), "targets": targets, "bits": widths,
           "calibration": "models/NAME.calib.npy (32 samples); vad_lstm's h, c at zero",
           "held_out": {"samples": a.held_out, "seed": HELD_OUT_SEED,
                        "x": "standard normal", "states": "zero"},
           "chunk": a.chunk,
           "esp_ppq": (f"skipped: {ppq_skip}" if ppq_skip else
                       "espdl_quantize_onnx defaults (benchmarks/ppq_side.py); esp_ppq: on the "
                       "bundled ONNX, esp_ppq_optimized: on espstream optimize's float ONNX, "
                       "esp_ppq_adapted: that with the GRU state as graph input / output; "
                       "esp_ppq_stream: auto_streaming on the first that quantized"),
           "tuned_on_these_inputs": False, "headline": h, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    # an exact output (no noise at all) is written "inf": JSON has no infinity
    text = json.dumps(res, indent=1).replace("Infinity", '"inf"')
    Path(a.out).write_text(text + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

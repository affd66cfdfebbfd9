"""int8 / int16 SQNR of the bundled recurrent models: espstream's export beside ESP-PPQ 1.3.12's.

    PYTHONPATH=. .venv/bin/python benchmarks/recurrent_models_sqnr.py [--targets esp32p4,...]
        [--bits 8,16] [--held-out 16] [--chunk 4] [--no-ppq]
        [--out benchmarks/results/recurrent_models_sqnr.json]

Models: `models/kws_gru.onnx` (conv + GRU keyword spotter, `x [1, 10, 32] -> y [1, 12, 32]`) and
`models/vad_lstm.onnx` (LSTM VAD, `x [1, 16, 32]`, `h`, `c [1, 1, 16]` -> `y [1, 1, 32]`, `hn`,
`cn`), per target (esp32p4, esp32s3, c) and width (int8, int16).

1. Calibration data, the same for both tools: the model's committed `models/NAME.calib.npy`
   (32 standard-normal samples); for vad_lstm with `h` = `c` = 0 (a stream's start), as
   models/README.md says to give it.
2. espstream: `optimize_model`, `calibrate_model` (its defaults), `export_model` of the offline
   model; and `convert_model(..., chunk=--chunk)` for the streaming .espdl.
3. ESP-PPQ: `espdl_quantize_onnx` with its defaults (calib_steps = 32, error report off), run
   by this same file in benchmarks/.venv-ppq (`--ppq-side`, which imports only NumPy, onnx and
   torch / esp_ppq there); a DataLoader of batch 1 over the calibration samples, one tensor per
   model input. On up to three forms of the same float function, each recorded:
   - `esp_ppq`: the bundled ONNX as it is. ESP-PPQ 1.3.12 has no Dropout executor and stops
     on both bundled files ("Op Execution Error: /head/Dropout") before quantizing anything;
   - `esp_ppq_optimized`: the float ONNX espstream's `optimize` writes from it (inference
     Dropout, Identity, the Pad chains and BatchNormalization folded; optimize checks it
     against the input in onnxruntime). kws_gru's GRU has no initial_h and no Y_h (legal
     ONNX, both optional), and ESP-PPQ's RNN alignment indexes both unconditionally
     (IndexError);
   - `esp_ppq_adapted` (only where a GRU / LSTM lacks them): that model with the recurrent
     layer's initial_h a graph input and Y_h a node output (`with_explicit_state`), as ESP-DL's
     own operator tests give it; ESP-PPQ is calibrated and evaluated with that input at zero.
   The headline delta pairs espstream with the first of these ESP-PPQ quantizes
   (`esp_ppq_compared_on`). Offline only: ESP-PPQ's `auto_streaming` bypasses GRU / LSTM
   state between chunks (issue 14), so its streaming files are no comparison for these models.
4. Held-out inputs: `--held-out` samples of `x` ~ N(0, 1) from seed 4242 (neither the
   calibration data nor NAME.input.npy); vad_lstm's `h`, `c` at zero, as in calibration.
5. Both offline .espdl files run in espstream's integer simulator (which reproduces ESP-PPQ's own
   test values, tests/test_ops_suite.py) as the given target; espstream's streaming file runs
   chunk by chunk with its recurrent states fed back (`espstream.sim.run_chunks`), each sample
   from a zero state. The reference is onnxruntime on the float model.
6. SQNR = 10 log10(sum ref^2 / sum (ref - got)^2) over the held-out samples, per output and over
   all outputs pooled ("all"; for kws_gru that is `y`).

Neither side was tuned on these models or inputs: both run their defaults, and the held-out
inputs were not looked at before this script measured them. A step that fails (ESP-PPQ refusing
or crashing, a file the simulator cannot run) is recorded in the JSON with its error text, and
the other rows still run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("kws_gru", "vad_lstm")
STATE_ZERO = {"vad_lstm": ("h", "c")}  # explicit state inputs, given at zero
HELD_OUT_SEED = 4242
PPQ_PYTHON = ROOT / "benchmarks" / ".venv-ppq" / "bin" / "python"
if not PPQ_PYTHON.exists():
    PPQ_PYTHON = Path("/work/main/benchmarks/.venv-ppq/bin/python")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---- ESP-PPQ's side (runs in benchmarks/.venv-ppq) ------------------------------------------


def ppq_side(model: str, calib: str, out: str, target: str, bits: int, steps: int) -> int:
    """One `espdl_quantize_onnx` call on an .npz of calibration samples keyed by input name;
    prints one JSON line (seconds, versions) on stdout."""
    import contextlib
    import shutil

    with contextlib.redirect_stdout(sys.stderr):  # ESP-PPQ prints banners and progress bars
        import onnx
        import torch
        from esp_ppq.api import espdl_quantize_onnx
        from torch.utils.data import DataLoader, TensorDataset
    torch.set_num_threads(1)  # a shared machine; espstream's side is single-threaded too
    names = [i.name for i in onnx.load(model).graph.input]
    data = np.load(calib)
    tensors = [torch.from_numpy(data[n].astype(np.float32)) for n in names]
    # batch 1: each step is [x, h, c] (one tensor per input, in the graph's input order)
    loader = DataLoader(TensorDataset(*tensors), batch_size=1, shuffle=False)
    shapes = [[1, *t.shape[1:]] for t in tensors]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    copy = str(Path(out).with_suffix(".input.onnx"))  # ESP-PPQ overwrites its input model
    shutil.copyfile(model, copy)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        espdl_quantize_onnx(
            onnx_import_file=copy, espdl_export_file=out, calib_dataloader=loader,
            calib_steps=steps, input_shape=shapes if len(shapes) > 1 else shapes[0],
            target=target, num_of_bits=bits, device="cpu", error_report=False,
            export_test_values=False, verbose=0)
    from importlib.metadata import version

    print(json.dumps({"seconds": round(time.perf_counter() - t0, 3),
                      "versions": {"esp-ppq": version("esp-ppq"), "torch": torch.__version__}}))
    return 0


def run_ppq(model: Path, calib: Path, out: Path, target: str, bits: int, steps: int) -> dict:
    cmd = [str(PPQ_PYTHON), __file__, "--ppq-side", str(model), str(calib), str(out),
           "--target", target, "--bits", str(bits), "--calib-steps", str(steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode or not out.exists():
        lines = [ANSI.sub("", s).strip() for s in p.stderr.splitlines()]
        lines = [s for s in lines if s]
        errs = [s for s in lines if "Error" in s or "ERROR" in s or "error" in s]
        tail = (errs or lines or ["no output"])[-1]
        raise RuntimeError(f"ESP-PPQ failed (exit {p.returncode}): {tail[:400]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- espstream's side, the simulator and the measurements ------------------------------------


def sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([x.reshape(-1) for x in ref]).astype(np.float64)
    g = np.concatenate([x.reshape(-1) for x in got]).astype(np.float64)
    noise = float(np.sum((r - g) ** 2))
    return math.inf if noise == 0 else round(10 * math.log10(float(np.sum(r * r)) / noise), 2)


def _perm(graph, name: str, onnx_shape: list[int]) -> list[int]:
    """ONNX layout -> the graph's runtime layout for one tensor: espstream records it
    (espstream.layout); for ESP-PPQ's files it follows from the shapes (channels last)."""
    layout = json.loads(graph.metadata.get("espstream.layout", "{}"))
    if name in layout:
        return list(layout[name])
    want = list(graph.value_info(name).shape)
    if list(onnx_shape) == want:
        return list(range(len(onnx_shape)))
    perm = [0, *range(2, len(onnx_shape)), 1]
    if [onnx_shape[i] for i in perm] != want:
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


def streaming_outputs(graph, target: str, samples: list[dict], refs: list[dict]) -> list[dict]:
    """Chunk by chunk from a zero state, recurrent states fed back; the frames of each output
    concatenated (offline frame t is streamed frame t + espstream.delay), summaries taken
    after the last chunk."""
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
            q = (np.concatenate([c[n] for c in calls], axis=int(time_axes[n]))
                 if n in time_axes else calls[-1][n])
            row[n] = _to_onnx(graph, n, q, r.shape)
        got.append(row)
    return got


def measure(refs: list[dict], got: list[dict]) -> dict:
    names = list(refs[0])
    res = {n: sqnr([r[n] for r in refs], [g[n] for g in got]) for n in names}
    res["all"] = sqnr([r[n] for r in refs for n in names], [g[n] for g in got for n in names])
    return res


def with_explicit_state(model):
    """(model, {new input: shape}) with each GRU / LSTM's initial_h a graph input and its Y_h
    a node output, the form ESP-PPQ 1.3.12's RNN alignment indexes unconditionally
    (refine.py, align_to_first_output: output 1 and input 5) and its own operator tests use.
    A constant zero initial_h would not do: ESP-PPQ's onnxsim pass removes it (zero is ONNX's
    default). Fed zeros, the new inputs leave the function as it was, and the new output feeds
    nothing. None when every recurrent node has both already."""
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
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    refs = [dict(zip(out_names, sess.run(None, s), strict=True)) for s in samples]
    opt = optimize_model(model).model
    opt_path = work / f"{name}.optimized.onnx"  # ESP-PPQ's second input (module doc, 3)
    onnx.save(opt, str(opt_path))
    # (key, model, calibration file, zero inputs the float model does not have)
    ppq_inputs = [("esp_ppq", mpath, calib, {}), ("esp_ppq_optimized", opt_path, calib, {})]
    adapted = with_explicit_state(opt)
    if adapted is not None:
        ad, extra = adapted
        ad_calib = work / f"{name}.adapted.calib.npz"
        np.savez(ad_calib, **cal, **{k: np.zeros([len(x_cal), *sh[1:]], np.float32)
                                     for k, sh in extra.items()})
        ppq_inputs.append(("esp_ppq_adapted", work / f"{name}.adapted.onnx", ad_calib, extra))
        onnx.save(ad, str(ppq_inputs[-1][1]))
    rows = []
    for target in targets:
        for bits in widths:
            row: dict = {"model": name, "target": target, "bits": bits}
            t0 = time.perf_counter()
            try:
                data = read_calibration_data(str(calib), model_inputs(opt))
                c = calibrate_model(opt, data, target=target, bits=bits, report_samples=0)
                graph = export_model(c.model, target=target).graph
                row["espstream"] = measure(refs, offline_outputs(graph, target, samples, refs))
            except Exception as e:  # a failing side is a figure too: recorded with its reason
                row["espstream"], row["espstream_error"] = None, _error(e)
            row["espstream_seconds"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            try:
                r = convert_model(model, str(calib), chunk=chunk, target=target, bits=bits)
                row["espstream_stream_checks_ok"] = r.ok
                if not r.ok:
                    row["espstream_stream_failure"] = r.failure()
                row["espstream_stream"] = measure(
                    refs, streaming_outputs(r.exported.graph, target, samples, refs))
            except Exception as e:
                row["espstream_stream"], row["espstream_stream_error"] = None, _error(e)
            row["espstream_stream_seconds"] = round(time.perf_counter() - t0, 2)
            if use_ppq:
                for key, src, src_calib, zeros in ppq_inputs:
                    out = work / f"{name}.{target}.int{bits}.{key}.espdl"
                    t0 = time.perf_counter()
                    step = "export"
                    try:
                        row[f"{key}_export_seconds"] = run_ppq(
                            src, src_calib, out, target, bits, len(x_cal))["seconds"]
                        step = "simulate"
                        graph = espdl.read(out.read_bytes())
                        fed = [{**x, **{k: np.zeros(sh, np.float32) for k, sh in zeros.items()}}
                               for x in samples]
                        row[key] = measure(refs, offline_outputs(graph, target, fed, refs))
                    except Exception as e:
                        row[key], row[f"{key}_error"] = None, f"{step}: {_error(e)}"
                    row[f"{key}_seconds"] = round(time.perf_counter() - t0, 2)
                    a, b = row.get("espstream"), row.get(key)
                    if a and b and math.isfinite(a["all"]) and math.isfinite(b["all"]):
                        row[f"delta_{key}_db"] = round(a["all"] - b["all"], 2)
            compared(row)
            rows.append(row)
            _print_row(row)
    return rows


def _f(side: dict | None, key: str = "all") -> str:
    if side is None:
        return "fail"
    v = side[key]
    return "exact" if v == math.inf else f"{v:.2f}"


PPQ_KEYS = ("esp_ppq", "esp_ppq_optimized", "esp_ppq_adapted")


def compared(r: dict) -> None:
    """The headline pairing: ESP-PPQ on the least-changed input it quantizes (bundled, then
    optimized, then adapted), recorded as `esp_ppq_compared_on` and `delta_db`."""
    for key in PPQ_KEYS:
        if f"delta_{key}_db" in r:
            r["esp_ppq_compared_on"], r["delta_db"] = key, r[f"delta_{key}_db"]
            return


def _print_row(r: dict) -> None:
    if not getattr(_print_row, "done", False):
        print("dB against float, all outputs pooled (vad_lstm: its y alone on the next line). "
              "ESP-PPQ on: PPQ the bundled ONNX, opt espstream's optimized ONNX, adapt that "
              "with the GRU state as an input (zeros). delta: espstream - the first that ran")
        print(f"{'model':9s} {'target':8s} {'bits':>4s} {'espstream':>9s} {'PPQ':>6s} "
              f"{'opt':>6s} {'adapt':>6s} {'delta':>7s} {'stream':>7s}")
        _print_row.done = True  # type: ignore[attr-defined]

    def p(key: str) -> list[str]:
        return [_f(r[k], key) if k in r else "-" for k in PPQ_KEYS]

    d = r.get("delta_db")
    print(f"{r['model']:9s} {r['target']:8s} {r['bits']:4d} {_f(r.get('espstream')):>9s} "
          + " ".join(f"{c:>6s}" for c in p("all"))
          + f" {'' if d is None else f'{d:+.2f}':>7s} {_f(r.get('espstream_stream')):>7s}",
          flush=True)
    if r["model"] == "vad_lstm" and r.get("espstream") is not None:
        print(f"{'':9s} {'  y':8s} {'':4s} {_f(r.get('espstream'), 'y'):>9s} "
              + " ".join(f"{c:>6s}" for c in p("y"))
              + f" {'':7s} {_f(r.get('espstream_stream'), 'y'):>7s}")
    for k in ("espstream_error", "espstream_stream_error", "espstream_stream_failure",
              *(f"{k}_error" for k in PPQ_KEYS)):
        if k in r:
            print(f"      {k}: {r[k]}")


def headline(rows: list[dict]) -> dict:
    h: dict = {}
    for bits in sorted({r["bits"] for r in rows}):
        sel = [r for r in rows if r["bits"] == bits]
        d = [r["delta_db"] for r in sel if "delta_db" in r]
        h[f"int{bits}_espstream_minus_esp_ppq_db_median"] = (
            round(float(np.median(d)), 2) if d else None)
        h[f"int{bits}_espstream_minus_esp_ppq_db_min"] = min(d) if d else None
        h[f"int{bits}_espstream_minus_esp_ppq_db_max"] = max(d) if d else None
        h[f"int{bits}_compared"] = f"{len(d)}/{len(sel)}"
        for key in PPQ_KEYS:
            ran = [r for r in sel if key in r]
            if ran:
                h[f"int{bits}_{key}_failed"] = f"{sum(r[key] is None for r in ran)}/{len(ran)}"
        h[f"int{bits}_espstream_failed"] = f"{sum(r['espstream'] is None for r in sel)}/{len(sel)}"
        st = [r["espstream_stream"]["all"] - r["espstream"]["all"] for r in sel
              if r.get("espstream_stream") and r.get("espstream")]
        h[f"int{bits}_streaming_minus_offline_db_max_abs"] = (
            round(max(abs(x) for x in st), 2) if st else None)
    return h


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--ppq-side":
        ap = argparse.ArgumentParser()
        ap.add_argument("--ppq-side", nargs=3, metavar=("MODEL", "CALIB", "OUT"))
        ap.add_argument("--target", default="esp32p4")
        ap.add_argument("--bits", type=int, default=8)
        ap.add_argument("--calib-steps", type=int, default=32)
        a = ap.parse_args()
        return ppq_side(*a.ppq_side, a.target, a.bits, a.calib_steps)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="esp32p4,esp32s3,c")
    ap.add_argument("--bits", default="8,16")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--no-ppq", action="store_true", help="espstream's side only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "recurrent_models_sqnr.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    use_ppq = not a.no_ppq
    ppq_skip = None
    if use_ppq and not PPQ_PYTHON.exists():
        use_ppq, ppq_skip = False, f"no ESP-PPQ environment at {PPQ_PYTHON}"
    targets, widths = a.targets.split(","), [int(b) for b in a.bits.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rnn-sqnr-") as tmp:
        for name in a.models.split(","):
            rows += run_model(name, targets, widths, a.held_out, a.chunk, use_ppq, Path(tmp))
    h = headline(rows)
    for k, v in h.items():
        print(f"  {k}: {v}")
    res = {"models": a.models.split(","), "targets": targets, "bits": widths,
           "calibration": "models/NAME.calib.npy (32 samples); vad_lstm's h, c at zero",
           "held_out": {"samples": a.held_out, "seed": HELD_OUT_SEED,
                        "x": "standard normal", "states": "zero"},
           "chunk": a.chunk,
           "esp_ppq": ppq_skip or "offline, espdl_quantize_onnx defaults; esp_ppq: on the "
                                  "bundled ONNX, esp_ppq_optimized: on espstream optimize's "
                                  "float ONNX of it",
           "tuned_on_these_inputs": False, "headline": h, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    # an exact output (no noise at all) is written "inf": JSON has no infinity
    text = json.dumps(res, indent=1).replace("Infinity", '"inf"')
    Path(a.out).write_text(text + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

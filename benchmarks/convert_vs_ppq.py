"""Conversion time of espstream `convert` against ESP-PPQ's `espdl_quantize_onnx`, same inputs.

    .venv/bin/python benchmarks/convert_vs_ppq.py [--out benchmarks/results/convert_vs_ppq.json]
                                                  [--repeat 5] [--ppq-python PATH]

Cases: the two ESP-PPQ fixture models (tests/data/esp-ppq/{tutorial_tcn,stream_tcn}/model.onnx)
with the 32 calibration samples ESP-PPQ was given (calib.npy), target esp32p4, 8 bits, each
offline and streaming (chunk 3 / 4, the chunk shapes of the fixtures' streaming exports).

- espstream: `espstream.convert.convert_model(model, calib.npy, chunk=..., target, bits)` (all 32
  samples), in a fresh process per run. Where `convert_model` is not there, the stage functions
  in sequence (optimize, calibrate, streamify, export) stand in, and the result says so.
  Two figures per run: `convert_seconds`, the whole call (stages and convert's own verification:
  float / fake-quant / int8 streaming == offline, SQNR, .espdl test values), and
  `stage_seconds`, the stages alone (optimize, calibrate, streamify, export).
- ESP-PPQ: benchmarks/ppq_side.py in the ESP-PPQ environment (benchmarks/.venv-ppq, made by
  `make bench-ppq-env`), a fresh process per run: `espdl_quantize_onnx` with a DataLoader of batch
  1 over the same calib.npy, calib_steps 32, target esp32p4, 8 bits, `auto_streaming` with the
  chunk shape for streaming, torch on one thread (on this 2-core machine, shared with other work
  while measured, ESP-PPQ ran several times faster on one thread than with torch's default of
  two, so one thread is its better case). Once with
  `error_report=False` (quantize and export only) and once with ESP-PPQ's default
  `error_report=True` (its graph-wise and layer-wise error analysis on the calibration data).

Times: `seconds` is measured inside each process around the one call (imports, model and data
loading excluded), `cpu_seconds` is that process's CPU time over the same call, and
`process_seconds` the whole subprocess as the parent sees it (interpreter start, imports of
torch / onnxruntime, everything). Each figure is the median of `--repeat` fresh processes (min
and max kept beside it); the runs of the three contenders are interleaved, so that each meets
the same load from the other processes on this shared machine. Ratios (ESP-PPQ / espstream) of
the in-process wall-time medians:
- `speedup_stages`: ESP-PPQ without error report / espstream stages (neither side verifies);
- `speedup_convert`: ESP-PPQ without error report / espstream whole convert (ours verifies,
  theirs does not: the strictest pairing);
- `speedup_defaults`: ESP-PPQ with its default error report / espstream whole convert (each tool
  as it runs by default, each with its own checking);
and, beside them, `speedup_convert_cpu` (the same pairing as `speedup_convert` in CPU time) and
`speedup_whole_process` (whole processes, ESP-PPQ without error report).
Goal (issue 7): convert at least 5x faster than ESP-PPQ's export of the same model.

Output quality (cheap, so always): SQNR against the float model on 16 held-out standard-normal
samples (seed 7, not the calibration data) of the offline .espdl files written by each tool,
both run in espstream's integer simulator. Where ESP-PPQ cannot run (no environment, an import or
run failure), the ESP-PPQ side is recorded as `skipped: <reason>` and the script still succeeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "data" / "esp-ppq"
PPQ_PYTHON = ROOT / "benchmarks" / ".venv-ppq" / "bin" / "python"
PPQ_SIDE = ROOT / "benchmarks" / "ppq_side.py"
CASES = [("tutorial_tcn", None), ("tutorial_tcn", 3), ("stream_tcn", None), ("stream_tcn", 4)]
TARGET, BITS, CALIB_STEPS = "esp32p4", 8, 32
GOAL = 5.0
HELD_OUT, HELD_OUT_SEED = 16, 7
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_PREFIX = re.compile(r"^\[ERROR\]\[\w+\]\[[^]]*\]:\s*")  # ESP-PPQ's "[ERROR][ESPDL][time]:"


# ---- espstream's side (runs in its own process: --case) -------------------------------------


def run_espstream(model_path: str, calib_path: str, chunk: int | None, out: str) -> dict:
    """One conversion, timed inside this process; writes the .espdl to `out`."""
    t0 = time.perf_counter()
    import onnx

    try:
        from espstream.convert import convert_model
    except ImportError:
        convert_model = None
    from espstream.export import export_model
    from espstream.optimize import optimize_model
    from espstream.quant import calibrate_model, model_inputs, read_calibration_data
    from espstream.stream.streamify import streamify_model

    import_seconds = time.perf_counter() - t0
    model = onnx.load(model_path)
    t1, c1 = time.perf_counter(), time.process_time()
    if convert_model is not None:
        r = convert_model(model, calib_path, chunk=chunk, target=TARGET, bits=BITS)
        seconds = time.perf_counter() - t1
        stage = {k: v for k, v in r.seconds.items() if not k.startswith("verify")}
        res = {"via": "espstream.convert.convert_model", "ok": r.ok, "failure": r.failure(),
               "convert_seconds": round(seconds, 4),
               "stage_seconds": round(sum(stage.values()), 4),
               "by_stage": {k: round(v, 4) for k, v in r.seconds.items()}}
        data = r.data
    else:
        by: dict[str, float] = {}

        def timed(name, fn):
            s = time.perf_counter()
            v = fn()
            by[name] = by.get(name, 0.0) + time.perf_counter() - s
            return v

        opt = timed("optimize", lambda: optimize_model(model))
        calib = read_calibration_data(calib_path, model_inputs(opt.model))
        cal = timed("calibrate", lambda: calibrate_model(opt.model, calib, target=TARGET,
                                                         bits=BITS))
        m = cal.model
        if chunk:
            m = timed("streamify", lambda: streamify_model(m, chunk).model)
        ex = timed("export", lambda: export_model(m, target=TARGET))
        seconds = time.perf_counter() - t1
        res = {"via": "stage functions (espstream.convert not available: no verification)",
               "ok": None, "convert_seconds": None, "stage_seconds": round(seconds, 4),
               "by_stage": {k: round(v, 4) for k, v in by.items()}}
        data = ex.data
    res["cpu_seconds"] = round(time.process_time() - c1, 4)
    Path(out).write_bytes(data)
    res.update(import_seconds=round(import_seconds, 4), espdl_bytes=len(data))
    return res


# ---- driving both sides ---------------------------------------------------------------------


# Children may write and read bytecode caches, as an installed package has them (pip compiles
# them at install): where the environment sets PYTHONDONTWRITEBYTECODE, an editable checkout
# would otherwise compile all of espstream's sources on every start (~0.2 s here) while
# ESP-PPQ's installed modules load from their caches. Each side gets one untimed warm-up run.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _subprocess_json(cmd: list[str], timeout: float) -> tuple[dict | None, float, str]:
    """(the JSON the child printed last, whole-process seconds, stderr tail)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=CHILD_ENV)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    tail = "\n".join(p.stderr.strip().splitlines()[-3:])
    if p.returncode != 0:
        return None, wall, f"exit {p.returncode}: {tail}"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return None, wall, f"no JSON on stdout: {tail}"
    result = json.loads(lines[-1])
    # ESP-PPQ logs what it could not do (e.g. an operator auto-streaming does not handle) as
    # [ERROR] lines and carries on: keep them beside its times.
    logged = [LOG_PREFIX.sub("", ANSI.sub("", ln).strip()) for ln in p.stderr.splitlines()
              if "[ERROR]" in ln]
    if logged:
        result["logged_errors"] = list(dict.fromkeys(logged))
    return result, wall, ""


def _stats(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4),
            "max": round(max(xs), 4), "runs": len(xs)}


def ppq_available(python: Path) -> str | None:
    """None when the ESP-PPQ environment imports, else the reason it cannot be used."""
    if not python.exists():
        return (f"no ESP-PPQ environment: {python} does not exist (`make bench-ppq-env` "
                "creates benchmarks/.venv-ppq)")
    code = "import torch, esp_ppq.api; print(torch.__version__)"
    try:
        p = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                           timeout=300)
    except subprocess.TimeoutExpired:
        return "importing esp_ppq timed out"
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return f"the ESP-PPQ environment does not import esp_ppq: {last}"
    return None


def run_case(name: str, chunk: int | None, repeat: int, ppq_python: Path,
             ppq_skip: str | None, work: Path) -> dict:
    """Both tools on one model and mode, `repeat` fresh processes each, runs interleaved
    (espstream, ESP-PPQ, ESP-PPQ with error report, then again) so that all three meet the
    same load from whatever else runs on the machine."""
    model = FIXTURES / name / "model.onnx"
    calib = FIXTURES / name / "calib.npy"
    tag = f"{name}.{'offline' if chunk is None else f'chunk{chunk}'}"
    case: dict = {"model": name, "mode": "offline" if chunk is None else "streaming",
                  "chunk": chunk, "calib_samples": int(np.load(calib, mmap_mode="r").shape[0])}
    ours_file = work / f"{tag}.espstream.espdl"
    ppq_file = work / f"{tag}.ppq.espdl"
    sides = {"espstream": [sys.executable, __file__, "--case", str(model), str(calib),
                           str(chunk or 0), str(ours_file)]}
    if not ppq_skip:
        base = [str(ppq_python), str(PPQ_SIDE), str(model), str(calib), "--target", TARGET,
                "--bits", str(BITS), "--calib-steps", str(CALIB_STEPS)]
        base += ["--chunk", str(chunk)] if chunk else []
        sides["no_error_report"] = [*base[:4], str(ppq_file), *base[4:]]
        sides["error_report"] = [*base[:4], str(work / f"{tag}.ppq-report.espdl"), *base[4:],
                                 "--error-report"]
    runs: dict[str, list[tuple[dict, float]]] = {k: [] for k in sides}
    errors: dict[str, str] = {}
    for cmd in sides.values():  # warm-up: bytecode caches written, files in the page cache
        _subprocess_json(cmd, timeout=1200)
    for _ in range(repeat):
        for key, cmd in sides.items():
            r, wall, err = _subprocess_json(cmd, timeout=1200)
            if r is None:
                errors.setdefault(key, err)
            else:
                runs[key].append((r, wall))

    ours = [r for r, _w in runs["espstream"]]
    if not ours:
        raise SystemExit(f"espstream failed on {tag}: {errors['espstream']}")
    case["espstream"] = {
        "via": ours[0]["via"], "ok": ours[0]["ok"], "failure": ours[0].get("failure") or None,
        "convert_seconds": _stats([r["convert_seconds"] for r in ours]),
        "stage_seconds": _stats([r["stage_seconds"] for r in ours]),
        "cpu_seconds": _stats([r["cpu_seconds"] for r in ours]),
        "process_seconds": _stats([w for _r, w in runs["espstream"]]),
        "import_seconds": _stats([r["import_seconds"] for r in ours]),
        "by_stage_median": {k: round(statistics.median(r["by_stage"].get(k, 0.0) for r in ours), 4)
                            for k in ours[0]["by_stage"]},
        "espdl_bytes": ours[0]["espdl_bytes"],
    }
    if ppq_skip:
        case["esp_ppq"] = {"skipped": ppq_skip}
        return case
    ppq: dict = {}
    for key in ("no_error_report", "error_report"):
        got = runs[key]
        if not got:
            ppq[key] = {"skipped": f"ESP-PPQ failed: {errors[key]}"}
            continue
        ppq[key] = {"seconds": _stats([r["seconds"] for r, _w in got]),
                    "cpu_seconds": _stats([r["cpu_seconds"] for r, _w in got]),
                    "process_seconds": _stats([w for _r, w in got]),
                    "import_seconds": _stats([r["import_seconds"] for r, _w in got]),
                    "espdl_bytes": got[0][0]["espdl_bytes"],
                    "logged_errors": got[0][0].get("logged_errors", [])}
        ppq["versions"] = got[0][0]["versions"]
    case["esp_ppq"] = ppq

    def ratio(ppq_key: str, ours_key: str, field: str = "seconds") -> float | None:
        p = ppq.get(ppq_key, {}).get(field)
        o = case["espstream"][ours_key]
        if not p or not o or not o["median"]:
            return None
        return round(p["median"] / o["median"], 2)

    case["speedup_stages"] = ratio("no_error_report", "stage_seconds")
    case["speedup_convert"] = ratio("no_error_report", "convert_seconds")
    case["speedup_defaults"] = ratio("error_report", "convert_seconds")
    case["speedup_convert_cpu"] = ratio("no_error_report", "cpu_seconds", "cpu_seconds")
    case["speedup_whole_process"] = ratio("no_error_report", "process_seconds",
                                          "process_seconds")
    if chunk is None and ours_file.exists() and ppq_file.exists():
        case["sqnr_db"] = {"espstream": _sqnr(model, ours_file), "esp_ppq": _sqnr(model, ppq_file)}
    return case


# ---- output quality: both .espdl files in espstream's simulator ------------------------------


def _sqnr(model_path: Path, espdl_path: Path) -> dict | str:
    """Per output: SQNR (dB) of the .espdl in the integer simulator against the float model."""
    import onnxruntime as ort

    from espstream import espdl
    from espstream.quant import scheme
    from espstream.sim import Simulator

    try:
        graph = espdl.read(espdl_path.read_bytes())
        sim = Simulator(graph, target=TARGET)
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [int(d) for d in inp.shape]
        x = np.random.default_rng(HELD_OUT_SEED).standard_normal(
            [HELD_OUT, *shape[1:]]).astype(np.float32)
        vi = graph.inputs[0]
        ref: dict[str, list] = {}
        got: dict[str, list] = {}
        for k in range(HELD_OUT):
            xk = x[k : k + 1]
            for o, y in zip([o.name for o in sess.get_outputs()], sess.run(None, {inp.name: xk}),
                            strict=True):
                ref.setdefault(o, []).append(y)
            xr = _to_layout(xk, list(vi.shape))
            q = scheme.quantize(xr, vi.exponent, 8, scheme.get_target(TARGET).rounding)
            for o, y in sim.run({vi.name: q}).items():
                got.setdefault(o, []).append(_to_layout(sim.dequantize(o, y), None, back=True,
                                                        like=ref[o][-1].shape))
        out = {}
        for o in ref:
            r, g = np.concatenate(ref[o]).astype(np.float64), np.concatenate(got[o])
            err = float(np.sum((r - g) ** 2))
            out[o] = round(10 * math.log10(float(np.sum(r * r)) / err), 2) if err else None
        return out
    except Exception as e:  # quality is an extra: a failure is recorded, not fatal
        return f"not measured: {type(e).__name__}: {e}"


def _to_layout(x: np.ndarray, want: list[int] | None, back: bool = False,
               like: tuple | None = None) -> np.ndarray:
    """ONNX channels-first <-> the runtime's channels-last, decided by shape."""
    if not back:
        if list(x.shape) == want:
            return x
        y = np.moveaxis(x, 1, -1)
        if list(y.shape) != want:
            raise ValueError(f"input shape {list(x.shape)} does not fit the .espdl's {want}")
        return y
    if like is None or tuple(x.shape) == tuple(like):
        return x
    y = np.moveaxis(x, -1, 1)
    if tuple(y.shape) != tuple(like):
        raise ValueError(f"output shape {list(x.shape)} does not fit the float model's {like}")
    return y


# ---- main -----------------------------------------------------------------------------------


def headline(cases: list[dict], ppq_skip: str | None) -> dict:
    def worst(key: str) -> float | None:
        xs = [c.get(key) for c in cases]
        return None if any(x is None for x in xs) else min(xs)

    h: dict = {"esp_ppq": f"skipped: {ppq_skip}"} if ppq_skip else {
        "goal_speedup": GOAL,
        "speedup_stages_min": worst("speedup_stages"),
        "speedup_convert_min": worst("speedup_convert"),
        "speedup_defaults_min": worst("speedup_defaults"),
        "speedup_convert_cpu_min": worst("speedup_convert_cpu"),
        "speedup_whole_process_min": worst("speedup_whole_process"),
    }
    for c in cases:
        ours = c["espstream"]
        text = (f"espstream stages {_med(ours['stage_seconds'])} s, "
                f"convert {_med(ours['convert_seconds'])} s")
        if not ppq_skip:
            ppq = c["esp_ppq"]
            text += (f"; ESP-PPQ {_med(ppq.get('no_error_report', {}).get('seconds'))} s, "
                     f"with error report {_med(ppq.get('error_report', {}).get('seconds'))} s")
        h[f"{c['model']}.{c['mode']}"] = text
    if not ppq_skip:
        for key in ("speedup_stages", "speedup_convert"):
            v = h[f"{key}_min"]
            h[f"goal_met_{key}"] = None if v is None else v >= GOAL
    return h


def _med(s: dict | None) -> str:
    return "n/a" if not s else f"{s['median']:.3f}"


def print_table(cases: list[dict]) -> None:
    hdr = (f"{'model':<14}{'mode':<11}{'ours stages':>12}{'ours convert':>13}{'PPQ':>9}"
           f"{'PPQ+report':>11}{'x stages':>9}{'x convert':>10}{'x defaults':>11}")
    print(hdr)
    for c in cases:
        o, p = c["espstream"], c["esp_ppq"]
        mode = c["mode"] if not c["chunk"] else f"chunk {c['chunk']}"
        print(f"{c['model']:<14}{mode:<11}{_med(o['stage_seconds']):>12}"
              f"{_med(o['convert_seconds']):>13}"
              f"{_med(p.get('no_error_report', {}).get('seconds')):>9}"
              f"{_med(p.get('error_report', {}).get('seconds')):>11}"
              f"{_fmt(c.get('speedup_stages')):>9}{_fmt(c.get('speedup_convert')):>10}"
              f"{_fmt(c.get('speedup_defaults')):>11}")
        if "sqnr_db" in c:
            print(f"{'':<14}SQNR vs float (held-out): espstream {c['sqnr_db']['espstream']}, "
                  f"ESP-PPQ {c['sqnr_db']['esp_ppq']}")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out",
                        default=str(ROOT / "benchmarks" / "results" / "convert_vs_ppq.json"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ppq-python", default=str(PPQ_PYTHON))
    parser.add_argument("--case", nargs=4, metavar=("MODEL", "CALIB", "CHUNK", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        model, calib, chunk, out = args.case
        print(json.dumps(run_espstream(model, calib, int(chunk) or None, out)))
        return 0

    ppq_python = Path(args.ppq_python)
    ppq_skip = ppq_available(ppq_python)
    if ppq_skip:
        print(f"ESP-PPQ side skipped: {ppq_skip}", file=sys.stderr)
    cases = []
    with tempfile.TemporaryDirectory(prefix="convert_vs_ppq.") as tmp:
        for name, chunk in CASES:
            print(f"-- {name} {'offline' if chunk is None else f'chunk {chunk}'}", flush=True)
            cases.append(run_case(name, chunk, args.repeat, ppq_python, ppq_skip, Path(tmp)))
    result = {
        "benchmark": "convert_vs_ppq",
        "target": TARGET, "bits": BITS, "calib_steps": CALIB_STEPS, "repeat": args.repeat,
        "timing": "median of fresh processes; ratios use in-process seconds (see docstring)",
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "headline": headline(cases, ppq_skip),
        "cases": cases,
    }
    if ppq_skip:
        result["esp_ppq"] = f"skipped: {ppq_skip}"
    print_table(cases)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""int8 output SQNR on the evaluation zoo: espstream against ESP-PPQ 1.3.12, both halves.

    .venv/bin/python benchmarks/zoo_quality.py [--quick] [--targets esp32p4,esp32s3]
        [--out benchmarks/results/zoo_quality.json]

For every zoo model (benchmarks/zoo.py) and target: calibration data (32 samples, seed 1000 +
index; --quick: 8) and held-out data (64 samples, seed 2000 + index; --quick: 16) of the
model's input statistic. espstream: optimize, calibrate (its defaults), export. ESP-PPQ:
benchmarks/ppq_side.py in benchmarks/.venv-ppq on the same calibration file (its defaults, as
benchmarks/convert_vs_ppq.py runs it). Both .espdl files then run in espstream's integer
simulator on the same held-out data; SQNR = 10 log10(sum y^2 / sum (y - y_q)^2) over all
outputs and samples against the float model in onnxruntime. A side that fails is recorded with
its reason. The table gives each half apart, never pooled. --quick: two models per half.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from convert_vs_ppq import _to_layout  # noqa: E402
from zoo import make_inputs, zoo  # noqa: E402

PPQ_PYTHON = ROOT / "benchmarks" / ".venv-ppq" / "bin" / "python"
if not PPQ_PYTHON.exists():
    PPQ_PYTHON = Path("/work/main/benchmarks/.venv-ppq/bin/python")
PPQ_SIDE = ROOT / "benchmarks" / "ppq_side.py"
QUICK = ("tcn_res_a", "ds_kws_a", "tcn_res_b", "ds_kws_b")


#: --ablation: each PTQ technique alone, all off, all on (espstream.quant.ptq); the row's
#: `espstream` figure is calibrate's defaults
OFF = {"equalize": False, "bias_correction": False, "adaround": False, "exponent_search": False}
VARIANTS: dict[str, dict] = {
    "none": OFF,
    "bias_correction": {**OFF, "bias_correction": True},
    "equalize": {**OFF, "equalize": True},
    "adaround": {**OFF, "adaround": True},
    "exponent_search": {**OFF, "exponent_search": True},
    "bias_correction+equalize": {**OFF, "bias_correction": True, "equalize": True},
    "bias_correction+equalize+adaround": {**OFF, "bias_correction": True, "equalize": True,
                                          "adaround": True},
    "all": {k: True for k in OFF},
}


def espstream_side(model: onnx.ModelProto, calib: Path, target: str, out: Path,
                   **options) -> float:
    from espstream.export import export_model
    from espstream.optimize import optimize_model
    from espstream.quant import calibrate_model, model_inputs, read_calibration_data

    opt = optimize_model(model).model
    cal = calibrate_model(opt, read_calibration_data(str(calib), model_inputs(opt)),
                          target=target, bits=8, report_samples=0, **options)
    out.write_bytes(export_model(cal.model, target=target).data)
    return cal.seconds


def ppq_side(model_path: Path, calib: Path, target: str, out: Path, steps: int) -> None:
    cmd = [str(PPQ_PYTHON), str(PPQ_SIDE), str(model_path), str(calib), str(out),
           "--target", target, "--bits", "8", "--calib-steps", str(steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if p.returncode or not out.exists():
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"ESP-PPQ failed (exit {p.returncode}): {tail[:300]}")


def sim_sqnr(model: onnx.ModelProto, espdl_path: Path, x: np.ndarray, target: str) -> float:
    import onnxruntime as ort

    from espstream import espdl
    from espstream.quant import scheme
    from espstream.sim import Simulator

    graph = espdl.read(espdl_path.read_bytes())
    sim = Simulator(graph, target=target)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    vi = graph.inputs[0]
    sig = err = 0.0
    for k in range(len(x)):
        xk = x[k : k + 1]
        ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {name: xk}),
                       strict=True))
        q = scheme.quantize(_to_layout(xk, list(vi.shape)), vi.exponent, 8,
                            scheme.get_target(target).rounding)
        for o, y in sim.run({vi.name: q}).items():
            r = ref[o].astype(np.float64)
            g = _to_layout(sim.dequantize(o, y), None, back=True, like=r.shape)
            sig += float(np.sum(r * r))
            err += float(np.sum((r - g) ** 2))
    return round(10 * math.log10(sig / err), 2) if err else math.inf


def run_case(i: int, m, target: str, work: Path, n_cal: int, n_held: int,
             ablation: bool = False, ppq_from: dict | None = None) -> dict:
    model = m.build()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    mpath = work / f"{m.name}.onnx"
    onnx.save(model, str(mpath))
    calib = work / f"{m.name}.calib.npy"
    np.save(calib, make_inputs(m.inputs, shape, n_cal, 1000 + i))
    held = make_inputs(m.inputs, shape, n_held, 2000 + i)
    row: dict = {"model": m.name, "family": m.family, "inputs": m.inputs, "half": m.half,
                 "target": target}
    sides = [("espstream", lambda o: espstream_side(model, calib, target, o))]
    if ppq_from is not None and (m.name, target) in ppq_from:
        old = ppq_from[(m.name, target)]  # the same model, data and ESP-PPQ: reused
        for k in ("esp_ppq", "esp_ppq_error", "esp_ppq_seconds"):
            if k in old:
                row[k] = old[k]
    else:
        sides.append(("esp_ppq", lambda o: ppq_side(mpath, calib, target, o, n_cal)))
    for side, fn in sides:
        out = work / f"{m.name}.{target}.{side}.espdl"
        t0 = time.perf_counter()
        try:
            cal_s = fn(out)
            row[side] = sim_sqnr(model, out, held, target)
            if cal_s is not None:
                row[f"{side}_calibrate_seconds"] = round(cal_s, 2)
        except Exception as e:  # a failing side is a figure too: recorded with its reason
            row[side] = None
            row[f"{side}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        row[f"{side}_seconds"] = round(time.perf_counter() - t0, 1)
    if ablation:
        row["ablation"] = {}
        for name, opts in VARIANTS.items():
            out = work / f"{m.name}.{target}.{name}.espdl"
            try:
                cal_s = espstream_side(model, calib, target, out, **opts)
                row["ablation"][name] = {"sqnr": sim_sqnr(model, out, held, target),
                                         "calibrate_seconds": round(cal_s, 2)}
            except Exception as e:
                row["ablation"][name] = {"sqnr": None, "error": f"{type(e).__name__}: "
                                         f"{str(e).splitlines()[0][:300]}"}
    if row["espstream"] is not None and row["esp_ppq"] is not None:
        row["delta_db"] = round(row["espstream"] - row["esp_ppq"], 2)
    return row


def summary(rows: list[dict]) -> dict:
    out: dict = {}
    for half in ("dev", "held"):
        for target in sorted({r["target"] for r in rows}):
            rs = [r for r in rows if r["half"] == half and r["target"] == target]
            d = [r["delta_db"] for r in rs if "delta_db" in r]
            out[f"{half}/{target}"] = {
                "models": len(rs), "compared": len(d),
                "median_delta_db": round(statistics.median(d), 2) if d else None,
                "min_delta_db": min(d) if d else None,
                "espstream_wins": sum(x >= 0 for x in d),
                "espstream_failed": sum(r["espstream"] is None for r in rs),
                "esp_ppq_failed": sum(r["esp_ppq"] is None for r in rs)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--targets", default="esp32p4,esp32s3")
    ap.add_argument("--models", help="comma-separated zoo names (default: all, or --quick's)")
    ap.add_argument("--ablation", action="store_true",
                    help="also each PTQ technique alone, none and all (rows' `ablation`)")
    ap.add_argument("--ppq-from", metavar="JSON",
                    help="reuse the ESP-PPQ figures of an earlier run (same models and data)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo_quality.json"))
    a = ap.parse_args()
    members = list(enumerate(zoo()))
    names = a.models.split(",") if a.models else (QUICK if a.quick else None)
    if names:
        members = [(i, m) for i, m in members if m.name in names]
    n_cal, n_held = (8, 16) if a.quick else (32, 64)
    ppq_from = None
    if a.ppq_from:
        old = json.loads(Path(a.ppq_from).read_text())
        if (old["calibration_samples"], old["held_out_samples"]) != (n_cal, n_held):
            ap.error("--ppq-from: that run used other sample counts")
        ppq_from = {(r["model"], r["target"]): r for r in old["rows"]}
    rows = []
    print(f"{'half':5s} {'model':14s} {'inputs':7s} {'target':8s} {'espstream':>9s} "
          f"{'ESP-PPQ':>8s} {'delta':>7s}")
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        for target in a.targets.split(","):
            for i, m in members:
                r = run_case(i, m, target, Path(tmp), n_cal, n_held, a.ablation, ppq_from)
                rows.append(r)

                def f(v):
                    return "fail" if v is None else f"{v:.2f}"
                print(f"{m.half:5s} {m.name:14s} {m.inputs:7s} {target:8s} "
                      f"{f(r['espstream']):>9s} {f(r['esp_ppq']):>8s} "
                      f"{f(r.get('delta_db')):>7s}", flush=True)
                for side in ("espstream", "esp_ppq"):
                    if f"{side}_error" in r:
                        print(f"      {side}: {r[side + '_error']}")
                if "ablation" in r:
                    print("      " + "  ".join(f"{k} {f(v['sqnr'])}"
                                               for k, v in r["ablation"].items()), flush=True)
    s = summary(rows)
    for k, v in s.items():
        print(f"{k:14s} median delta {v['median_delta_db']} dB, worst {v['min_delta_db']} dB, "
              f"espstream >= ESP-PPQ on {v['espstream_wins']}/{v['compared']}")
    res = {"quick": a.quick, "calibration_samples": n_cal, "held_out_samples": n_held,
           "bits": 8, "rows": rows, "summary": s}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`--mixed auto --target-sqnr 40` on the evaluation zoo, both halves (issue 16, item 3).

    .venv/bin/python benchmarks/mixed_precision.py [--quick] [--target esp32p4] [--sqnr 40]
        [--models a,b] [--out benchmarks/results/mixed_precision.json] [--sweep | --f64]

For every zoo model (benchmarks/zoo.py): calibration data (32 samples, seed 1000 + index, as
zoo_quality.py) and held-out data (64 samples, seed 2000 + index; --quick: 16). Three
calibrations of the optimized model: int8 (`--bits 8`), int16 everywhere (`--bits 16`) and
`--mixed auto --target-sqnr DB` (the choice is measured on the calibration data). Each QDQ
model is lowered and run in the integer simulator on the held-out data; SQNR against the float
model over all outputs and samples. Reported per model: the three SQNRs, the int16 layers and
their share of MACs, the extra parameter bytes, whether DB was reached where int16 everywhere
reaches it, and the mixed model's exactness: simulator vs fake-quant (identical share) and,
where the model streams (chunk 4, else 1), `verify --engine int8` (streaming == offline
exactly). No threshold is tuned here: the target is the issue's 40 dB and the only rule is
mixed.py's; both halves are reported apart. Simulator vs fake-quant is given twice: against
onnxruntime (float32) and against the same QDQ model evaluated in float64 (`qdq_f64`).

`--sweep` (development half only, mixed_precision_sweep.json): rule 10's guard, a margin of
0-3 dB or splits of the calibration data, against held-out SQNR; mixed.TARGET_MARGIN_DB was
chosen from it. `--f64` (mixed_precision_f64.json): simulator vs fake-quant in float32 and in
float64 for int8, int16 and mixed models on esp32p4 and esp32s3.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from zoo import make_inputs, zoo  # noqa: E402

QUICK = ("tcn_res_a", "ds_kws_a", "tcn_res_b", "ds_kws_b")


def sim_sqnr(qdq, fmodel, x: np.ndarray) -> float:
    import onnxruntime as ort

    from espstream.verify_int8 import Int8Runner

    sim = Int8Runner(qdq, "model")
    sess = ort.InferenceSession(fmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    sig = err = 0.0
    for k in range(len(x)):
        feed = {name: x[k : k + 1]}
        ref = dict(zip(outs, sess.run(None, feed), strict=True))
        got = sim.run(feed)
        for o in outs:
            r = ref[o].astype(np.float64)
            d = r - np.asarray(got[o], np.float64).reshape(r.shape)
            sig += float(np.sum(r * r))
            err += float(np.sum(d * d))
    return round(10 * math.log10(sig / err), 2) if err else math.inf


def ort_sqnr(qdq, fmodel, x: np.ndarray) -> float:
    import onnxruntime as ort

    q = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    f = ort.InferenceSession(fmodel.SerializeToString(), providers=["CPUExecutionProvider"])
    name = f.get_inputs()[0].name
    sig = err = 0.0
    for k in range(len(x)):
        for r, g in zip(f.run(None, {name: x[k : k + 1]}), q.run(None, {name: x[k : k + 1]}),
                        strict=True):
            r = r.astype(np.float64)
            sig += float(np.sum(r * r))
            err += float(np.sum((r - g) ** 2))
    return round(10 * math.log10(sig / err), 2) if err else math.inf


# ---- the fake-quant model in float64 (README: why the simulator and onnxruntime differ) ------


def _conv64(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, attrs: dict) -> np.ndarray:
    """ONNX Conv in float64 (any spatial rank, pads / strides / dilations / groups)."""
    nd = w.ndim - 2
    strides = attrs.get("strides", [1] * nd)
    dil = attrs.get("dilations", [1] * nd)
    pads = attrs.get("pads", [0] * 2 * nd)
    groups = attrs.get("group", 1)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    ks = w.shape[2:]
    out_sp = [(xp.shape[2 + i] - dil[i] * (ks[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    cin_g, cout = w.shape[1], w.shape[0]
    cout_g = cout // groups
    y = np.zeros((x.shape[0], cout, *out_sp))
    for k in np.ndindex(*ks):
        sl = tuple(slice(k[i] * dil[i], k[i] * dil[i] + strides[i] * (out_sp[i] - 1) + 1,
                         strides[i]) for i in range(nd))
        patch = xp[(slice(None), slice(None), *sl)]  # [N, Cin, *out]
        for g in range(groups):
            wk = w[(slice(g * cout_g, (g + 1) * cout_g), slice(None), *k)]  # [cout_g, cin_g]
            pg = patch[:, g * cin_g:(g + 1) * cin_g]
            y[:, g * cout_g:(g + 1) * cout_g] += np.einsum("oc,nc...->no...", wk, pg)
    if b is not None:
        y += b.reshape(1, -1, *([1] * nd))
    return y


def qdq_f64(model, feed: dict) -> dict:
    """The QDQ model's graph outputs computed in float64 with NumPy (QuantizeLinear rounds
    half to even and saturates, as onnxruntime does): every int8 / int16 product and sum of
    the fake-quant model is exact in float64 (53-bit mantissa), unlike in float32 (24 bits).
    Covers the ops of the zoo's convolutional models; anything else raises KeyError."""
    from onnx import helper, numpy_helper

    env = {t.name: numpy_helper.to_array(t).astype(np.float64)
           if numpy_helper.to_array(t).dtype.kind == "f" else numpy_helper.to_array(t)
           for t in model.graph.initializer}
    env.update({k: np.asarray(v, np.float64) for k, v in feed.items()})

    def per_axis(v: np.ndarray, ref: np.ndarray, axis: int) -> np.ndarray:
        if v.ndim == 0 or v.size == 1:
            return v.reshape(())
        shape = [1] * ref.ndim
        shape[axis] = v.size
        return v.reshape(shape)

    for n in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        ins = [env[i] if i else None for i in n.input]
        op = n.op_type
        if op == "QuantizeLinear":
            zp = ins[2]
            info = np.iinfo(zp.dtype)
            sc = per_axis(ins[1].astype(np.float64), ins[0], a.get("axis", 1))
            y = np.clip(np.rint(ins[0] / sc), info.min, info.max).astype(zp.dtype)
        elif op == "DequantizeLinear":
            sc = per_axis(ins[1].astype(np.float64), ins[0], a.get("axis", 1))
            y = ins[0].astype(np.float64) * sc
        elif op == "Conv":
            y = _conv64(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a)
        elif op == "Relu":
            y = np.maximum(ins[0], 0.0)
        elif op == "Add":
            y = ins[0] + ins[1]
        elif op == "Transpose":
            y = np.transpose(ins[0], a.get("perm"))
        elif op == "Reshape":
            y = ins[0].reshape([int(d) if d else ins[0].shape[i]
                                for i, d in enumerate(ins[1])])
        elif op == "Flatten":
            y = ins[0].reshape(ins[0].shape[0], -1)
        elif op in ("AveragePool", "MaxPool") and not any(a.get("pads", [0])):
            ks, st = a["kernel_shape"], a.get("strides", [1] * len(a["kernel_shape"]))
            x = ins[0]
            out = [(x.shape[2 + i] - ks[i]) // st[i] + 1 for i in range(len(ks))]
            win = [x[(slice(None), slice(None), *(slice(k[i], k[i] + st[i] * (out[i] - 1) + 1,
                                                        st[i]) for i in range(len(ks))))]
                   for k in np.ndindex(*ks)]
            y = np.mean(win, axis=0) if op == "AveragePool" else np.max(win, axis=0)
        elif op in ("GlobalAveragePool", "GlobalMaxPool"):
            axes = tuple(range(2, ins[0].ndim))
            f = np.mean if op == "GlobalAveragePool" else np.max
            y = f(ins[0], axis=axes, keepdims=True)
        elif op == "Gemm" and not a.get("transA", 0):
            w = ins[1].T if a.get("transB", 0) else ins[1]
            y = a.get("alpha", 1.0) * ins[0] @ w + (a.get("beta", 1.0) * ins[2]
                                                     if len(ins) > 2 else 0.0)
        elif op == "MatMul":
            y = ins[0] @ ins[1]
        else:
            raise KeyError(op)
        env[n.output[0]] = y
    return {o.name: env[o.name] for o in model.graph.output}


def f64_agreement(qdq, feeds: list[dict]) -> dict:
    """Per graph output's integers: simulator vs onnxruntime's fake-quant (float32) and vs the
    same fake-quant model in float64 (`qdq_f64`): identical share and largest difference."""
    from espstream.verify import OrtRunner
    from espstream.verify_int8 import Int8Runner

    sim, ort_ = Int8Runner(qdq, "model"), OrtRunner(qdq, "model")
    tot = {"ort_f32": [0, 0, 0], "numpy_f64": [0, 0, 0], "ort_f32_vs_numpy_f64": [0, 0, 0]}
    for feed in feeds:
        got = sim.run_int(feed)
        f32 = ort_.run(feed)
        f64 = qdq_f64(qdq, feed)
        for name, q in got.items():
            e = sim.graph.value_info(name).exponent
            a32 = np.rint(np.asarray(f32[name], np.float64) * 2.0**-e).astype(np.int64)
            a64 = np.rint(np.asarray(f64[name], np.float64) * 2.0**-e).astype(np.int64)
            q = q.astype(np.int64).reshape(a32.shape)
            for key, (u, v) in (("ort_f32", (q, a32)), ("numpy_f64", (q, a64)),
                                ("ort_f32_vs_numpy_f64", (a32, a64))):
                d = np.abs(u - v)
                t = tot[key]
                t[0] += d.size
                t[1] += int(np.count_nonzero(d == 0))
                t[2] = max(t[2], int(d.max(initial=0)))
    return {k: {"elements": v[0], "identical": v[1], "max_lsb": v[2]} for k, v in tot.items()}


def exactness(qdq, x: np.ndarray) -> dict:
    from espstream.stream.streamify import streamify_model
    from espstream.verify import verify_models
    from espstream.verify_int8 import int8_vs_fakequant, register

    register()  # the int8 engine of verify_models

    name = qdq.graph.input[0].name
    feeds = [{name: x[k : k + 1]} for k in range(min(4, len(x)))]
    a = int8_vs_fakequant(qdq, feeds)
    out = {"sim_vs_fakequant_identical": round(
        sum(c.identical for c in a.checks) / max(1, sum(c.size for c in a.checks)), 4)}
    try:  # the same comparison against the fake-quant model evaluated in float64
        out["sim_vs_fakequant"] = f64_agreement(qdq, feeds)
    except KeyError as e:
        out["sim_vs_fakequant"] = f"float64 evaluation lacks operator {e}"
    for chunk in (4, 1):
        try:
            st = streamify_model(qdq, chunk).model
            res = verify_models(qdq, st, data={name: x[:4]}, engine="int8")
            out.update(stream_chunk=chunk, verify_int8_ok=bool(res.ok))
            return out
        except Exception as e:  # a model that does not stream is recorded with the reason
            out["stream_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def run_case(i: int, m, target: str, sqnr: float, n_cal: int, n_held: int) -> dict:
    from espstream.optimize import optimize_model
    from espstream.quant import calibrate_model

    model = m.build()
    opt = optimize_model(model).model
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    cal_x = make_inputs(m.inputs, shape, n_cal, 1000 + i)
    held = make_inputs(m.inputs, shape, n_held, 2000 + i)
    import tempfile

    from espstream.quant import model_inputs, read_calibration_data

    row: dict = {"model": m.name, "family": m.family, "inputs": m.inputs, "half": m.half}
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "calib.npy"
        np.save(p, cal_x)
        data = read_calibration_data(str(p), model_inputs(opt))
        t0 = time.perf_counter()
        try:
            r8 = calibrate_model(opt, data, target=target, bits=8, report_samples=0)
            r16 = calibrate_model(opt, data, target=target, bits=16, report_samples=0)
            t1 = time.perf_counter()
            rm = calibrate_model(opt, data, target=target, mixed=(None, sqnr), report_samples=0)
            row["mixed_seconds"] = round(time.perf_counter() - t1, 2)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return row
        try:
            row["sqnr_int8_db"] = sim_sqnr(r8.model, opt, held)
            row["sqnr_int16_db"] = sim_sqnr(r16.model, opt, held)
            row["sqnr_mixed_db"] = sim_sqnr(rm.model, opt, held)
            row["engine"] = "int8 simulator"
        except Exception as e:  # not lowered (an operator export lacks): fake-quant instead
            row["engine"] = f"fake-quant onnxruntime ({str(e).splitlines()[0][:200]})"
            row["sqnr_int8_db"] = ort_sqnr(r8.model, opt, held)
            row["sqnr_int16_db"] = ort_sqnr(r16.model, opt, held)
            row["sqnr_mixed_db"] = ort_sqnr(rm.model, opt, held)
            row["choice"] = rm.mixed.to_json()
            row["int16_mac_share"] = row["choice"]["int16_mac_share"]
            row["int16_reaches"] = row["sqnr_int16_db"] >= sqnr
            row["mixed_reaches"] = row["sqnr_mixed_db"] >= sqnr
            row["mixed_reaches_on_calibration"] = rm.mixed.reached
            return row
        row["choice"] = rm.mixed.to_json()
        row["int16_mac_share"] = row["choice"]["int16_mac_share"]
        row["int16_reaches"] = row["sqnr_int16_db"] >= sqnr
        row["mixed_reaches"] = row["sqnr_mixed_db"] >= sqnr
        row["mixed_reaches_on_calibration"] = rm.mixed.reached
        row.update(exactness(rm.model, held))
        row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


#: the guards of mixed.py rule 10 tried by --sweep: (margin dB, folds)
SWEEP = ((0.0, 1, 0), (0.5, 1, 0), (1.0, 1, 0), (1.5, 1, 0), (2.0, 1, 0), (3.0, 1, 0),
         (0.0, 4, 0), (0.0, 8, 0), (0.0, 1, 2), (0.0, 1, 4), (0.5, 1, 2), (0.5, 1, 4))


def sweep_case(i: int, m, target: str, sqnr: float, n_cal: int, n_held: int) -> list[dict]:
    """--sweep: the guard of rule 10 (margin, folds) against held-out SQNR, one model."""
    from espstream.optimize import optimize_model
    from espstream.quant import calibrate_model, mixed, model_inputs, read_calibration_data

    model = m.build()
    opt = optimize_model(model).model
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    cal_x = make_inputs(m.inputs, shape, n_cal, 1000 + i)
    held = make_inputs(m.inputs, shape, n_held, 2000 + i)
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "calib.npy"
        np.save(p, cal_x)
        data = read_calibration_data(str(p), model_inputs(opt))
        saved = mixed.TARGET_MARGIN_DB, mixed.TARGET_FOLDS, mixed.TARGET_CROSS
        for margin, folds, cross in SWEEP:
            mixed.TARGET_MARGIN_DB, mixed.TARGET_FOLDS, mixed.TARGET_CROSS = margin, folds, cross
            try:
                rm = calibrate_model(opt, data, target=target, mixed=(None, sqnr),
                                     report_samples=0)
                try:
                    held_db, engine = sim_sqnr(rm.model, opt, held), "int8 simulator"
                except Exception:
                    held_db, engine = ort_sqnr(rm.model, opt, held), "fake-quant onnxruntime"
                ch = rm.mixed.to_json()
                out.append({"model": m.name, "half": m.half, "margin_db": margin,
                            "folds": folds, "cross": cross, "calibration_sqnr_db": ch["sqnr_db"],
                            "held_sqnr_db": held_db, "engine": engine,
                            "int16_mac_share": ch["int16_mac_share"],
                            "int16_layers": ch["int16_layers"]})
            finally:
                mixed.TARGET_MARGIN_DB, mixed.TARGET_FOLDS, mixed.TARGET_CROSS = saved
            print(f"{m.half:4s} {m.name:14s} margin {margin} folds {folds} cross {cross}: "
                  f"calibration {out[-1]['calibration_sqnr_db']} held "
                  f"{out[-1]['held_sqnr_db']} share {out[-1]['int16_mac_share']}", flush=True)
    return out


def f64_case(i: int, m, sqnr: float, n_cal: int) -> list[dict]:
    """--f64: simulator vs the fake-quant model in float32 (onnxruntime) and in float64
    (`qdq_f64`) on 4 held-out samples, int8 / int16 / --mixed auto, esp32p4 and esp32s3."""
    from espstream.optimize import optimize_model
    from espstream.quant import calibrate_model, model_inputs, read_calibration_data

    model = m.build()
    opt = optimize_model(model).model
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    cal_x = make_inputs(m.inputs, shape, n_cal, 1000 + i)
    held = make_inputs(m.inputs, shape, 4, 2000 + i)
    feeds = [{opt.graph.input[0].name: held[k : k + 1]} for k in range(len(held))]
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "calib.npy"
        np.save(p, cal_x)
        data = read_calibration_data(str(p), model_inputs(opt))
        for target in ("esp32p4", "esp32s3"):
            for label, kw in (("int8", {"bits": 8}), ("int16", {"bits": 16}),
                              ("mixed", {"mixed": (None, sqnr)})):
                r = calibrate_model(opt, data, target=target, report_samples=0, **kw)
                try:
                    agree: dict | str = f64_agreement(r.model, feeds)
                except KeyError as e:
                    agree = f"float64 evaluation lacks operator {e}"
                row = {"model": m.name, "half": m.half, "target": target, "case": label,
                       "int16_layers": r.mixed.layers16 if r.mixed else None,
                       "agreement": agree}
                out.append(row)
                print(f"{m.half:4s} {m.name:14s} {target} {label:5s} {agree}", flush=True)
                if isinstance(agree, str):
                    return out
    return out


def summary(rows: list[dict], sqnr: float) -> dict:
    out = {}
    for half in ("dev", "held"):
        rs = [r for r in rows if r["half"] == half and "error" not in r]
        need = [r for r in rs if r["int16_reaches"]]
        out[half] = {
            "models": len([r for r in rows if r["half"] == half]),
            "failed": [r["model"] for r in rows if r["half"] == half and "error" in r],
            "int16_reaches": len(need),
            "mixed_reaches_where_int16_does": sum(r["mixed_reaches"] for r in need),
            "missed": [r["model"] for r in need if not r["mixed_reaches"]],
            "median_int16_mac_share": (round(float(np.median([r["int16_mac_share"]
                                                               for r in need])), 3)
                                       if need else None),
            "median_int16_byte_share": (round(float(np.median([
                r["choice"]["int16_byte_share"] for r in need])), 3) if need else None),
            "sim_equals_float64_fakequant": sum(
                isinstance(r.get("sim_vs_fakequant"), dict) and
                r["sim_vs_fakequant"]["numpy_f64"]["identical"] ==
                r["sim_vs_fakequant"]["numpy_f64"]["elements"] for r in rs),
            "float64_evaluated": sum(isinstance(r.get("sim_vs_fakequant"), dict) for r in rs),
            "verify_int8_ok": sum(bool(r.get("verify_int8_ok")) for r in rs),
            "streamed": sum("verify_int8_ok" in r for r in rs),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--target", default="esp32p4")
    ap.add_argument("--sqnr", type=float, default=40.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "mixed_precision.json"))
    ap.add_argument("--models", default="", help="comma-separated zoo names (default all)")
    ap.add_argument("--sweep", action="store_true",
                    help="the development half only: rule 10's guard (margin, folds) against "
                         "held-out SQNR, to benchmarks/results/mixed_precision_sweep.json")
    ap.add_argument("--f64", action="store_true",
                    help="simulator vs fake-quant in float32 and float64, int8 / int16 / mixed, "
                         "to benchmarks/results/mixed_precision_f64.json")
    a = ap.parse_args()
    n_cal, n_held = 32, (16 if a.quick else 64)
    only = {x for x in a.models.split(",") if x}
    if a.f64:
        rows = []
        for i, m in enumerate(zoo()):
            if not only or m.name in only:
                rows += f64_case(i, m, a.sqnr, n_cal)
        out = Path(a.out).with_name("mixed_precision_f64.json")
        out.write_text(json.dumps({"samples": 4, "rows": rows}, indent=1) + "\n")
        return 0
    if a.sweep:
        rows = []
        for i, m in enumerate(zoo()):
            if m.half != "dev" or (only and m.name not in only):
                continue
            rows += sweep_case(i, m, a.target, a.sqnr, n_cal, n_held)
        out = Path(a.out).with_name("mixed_precision_sweep.json")
        out.write_text(json.dumps({"target": a.target, "target_sqnr_db": a.sqnr,
                                   "calibration_samples": n_cal, "held_out_samples": n_held,
                                   "rows": rows}, indent=1) + "\n")
        return 0
    rows = []
    for i, m in enumerate(zoo()):
        if (a.quick and m.name not in QUICK) or (only and m.name not in only):
            continue
        row = run_case(i, m, a.target, a.sqnr, n_cal, n_held)
        rows.append(row)
        print(f"{m.half:4s} {m.name:14s} int8 {row.get('sqnr_int8_db')} int16 "
              f"{row.get('sqnr_int16_db')} mixed {row.get('sqnr_mixed_db')} share "
              f"{row.get('int16_mac_share')} verify {row.get('verify_int8_ok')} "
              f"{row.get('error', '')}", flush=True)
    res = {"target": a.target, "target_sqnr_db": a.sqnr, "calibration_samples": n_cal,
           "held_out_samples": n_held, "quick": a.quick, "rows": rows,
           "summary": summary(rows, a.sqnr)}
    print(json.dumps(res["summary"], indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of calibration against sequence length (issue 16, item 4).

A 128-channel TCN (8 causal dilated Conv1d + ReLU layers with residual Adds, seed 0) is built
at T=1000 and T=10000 and calibrated as `convert --random 32` does (`calibrate_model` on 32
standard-normal samples, its default options, the report included). Each case runs in its own
subprocess; the figure is that process's peak resident memory (`resource.getrusage`,
ru_maxrss), beside the same process's memory just before calibration (model built, modules
imported). Three modes:

- `calibrate`: report_samples=0 (observing, the PTQ moments pass, exponents, the QDQ model);
- `report`: the per-layer report on 32 samples too (what `calibrate` and `convert -v` run);
- `convert`: `convert_model(model, random=32)`, what `convert --random 32` runs: optimize,
  calibrate, export with test values, and the checks (SQNR of fake-quant and of the int8
  simulator against float on the first 4 samples, their agreement, the .espdl test values).

Goal: peak at T=10000 within 1.3x of T=1000. Prints and saves JSON
(benchmarks/results/calibrate_memory.json).

    python benchmarks/calibrate_memory.py [--lengths 1000,10000] [--samples 32]
        [--modes calibrate,report,convert]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHANNELS, LAYERS = 128, 8


def build_tcn(T: int, channels: int = CHANNELS, layers: int = LAYERS, seed: int = 0):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        d = 2**i
        w = (rng.standard_normal((channels, channels, 3)) / np.sqrt(3 * channels)).astype(
            np.float32)
        b = (0.1 * rng.standard_normal(channels)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"],
                                      dilations=[d], pads=[2 * d, 0], kernel_shape=[3]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        nodes.append(helper.make_node("Add", [x, f"r{i}"], [f"a{i}"]))
        x = f"a{i}"
    graph = helper.make_graph(
        nodes, "tcn128",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, T])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, T])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(T: int, samples: int, mode: str) -> None:
    import time

    from espstream.quant.calibrate import calibrate_model
    from espstream.quant.data import model_inputs, random_data

    model = build_tcn(T)
    before = _maxrss_mb()
    t0 = time.perf_counter()
    extra: dict = {}
    if mode == "convert":
        from espstream.convert import convert_model

        r = convert_model(model, random=samples)
        res = r.calibrated
        extra = {"ok": r.ok, "sqnr_db": {k: {e: round(x, 3) for e, x in d.items()}
                                         for k, d in r.sqnr.items()}}
    else:
        data = random_data(model_inputs(model), samples, seed=0)
        res = calibrate_model(model, data, report_samples=0 if mode == "calibrate" else 32)
    print(json.dumps({"mode": mode, "T": T, "samples": samples, "rss_before_mb": round(before, 1),
                      "peak_mb": round(_maxrss_mb(), 1),
                      "seconds": round(time.perf_counter() - t0, 2),
                      "batched": res.batched, **extra}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1000,10000")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--modes", default="calibrate,report,convert")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="convert", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                          "calibrate_memory.json"))
    a = ap.parse_args()
    if a.child:
        child(a.child, a.samples, a.mode)
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out: dict = {"model": f"TCN {CHANNELS} channels, {LAYERS} layers", "samples": a.samples,
                 "goal": "peak at the longest length within 1.3x of the shortest"}
    for mode in a.modes.split(","):
        rows = []
        for T in [int(t) for t in a.lengths.split(",")]:
            p = subprocess.run([sys.executable, __file__, "--child", str(T), "--samples",
                                str(a.samples), "--mode", mode], capture_output=True, text=True,
                               env=env)
            if p.returncode:
                sys.stderr.write(p.stderr)
                return 1
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:9s} T={T:6d}  peak {row['peak_mb']:8.1f} MB  (before calibration "
                  f"{row['rss_before_mb']:.1f} MB, {row['seconds']} s, batched {row['batched']})")
        m = out[mode] = {"rows": rows}
        if len(rows) >= 2:
            m["ratio_last_to_first"] = round(rows[-1]["peak_mb"] / rows[0]["peak_mb"], 3)
            m["goal_met"] = m["ratio_last_to_first"] <= 1.3
            print(f"{mode:9s} peak ratio T={rows[-1]['T']} / T={rows[0]['T']}: "
                  f"{m['ratio_last_to_first']}  (goal <= 1.3: "
                  f"{'met' if m['goal_met'] else 'NOT met'})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GRU / LSTM accuracy: espstream's int8 / int16 export against float, beside ESP-PPQ's.

For every GRU / LSTM configuration of tests/data/ops-suite (ESP-DL's op_cfg.toml; the state is
a graph input there, see its README): ESP-PPQ 1.3.12's .espdl (calibrated on 2 standard-normal
samples) and espstream's (calibrated on `--samples` standard-normal samples, exported) run in
the simulator (which reproduces ESP-PPQ's own test values of these files, tests/test_ops_suite)
on the same fresh inputs (the sequence ~ N(0, 1); the state the float layer's own final state
after another such sequence, as a stream feeds it), against the float model in onnxruntime.
SQNR = 10 log10(sum ref^2 / sum (ref - got)^2) over all outputs, per configuration, target and
width; neither side was tuned on these models.

    PYTHONPATH=. python benchmarks/recurrent_sqnr.py [-o benchmarks/results/recurrent_sqnr.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from espstream.espdl import read
from espstream.export import export_model
from espstream.quant import calibrate_model, model_inputs, random_data, scheme
from espstream.sim import Simulator

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "ops-suite"


def _quantize(g, name: str, x: np.ndarray, target: str) -> np.ndarray:
    """Real values -> the graph input's integers in its runtime layout (export's
    quantize_input reads axis 0 as the batch, and these inputs have the sequence there)."""
    vi = g.value_info(name)
    q = scheme.quantize(x, vi.exponents[0], 8 if vi.dtype == np.int8 else 16,
                        scheme.get_target(target).rounding)
    perm = json.loads(g.metadata.get("espstream.layout", "{}")).get(name, list(range(q.ndim)))
    return np.ascontiguousarray(np.transpose(q, perm)).astype(vi.dtype)


def sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([x.reshape(-1) for x in ref]).astype(np.float64)
    g = np.concatenate([x.reshape(-1) for x in got]).astype(np.float64)
    noise = float(np.sum((r - g) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(r**2)) / noise)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=str(Path(__file__).parent / "results" /
                                               "recurrent_sqnr.json"))
    ap.add_argument("--samples", type=int, default=32, help="calibration samples (espstream)")
    ap.add_argument("--eval", type=int, default=16, help="evaluation samples")
    args = ap.parse_args()
    manifest = json.loads((DATA / "manifest.json").read_text())
    rows = []
    for f in manifest["files"]:
        if f["op"] not in ("GRU", "LSTM"):
            continue
        m = onnx.load(str(DATA / f["op"] / f["config"] / "model.onnx"))
        ppq = read((DATA / f["path"]).read_bytes())
        data = random_data(model_inputs(m), args.samples, seed=0)
        cal = calibrate_model(m, data, target=f["target"], bits=f["bits"], report_samples=0)
        ours = export_model(cal.model).graph
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        rng = np.random.default_rng(1)
        ref, got = [], {"espstream": [], "esp-ppq": []}
        specs = model_inputs(m)
        for _ in range(args.eval):
            # the sequence ~ N(0, 1) as in ESP-PPQ's calibration; the state as a stream feeds
            # it: the float layer's own final state after another such sequence from zeros
            shapes = {vi.name: [int(d) for d in vi.shape] for vi in specs}
            seq = specs[0].name
            warm = {n: (rng.standard_normal(sh) if n == seq else np.zeros(sh))
                    .astype(np.float32) for n, sh in shapes.items()}
            states = sess.run(None, warm)[1:1 + len(specs) - 1]
            real = {seq: rng.standard_normal(shapes[seq]).astype(np.float32)}
            for vi, st in zip(specs[1:], states, strict=True):
                real[vi.name] = np.asarray(st, np.float32).reshape(shapes[vi.name])
            ref += sess.run(None, real)
            for key, g in (("espstream", ours), ("esp-ppq", ppq)):
                out = Simulator(g, target=f["target"]).run(
                    {n: _quantize(g, n, v, f["target"]) for n, v in real.items()})
                got[key] += [(out[n].astype(np.float64) * 2.0 ** g.value_info(n).exponents[0])
                             .reshape(r.shape) for n, r in zip(names, ref[-len(names):],
                                                               strict=True)]
        rows.append({"op": f["op"], "config": f["config"], "target": f["target"],
                     "bits": f["bits"], "sqnr_espstream_db": sqnr(ref, got["espstream"]),
                     "sqnr_esp_ppq_db": sqnr(ref, got["esp-ppq"])})
    print(f"{'config':42} {'target':8} {'bits':>4} {'espstream dB':>12} {'ESP-PPQ dB':>10}")
    for r in rows:
        print(f"{r['config']:42} {r['target']:8} {r['bits']:4} {r['sqnr_espstream_db']:12.1f} "
              f"{r['sqnr_esp_ppq_db']:10.1f}")
    for bits in (8, 16):
        sel = [r for r in rows if r["bits"] == bits]
        if sel:
            d = [r["sqnr_espstream_db"] - r["sqnr_esp_ppq_db"] for r in sel]
            print(f"int{bits}: espstream - ESP-PPQ, median {np.median(d):+.1f} dB, min "
                  f"{min(d):+.1f}, max {max(d):+.1f} over {len(sel)} files")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far ESP-DL's GRU / LSTM on a chip may part from the simulator: fused multiply-adds.

ESP-DL compiles with `-ffast-math -O3` (esp-dl/CMakeLists.txt), so GCC may contract the float
update's multiply-adds (GRU: ic_n + r * hc_n, ... + z * h; LSTM: f * c + ...) into one fused
instruction on chips with a hardware FMA (esp32s3 MADD.S, esp32p4 fmadd.s); the simulator
computes them unfused, as the C source reads. This script runs every GRU / LSTM file of
tests/data/ops-suite on its test inputs plus 199 random inputs, unfused and fused
(`rnn_forward(fused=True)`), and counts the output values that change.

    PYTHONPATH=. python benchmarks/recurrent_fma.py [-o benchmarks/results/recurrent_fma.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from espstream.espdl import read
from espstream.ops import recurrent as rec
from espstream.sim import Simulator

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "ops-suite"


def _feeds(ins: dict[str, np.ndarray], n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = [ins]
    for _ in range(n):
        feed = {}
        for name, v in ins.items():
            info = np.iinfo(v.dtype)
            if name in ("x", "x0"):  # the sequence: spread like ESP-PPQ's test input
                r = rng.standard_normal(v.shape) * (40 if v.dtype == np.int8 else 10000)
            else:  # a state: anywhere in its range
                r = rng.integers(info.min, info.max + 1, v.shape)
            feed[name] = np.clip(r, info.min, info.max).astype(v.dtype)
        out.append(feed)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=str(Path(__file__).parent / "results" /
                                               "recurrent_fma.json"))
    ap.add_argument("--random", type=int, default=199)
    args = ap.parse_args()
    manifest = json.loads((DATA / "manifest.json").read_text())
    orig = rec.rnn_forward
    rows: dict[str, dict] = {}
    try:
        for f in manifest["files"]:
            if f["op"] not in ("GRU", "LSTM"):
                continue
            g = read((DATA / f["path"]).read_bytes())
            feeds = _feeds({n: t.data for n, t in g.test_inputs.items()}, args.random)
            runs = []
            for fused in (False, True):
                rec.rnn_forward = lambda *a, fused=fused, **k: orig(*a, fused=fused)
                runs.append([Simulator(g, target=f["target"]).run(x) for x in feeds])
            row = rows.setdefault(f"{f['op']} int{f['bits']} {f['target']}",
                                  {"values": 0, "differ": 0, "max_diff": 0, "files": 0})
            row["files"] += 1
            for a, b in zip(*runs, strict=True):
                for k in a:
                    d = np.abs(a[k].astype(np.int64) - b[k].astype(np.int64))
                    row["values"] += d.size
                    row["differ"] += int(np.count_nonzero(d))
                    row["max_diff"] = max(row["max_diff"], int(d.max()))
    finally:
        rec.rnn_forward = orig
    for k, r in sorted(rows.items()):
        print(f"{k:22} {r['differ']:6} of {r['values']:7} values differ "
              f"({100 * r['differ'] / r['values']:.3f}%), max {r['max_diff']} LSB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

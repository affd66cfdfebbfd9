"""The suite's float models through espstream's own calibrate + export, against ESP-PPQ's files.

    .venv/bin/python tools/ops_suite/compare_espstream.py [tests/data/ops-suite] [--target esp32s3]
        [--bits 8] [--ops Conv Add ...] [--json out.json]

Runs in the project's environment (.venv). For every configuration of the manifest that has an
ESP-PPQ file for the target and bits: `espstream.optimize.optimize_model` (as `convert` runs it),
`espstream.quant.calibrate.calibrate_model` (8 standard-normal samples, seed 0) and
`espstream.export.export_model` on its `model.onnx`, then reads both
`.espdl` files with `espstream.espdl.read` and compares the node sequences (ESP-DL operator
types in order) and, where the sequences agree, each node's attributes (initializer values and
layouts are not compared). Prints one line per configuration: `same`, `differs: ...`, or
`espstream refuses: <first line>`; and a count per operator. The exponents differ by design
(another calibration), so they are not compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.espdl import read
from espstream.export import export_model
from espstream.optimize import optimize_model
from espstream.quant.calibrate import calibrate_model
from espstream.quant.data import model_inputs, random_data

IGNORED_ATTRS = {"lut"}  # a name, not a value


def nodes(g) -> list[tuple[str, dict]]:
    out = []
    for n in g.nodes:
        attrs = {}
        for k, v in n.attrs.items():
            if k in IGNORED_ATTRS:
                continue
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, bytes):
                v = v.decode(errors="replace")
            attrs[k] = v
        out.append((n.op_type, attrs))
    return out


def compare(ppq_path: Path, onnx_path: Path, target: str, bits: int) -> str:
    model = onnx.load(str(onnx_path))
    try:
        model = optimize_model(model).model
        calib = random_data(model_inputs(model), 8, 0)
        q = calibrate_model(model, calib, target=target, bits=bits, report_samples=0).model
        ours = export_model(q, target).graph
    except UserError as e:
        return "espstream refuses: " + (str(e).splitlines() or ["(no message)"])[0][:200]
    theirs = read(ppq_path.read_bytes())
    a, b = nodes(ours), nodes(theirs)
    ta, tb = [t for t, _ in a], [t for t, _ in b]
    if ta != tb:
        return f"differs: nodes espstream {ta} / ESP-PPQ {tb}"
    diffs = []
    for i, ((t, x), (_, y)) in enumerate(zip(a, b, strict=True)):
        for k in sorted(set(x) | set(y)):
            if x.get(k) != y.get(k):
                diffs.append(f"{t}#{i}.{k}: espstream {x.get(k)!r} / ESP-PPQ {y.get(k)!r}")
    return "same" if not diffs else "differs: " + "; ".join(diffs[:4])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default="tests/data/ops-suite")
    ap.add_argument("--target", default="esp32s3")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--ops", nargs="+")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.data)
    manifest = json.loads((root / "manifest.json").read_text())
    results = {}
    for f in manifest["files"]:
        if f["target"] != args.target or f["bits"] != args.bits:
            continue
        if args.ops and f["op"] not in args.ops:
            continue
        onnx_path = root / f["op"] / f["config"] / "model.onnx"
        try:
            verdict = compare(root / f["path"], onnx_path, args.target, args.bits)
        except Exception as e:  # noqa: BLE001 - a crash of ours is a finding too
            verdict = f"espstream crashes: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        results[f"{f['op']}/{f['config']}"] = verdict
        print(f"{f['op']}/{f['config']}: {verdict}", flush=True)
    per_op: dict[str, Counter] = defaultdict(Counter)
    for key, v in results.items():
        per_op[key.split("/")[0]][v.split(":")[0]] += 1
    print("\nper operator:")
    for op in sorted(per_op):
        print(f"  {op}: {dict(per_op[op])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""espstream's `optimize` side by side with onnxsim: seconds and node counts on the same files.

    .venv/bin/python benchmarks/optimize.py [--out PATH] [--repeat N]

Models: every models/*.onnx and the PyTorch-exported fixtures tests/data/esp-ppq/*/model.onnx.
For each, both tools run on an untouched copy of the file; time is the best of `--repeat` runs
(default 3). `ours` runs without its own onnxruntime check, as onnxsim runs by default (check_n=0);
`ours+check` is what `espstream optimize` costs a user, check included. Both results are then run
in onnxruntime against the original on the model's sample input (NAME.input.npy, or the first
calibration sample for the fixtures) with the stage's tolerance (rtol 1e-4, atol 1e-5).

Goal (issue 2): no more nodes than onnxsim leaves, and under 2 s for each model. Where ours
leaves more nodes, the op types it keeps beyond onnxsim's are listed. Prints a table on stdout
and writes JSON (default benchmarks/results/optimize.json).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
RTOL, ATOL = 1e-4, 1e-5
GOAL_SECONDS = 2.0


def cases() -> list[tuple[str, Path, Path]]:
    """(label, model, sample input) for every bundled model and fixture."""
    found = []
    for path in sorted((ROOT / "models").glob("*.onnx")):
        found.append((path.stem, path, path.with_name(f"{path.stem}.input.npy")))
    for path in sorted((ROOT / "tests/data/esp-ppq").glob("*/model.onnx")):
        found.append((f"esp-ppq/{path.parent.name}", path, path.with_name("calib.npy")))
    return found


def sample_feed(model: onnx.ModelProto, data_path: Path) -> dict[str, np.ndarray]:
    """The single input's sample: NAME.input.npy as it is, or the first row of a calibration set."""
    (inp,) = model.graph.input
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    data = np.load(data_path).astype(np.float32)
    if list(data.shape) != shape:
        data = data[:1]
    assert list(data.shape) == shape, (data_path, data.shape, shape)
    return {inp.name: data}


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, Any]:
    """Largest absolute difference and whether every output is within rtol/atol."""
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got, strict=False)):
        return {"match": False, "max_abs_diff": None, "note": "outputs differ in number or shape"}
    diff = max(float(np.max(np.abs(r - g))) for r, g in zip(ref, got, strict=True))
    ok = all(np.allclose(g, r, rtol=RTOL, atol=ATOL) for r, g in zip(ref, got, strict=True))
    return {"match": ok, "max_abs_diff": diff}


def best_of(fn: Callable[[onnx.ModelProto], onnx.ModelProto], model: onnx.ModelProto,
            repeat: int) -> tuple[float, onnx.ModelProto]:
    """Best wall time of `repeat` runs, each on a fresh copy (copying is not timed)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        out = fn(m)
        best = min(best, time.perf_counter() - t0)
    assert out is not None
    return best, out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def extra_ops(ours: dict[str, int], theirs: dict[str, int]) -> dict[str, int]:
    """Op types ours keeps more of than onnxsim, with how many more."""
    return {op: n - theirs.get(op, 0) for op, n in ours.items() if n > theirs.get(op, 0)}


def load_tools() -> tuple[Callable[..., Any], Callable[..., Any]]:
    try:
        from espstream.optimize import optimize_model
    except ImportError as e:
        sys.exit(f"benchmarks/optimize.py: espstream.optimize.optimize_model is missing ({e})")
    try:
        import onnxsim
    except ImportError:
        sys.exit("benchmarks/optimize.py: onnxsim is not installed: pip install -e '.[bench]'")
    return optimize_model, onnxsim.simplify


def bench_one(label: str, path: Path, data: Path, repeat: int,
              optimize_model: Callable[..., Any], simplify: Callable[..., Any]) -> dict[str, Any]:
    original = onnx.load(path)
    feed = sample_feed(original, data)
    ref = run(original, feed)

    def ours(m: onnx.ModelProto) -> onnx.ModelProto:
        return optimize_model(m, check=False).model

    def ours_checked(m: onnx.ModelProto) -> onnx.ModelProto:
        return optimize_model(m, check=True).model

    def onnxsim_(m: onnx.ModelProto) -> onnx.ModelProto:
        out, ok = simplify(m)
        if not ok:
            raise RuntimeError(f"{label}: onnxsim's own check failed")
        return out

    row: dict[str, Any] = {"model": label, "file": str(path.relative_to(ROOT)),
                           "nodes_before": len(original.graph.node),
                           "ops_before": op_counts(original)}
    for key, fn in (("ours", ours), ("ours_checked", ours_checked), ("onnxsim", onnxsim_)):
        seconds, out = best_of(fn, original, repeat)
        row[f"{key}_seconds"] = round(seconds, 4)
        if key == "ours_checked":
            continue  # same graph as `ours`; only its time is of interest
        onnx.checker.check_model(out, full_check=True)
        row[key] = {"nodes": len(out.graph.node), "ops": op_counts(out),
                    **compare(ref, run(out, feed))}
    row["extra_ops_in_ours"] = extra_ops(row["ours"]["ops"], row["onnxsim"]["ops"])
    row["goal_nodes"] = row["ours"]["nodes"] <= row["onnxsim"]["nodes"]
    row["goal_seconds"] = row["ours_checked_seconds"] < GOAL_SECONDS
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/optimize.json",
                        help="JSON report path")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool (best kept)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    optimize_model, simplify = load_tools()

    from espstream.report import table, write_json

    rows = [bench_one(*case, args.repeat, optimize_model, simplify) for case in cases()]
    headers = ["model", "nodes", "ours", "onnxsim", "ours s", "ours+check s", "onnxsim s",
               "ours ok", "onnxsim ok", "goal"]
    lines = [
        [r["model"], r["nodes_before"], r["ours"]["nodes"], r["onnxsim"]["nodes"],
         f"{r['ours_seconds']:.3f}", f"{r['ours_checked_seconds']:.3f}",
         f"{r['onnxsim_seconds']:.3f}",
         _ok(r["ours"]), _ok(r["onnxsim"]),
         "yes" if r["goal_nodes"] and r["goal_seconds"] else "NO"]
        for r in rows
    ]
    print(table(headers, lines))
    for r in rows:
        print(f"\n{r['model']}: ours    {_ops(r['ours']['ops'])}")
        print(f"{' ' * len(r['model'])}  onnxsim {_ops(r['onnxsim']['ops'])}")
        if r["extra_ops_in_ours"]:
            print(f"{' ' * len(r['model'])}  ours keeps more: {_ops(r['extra_ops_in_ours'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(str(args.out), {
        "benchmark": "optimize",
        "headline": headline(rows),
        "goal": {"nodes": "ours <= onnxsim", "seconds": GOAL_SECONDS},
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "repeat": args.repeat,
        "versions": _versions(),
        "results": rows,
    })
    print(f"\nwrote {args.out}")
    failed = [r["model"] for r in rows if not (r["ours"]["match"] and r["onnxsim"]["match"])]
    if failed:
        print(f"outputs differ from the original: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals with the measured figures: nodes against onnxsim's and seconds
    (`optimize` with its check, as a user runs it) per model, and the slowest model."""
    h: dict[str, Any] = {
        "goal": f"nodes <= onnxsim's and under {GOAL_SECONDS:g} s per model (check included)",
        "goal_met": all(r["goal_nodes"] and r["goal_seconds"] for r in rows),
        "max_seconds": max(r["ours_checked_seconds"] for r in rows),
        "nodes_minus_onnxsim_max": max(r["ours"]["nodes"] - r["onnxsim"]["nodes"] for r in rows),
    }
    for r in rows:
        h[r["model"]] = (f"{r['ours']['nodes']} nodes vs onnxsim {r['onnxsim']['nodes']} (from "
                         f"{r['nodes_before']}); {r['ours_checked_seconds']:.3f} s vs onnxsim "
                         f"{r['onnxsim_seconds']:.3f} s")
    return h


def _ok(result: dict[str, Any]) -> str:
    diff = result["max_abs_diff"]
    return ("ok" if result["match"] else "DIFF") + ("" if diff is None else f" {diff:.1e}")


def _ops(ops: dict[str, int]) -> str:
    return " ".join(f"{op}:{n}" for op, n in ops.items()) or "-"


def _versions() -> dict[str, str]:
    import onnxsim

    import espstream

    return {"python": platform.python_version(), "espstream": espstream.__version__,
            "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "onnxsim": str(onnxsim.__version__), "numpy": np.__version__,
            "machine": platform.machine()}


if __name__ == "__main__":
    sys.exit(main())

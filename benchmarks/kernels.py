"""Throughput of the int8 convolution kernel, single thread, against the NumPy oracle and
onnxruntime's own integer convolutions.

    .venv/bin/python benchmarks/kernels.py [--out PATH] [--repeat N] [--min-time S]

Shapes (issue 5): (a) NWC T=1000, 64 -> 64 channels, kernel 3, pads 1; (b) depthwise 3x3, pads 1,
on NHWC 49x10x64; (c) pointwise 64 -> 64 on 49x10. GMAC/s counts the nominal MACs
(outputs x kernel taps x C_in/groups) for every implementation alike.

Contenders, all on one thread and the same data:
- `ours`: `espstream.kernels.conv` as a simulator calls it (argument checks, int8 -> int16
  widening and requantization included), channels-last;
- `numpy`: `espstream.kernels.reference.conv`, the oracle;
- onnxruntime 1 intra-op thread, NCHW: `ConvInteger` s8 x s8 -> int32 (no requantization), and
  `QLinearConv` s8 (the signed int8 activations ESP-DL uses) and u8 (asymmetric uint8
  activations, the path onnxruntime optimises most; different arithmetic, listed for context).

Goals: ours at least 20x the NumPy oracle, and ours no slower than 3x the faster of onnxruntime's
s8 kernels (ConvInteger s8, QLinearConv s8). The u8 ratio is reported, not judged. Each time is
the best of `--repeat` rounds; a round calls every contender in turn, each for at least
`--min-time` seconds (interleaved, so load from other processes skews no single contender).

Correctness is checked on the same data: ours == the oracle bit for bit, and ours equals
ConvInteger's int32 sums put through the oracle's requantization (so both compute the same
convolution). Prints a table and writes JSON (default benchmarks/results/kernels.json).
"""

from __future__ import annotations

import os

# One thread everywhere, set before NumPy / onnxruntime load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from espstream import kernels  # noqa: E402
from espstream.kernels import reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOAL_VS_NUMPY = 20.0
GOAL_VS_ORT = 3.0
SHIFT = 10  # e_out - e_in - e_w: a typical int8 conv right shift


def shapes(rng: np.random.Generator) -> list[dict]:
    """The three cases: channels-last data, [C_out, kH, kW, C_in/g] weights, conv arguments."""

    def i8(*shape):
        return rng.integers(-128, 128, shape, dtype=np.int8)

    return [
        dict(name="a: NWC T=1000 64->64 k3", x=i8(1000, 64), w=i8(64, 3, 64), groups=1, pads=1,
             macs=1000 * 64 * 64 * 3),
        dict(name="b: depthwise 3x3 49x10x64", x=i8(49, 10, 64), w=i8(64, 3, 3, 1), groups=64,
             pads=1, macs=49 * 10 * 64 * 9),
        dict(name="c: pointwise 64->64 49x10", x=i8(49, 10, 64), w=i8(64, 1, 1, 64), groups=1,
             pads=0, macs=49 * 10 * 64 * 64),
    ]  # fmt: skip


def best_times(fns: dict[str, Callable[[], object]], repeat: int, min_time: float) -> dict:
    """Best mean seconds per call of each function over `repeat` rounds; a round runs every
    function in turn for at least `min_time` seconds, so a burst of load on the machine hits
    all contenders alike instead of one of them."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm up
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls[name])
    return best


def to_nchw(x: np.ndarray) -> np.ndarray:
    """[W, C] or [H, W, C] -> [1, C, H, W] (1-D as H = 1), what onnxruntime's 2-D conv takes."""
    x3 = x[None] if x.ndim == 2 else x
    return np.ascontiguousarray(np.moveaxis(x3, -1, 0)[None])


def to_oihw(w: np.ndarray) -> np.ndarray:
    w4 = w[:, None] if w.ndim == 3 else w
    return np.ascontiguousarray(np.moveaxis(w4, -1, 1))


def ort_session(op: str, case: dict, act: np.dtype) -> tuple[ort.InferenceSession, np.ndarray]:
    """One-node model of `op` on the case's weights; returns the session and its NCHW input."""
    w = to_oihw(case["w"])
    x = to_nchw(case["x"])
    if act == np.uint8:
        x = (x.astype(np.int16) + 128).astype(np.uint8)
    elem = TensorProto.INT8 if act == np.int8 else TensorProto.UINT8
    ph, pw = (0 if case["x"].ndim == 2 else case["pads"]), case["pads"]  # 1-D: H = 1, no H pads
    attrs = dict(group=case["groups"], pads=[ph, pw, ph, pw], kernel_shape=list(w.shape[2:]))
    inits = [numpy_helper.from_array(w, "w")]
    if op == "ConvInteger":
        inputs, out_elem = ["x", "w"], TensorProto.INT32
    else:
        zero = np.zeros((), act)
        inits += [
            numpy_helper.from_array(np.float32(2.0**-7), "xs"),
            numpy_helper.from_array(zero, "xz"),
            numpy_helper.from_array(np.float32(2.0**-7), "ws"),
            numpy_helper.from_array(np.int8(0), "wz"),
            numpy_helper.from_array(np.float32(2.0 ** (SHIFT - 14)), "ys"),
            numpy_helper.from_array(zero, "yz"),
        ]
        inputs, out_elem = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], elem
    node = helper.make_node(op, inputs, ["y"], **attrs)
    out_hw = (x.shape[2] + 2 * ph - w.shape[2] + 1, x.shape[3] + 2 * pw - w.shape[3] + 1)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info("x", elem, x.shape)],
        [helper.make_tensor_value_info("y", out_elem, [1, w.shape[0], *out_hw])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, x


def run_case(case: dict, repeat: int, min_time: float) -> dict:
    x, w, groups, pads, macs = case["x"], case["w"], case["groups"], case["pads"], case["macs"]
    args = dict(groups=groups, pads=pads, shift=SHIFT, rounding="half_up")
    ours = kernels.conv(x, w, **args)
    exact = bool(np.array_equal(ours, reference.conv(x, w, **args)))

    fns: dict[str, Callable[[], object]] = {
        "ours": lambda: kernels.conv(x, w, **args),
        "numpy": lambda: reference.conv(x, w, **args),
    }
    same_sums = None
    for op, act, label in [
        ("ConvInteger", np.int8, "ort_convinteger_s8"),
        ("QLinearConv", np.int8, "ort_qlinearconv_s8"),
        ("QLinearConv", np.uint8, "ort_qlinearconv_u8"),
    ]:
        sess, feed = ort_session(op, case, act)
        y = sess.run(None, {"x": feed})[0]
        if op == "ConvInteger":  # the int32 sums, requantized by the oracle, must equal ours
            sums = np.moveaxis(y[0], 0, -1)
            sums = sums[0] if x.ndim == 2 else sums
            requant = reference.saturate(reference.round_shift(sums, SHIFT, "half_up"), np.int8)
            same_sums = bool(np.array_equal(requant, ours))
        fns[label] = lambda s=sess, f=feed: s.run(None, {"x": f})
    times = best_times(fns, repeat, min_time)

    ort_s8 = min(times["ort_convinteger_s8"], times["ort_qlinearconv_s8"])
    result = {
        "macs": macs,
        "seconds": times,
        "gmac_per_s": {k: macs / v / 1e9 for k, v in times.items()},
        "speedup_vs_numpy": times["numpy"] / times["ours"],
        "time_vs_ort_s8": times["ours"] / ort_s8,
        "time_vs_ort_u8": times["ours"] / times["ort_qlinearconv_u8"],
        "bit_exact_vs_reference": exact,
        "same_sums_as_convinteger": same_sums,
    }
    result["goals_met"] = {
        f">= {GOAL_VS_NUMPY:g}x numpy": result["speedup_vs_numpy"] >= GOAL_VS_NUMPY,
        f"<= {GOAL_VS_ORT:g}x onnxruntime s8 time": result["time_vs_ort_s8"] <= GOAL_VS_ORT,
    }
    return result


def headline(results: dict) -> dict:
    """The issue's goals with the measured figures, per shape: times faster than the NumPy
    reference, and our time over onnxruntime's faster s8 kernel's (below 1: faster)."""
    h: dict = {"goal": f">= {GOAL_VS_NUMPY:g}x the NumPy reference; <= {GOAL_VS_ORT:g}x "
                       "onnxruntime's s8 time", "threads": 1}
    for name, r in results.items():
        h[name] = (f"{r['speedup_vs_numpy']:.1f}x numpy, {r['time_vs_ort_s8']:.2f}x ort s8 "
                   f"time, {r['gmac_per_s']['ours']:.1f} GMAC/s")
    h["goal_met"] = all(all(r["goals_met"].values()) for r in results.values())
    return h


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/kernels.json"))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--min-time", type=float, default=0.05)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    results = {}
    for case in shapes(rng):
        print(f"running {case['name']} ...", file=sys.stderr, flush=True)
        results[case["name"]] = run_case(case, args.repeat, args.min_time)

    cols = ["ours", "numpy", "ort_convinteger_s8", "ort_qlinearconv_s8", "ort_qlinearconv_u8"]
    head = (
        ["case"] + [f"{c} us (GMAC/s)" for c in cols] + ["x numpy", "/ ort s8", "/ ort u8", "exact"]
    )
    rows = []
    for name, r in results.items():
        cells = [f"{r['seconds'][c] * 1e6:.0f} ({r['gmac_per_s'][c]:.2f})" for c in cols]
        rows.append(
            [name, *cells, f"{r['speedup_vs_numpy']:.1f}", f"{r['time_vs_ort_s8']:.2f}",
             f"{r['time_vs_ort_u8']:.2f}",
             "yes" if r["bit_exact_vs_reference"] and r["same_sums_as_convinteger"] else "NO"]
        )  # fmt: skip
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(
        f"goals: ours >= {GOAL_VS_NUMPY:g}x numpy; ours <= {GOAL_VS_ORT:g}x the time of "
        "onnxruntime's faster s8 kernel (u8 QLinearConv for context only)"
    )
    for name, r in results.items():
        missed = [goal for goal, ok in r["goals_met"].items() if not ok]
        print(f"  {name}: {'all met' if not missed else 'missed: ' + '; '.join(missed)}")

    report = {
        "benchmark": "kernels",
        "headline": headline(results),
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": ort.__version__,
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "settings": {
            "repeat": args.repeat,
            "min_time_s": args.min_time,
            "threads": 1,
            "shift": SHIFT,
        },
        "goals": {
            "speedup_vs_numpy_at_least": GOAL_VS_NUMPY,
            "time_vs_ort_s8_at_most": GOAL_VS_ORT,
        },
        "cases": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    ok = all(
        r["bit_exact_vs_reference"] and r["same_sums_as_convinteger"] for r in results.values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

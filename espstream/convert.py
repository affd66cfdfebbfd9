"""`convert`: every stage in one process, each result verified, and one summary at the end.

`convert_model(model, data=... | random=N, chunk=..., target=..., bits=...)` calls the stage
functions in this order (none of them is re-implemented here):

1. `optimize_model` (with its onnxruntime equivalence check);
2. with `chunk`: `streamify_model` on the optimized float model: a chunk size or a graph that
   cannot stream is refused here, before any calibration work, and the float streaming model is
   what check 2 below runs;
3. `calibrate_model` on the data (`read_calibration_data` / `random_data`);
4. with `chunk`: `streamify_model` on the QDQ model (what the shell pipeline streams);
5. `export_model` of the QDQ model (streaming or not), with test values from the first sample of
   the data (one chunk for a streaming model), or from `test_data`, or none.

Then the checks, each recorded with its verdict (`ConvertResult.checks`):

1. optimize: the optimized model computes what the input computes (within rtol 1e-4 and an
   atol that follows the outputs' magnitude and the depth of float accumulation,
   `optimize.check.output_tolerance`, times `check_tolerance`).
2. float, with `chunk`: the float streaming model chunk by chunk == the offline float model
   (`verify_models`, engine float) on the first `verify_samples` samples of the data.
3. fake-quant, with `chunk`: the QDQ streaming model == the QDQ offline model in onnxruntime
   (engine fakequant: within one quantization step).
4. int8, with `chunk`: the QDQ streaming model == the QDQ offline model, both lowered and run by
   the integer simulator (engine int8: exactly).
5. int8 vs fake-quant: per output, the SQNR of the int8 simulator against float must be at least
   the fake-quant model's SQNR against float minus `INT8_MARGIN_DB` (3 dB: twice the error
   power); SQNRs above `SQNR_CAP_DB` count as that cap. The simulator rounds as the chip does
   (half up on esp32s3 and c), onnxruntime half to even, so on those targets the two differ by a
   few LSBs (measured on the bundled models: 0.7 dB at most); a lowering bug costs far more. The
   share of identical values and the largest difference in LSBs are reported beside it.
6. .espdl: the written bytes read back (`espstream.espdl.read`) and, with test values, the
   embedded test inputs run through the simulator reproduce the embedded test outputs, as
   `Model::test()` does on the chip.

The checks share work without changing what they compare (`verify.VerifyCache`): each offline
model is analysed once (streamify's analysis, which verify would repeat), each engine runs each
offline model once per sample (checks 2-4 and the SQNR and agreement of check 5 run the same
models on the same samples), and the simulator runs the graph export lowered instead of
lowering the same model again.

`convert_model` raises `UserError` for anything the user can fix (bad data, bad chunk, an
unsupported graph) and never writes a file; a failed check does not raise: `ConvertResult.ok`
is false and `failure()` says which check failed. The CLI prints the summary, writes the JSON
report, and then writes the `.espdl` only when every check passed (otherwise exit 1 and no file,
so that a Makefile target cannot ship a model that failed its verification).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.random  # noqa: F401  (see below)
import onnx

# convert runs every stage, so it imports up front what they import on first use (NumPy's
# random module, the simulator's kernels, lower's sliding-window step): a call then spends its
# time on the work. The CLI imports this module for the convert command only.
import espstream.kernels  # noqa: F401
import espstream.stream.manual  # noqa: F401
from espstream import log, verify_int8
from espstream import verify as v
from espstream.errors import CheckFailed, UserError
from espstream.export import ExportResult, export_model
from espstream.optimize import OptimizeResult, optimize_model
from espstream.quant import (
    DEFAULT_METHOD,
    CalibrateResult,
    CalibrationData,
    calibrate_model,
    model_inputs,
    random_data,
    read_calibration_data,
)
from espstream.stream.streamify import StreamifyResult, streamify_model

INT8_MARGIN_DB = 3.0
SQNR_CAP_DB = 60.0
FIRST_SAMPLE = "first"  # test_data default: the first sample of the calibration data


@dataclass
class Check:
    """One verification: its verdict, a one-line detail and the stage's own JSON report."""

    name: str
    ok: bool
    detail: str
    report: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, **self.report}


@dataclass
class ConvertResult:
    data: bytes  # the .espdl bytes (also when a check failed; the CLI then does not write them)
    options: dict[str, Any]
    optimized: OptimizeResult
    calibrated: CalibrateResult
    streamed: StreamifyResult | None  # the QDQ streaming model (None without chunk)
    exported: ExportResult
    checks: list[Check] = field(default_factory=list)
    sqnr: dict[str, dict[str, float]] = field(default_factory=dict)  # output -> dB
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds, in run order
    notes: list[str] = field(default_factory=list)
    offline: ExportResult | None = None  # offline_too: the offline .espdl (espstream.offline_pair)
    pair: dict[str, Any] | None = None  # offline_pair.report of the two files

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failure(self) -> str:
        """One line naming the failed checks (empty when every check passed)."""
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.ok)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise CheckFailed(self.failure())

    @property
    def parameters(self) -> tuple[int, int]:
        """(values, bytes) of every initializer in the .espdl (weights, biases, tables)."""
        inits = self.exported.graph.initializers.values()
        return sum(int(t.data.size) for t in inits), sum(int(t.data.nbytes) for t in inits)

    @property
    def state_bytes(self) -> int:
        """Bytes the runtime keeps between calls (every StreamingCache), 0 offline."""
        return int(self.exported.report.get("cache_bytes", 0))

    def outputs(self) -> dict[str, dict[str, Any]]:
        """Per output: delay (frames), kind, SQNR of fake-quant and int8 against float."""
        out: dict[str, dict[str, Any]] = {}
        for name, s in self.sqnr.items():
            row: dict[str, Any] = {"kind": "offline", "delay": None, "warmup": None}
            if self.streamed is not None:
                o = self.streamed.outputs.get(name, {})
                row = {"kind": o.get("kind"), "delay": o.get("delay"),
                       "warmup": o.get("warmup")}
            row["sqnr_fakequant_db"] = _finite(s["fakequant"])
            row["sqnr_int8_db"] = _finite(s["int8"])
            out[name] = row
        return out

    def to_json(self) -> dict[str, Any]:
        count, nbytes = self.parameters
        return {
            "stage": "convert",
            "ok": self.ok,
            "failure": self.failure() or None,
            "options": self.options,
            "outputs": self.outputs(),
            "state_bytes": self.state_bytes,
            "parameters": {"count": count, "bytes": nbytes},
            "file_bytes": len(self.data),
            "checks": [c.to_json() for c in self.checks],
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "total_seconds": round(sum(self.seconds.values()), 4),
            "notes": self.notes,
            "offline_file_bytes": len(self.offline.data) if self.offline else None,
            "offline_pair": self.pair,
            "stages": {
                "optimize": self.optimized.to_json(),
                "calibrate": self.calibrated.to_json(),
                "streamify": self.streamed.to_json() if self.streamed else None,
                "export": self.exported.to_json(),
            },
        }


def _finite(x: float) -> float | None:
    return round(float(x), 3) if math.isfinite(x) else None


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - got)^2); +inf when equal."""
    s = SqnrSums()
    s.add(ref, got)
    return s.db()


class SqnrSums:
    """`sqnr_db` over several samples, one at a time: the float64 sums of ref^2 and of
    (ref - got)^2 are added per sample, so no sample's outputs need to be kept (the result is
    that of the concatenated samples, to the rounding of the sums)."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref = np.asarray(ref, np.float64)
        d = ref - np.asarray(got, np.float64)
        self.signal += float(np.vdot(ref, ref))
        self.noise += float(np.vdot(d, d))

    def db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.signal, 1e-300) / self.noise)


class _Clock:
    """Seconds per stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def _samples(data: CalibrationData, n: int) -> list[dict[str, np.ndarray]]:
    out = []
    for sample in data:
        out.append(sample)
        if len(out) >= n:
            break
    return out


def _stacked(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Samples of batch 1 -> {input: [N, ...]}, the form verify takes."""
    scalar = next((k for k, x in samples[0].items() if np.ndim(x) == 0), None)
    if scalar is not None:
        raise UserError(f"input {scalar!r} is a scalar (rank 0): the streaming checks cut every "
                        "input into chunks along time; convert it without --chunk")
    return {k: np.concatenate([s[k] for s in samples], axis=0) for k in samples[0]}


def _check_random_possible(model: onnx.ModelProto, input_shapes, seed: int,
                           values: dict[str, float] | None = None) -> None:
    """--random needs fixed input dimensions: say so before any stage runs on the model."""
    from espstream.optimize.runner import fix_input_shapes

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    fix_input_shapes(probe, input_shapes or {})
    random_data(model_inputs(probe), 1, seed, values)


def _check_data_readable(model: onnx.ModelProto, input_shapes, data, values) -> None:
    """Calibration data are opened (headers, shapes) before any stage runs on the model."""
    from espstream.optimize.runner import fix_input_shapes

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    fix_input_shapes(probe, input_shapes or {})
    read_calibration_data(os.fspath(data), model_inputs(probe), values=values)


def convert_model(
    model: onnx.ModelProto,
    data: str | os.PathLike[str] | CalibrationData | None = None,
    *,
    random: int | None = None,
    chunk: int | None = None,
    target: str = "esp32p4",
    bits: int = 8,
    method: str | None = None,
    per_channel: bool | None = None,
    seed: int = 0,
    random_values: dict[str, float] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    check_tolerance: float = 1.0,
    axes: dict[str, int] | None = None,
    overrides: Any = None,
    test_data: Any = FIRST_SAMPLE,
    verify_samples: int = 4,
    verbose: bool = False,
    offline_too: bool = False,
    ptq: dict[str, bool] | None = None,
    calibrate_options: dict[str, Any] | None = None,
) -> ConvertResult:
    """Optimize, calibrate, streamify (with `chunk`), export and verify `model` (module doc).

    data: calibration data (a .npy / .npz / folder path, or `CalibrationData` read against the
    optimized model's inputs), or `random` N standard-normal samples (`seed`; `random_values`
    {input: value} for inputs noise cannot stand for).
    test_data: FIRST_SAMPLE (the data's first sample), an array / {input: array} in the ONNX
    layout, or None for no test values.
    calibrate_options: more CalibrateOptions fields (mixed precision: `int16`, `mixed`).
    offline_too: with `chunk`, also export the offline model, its test values the whole first
    sample, checked as ESP-DL's streaming tutorial uses the pair (`espstream.offline_pair`).
    ptq: `CalibrateOptions` fields of `espstream.quant.ptq` to override (equalize, ...).
    """
    if (data is None) == (random is None):
        raise UserError("give calibration data with -d/--data PATH, or --random N (not both)")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise UserError(f"--chunk {chunk}: must be a positive number of frames")
    if verify_samples < 1:
        raise UserError(f"--verify-samples {verify_samples}: give a positive number")
    if offline_too and chunk is None:
        raise UserError("--offline-too writes the offline file beside a streaming one; give "
                        "--chunk N")
    if offline_too and test_data is None:
        raise UserError("--offline-too needs test values (the tutorial's loop splits the "
                        "offline test input into chunks); drop --no-test-values")
    from espstream.quant import scheme

    scheme.get_target(target)
    scheme.check_bits(bits)
    method = method or DEFAULT_METHOD
    _check_offline_float(model)
    if random is not None:
        _check_random_possible(model, input_shapes, seed, random_values)
    elif isinstance(data, str | os.PathLike):
        _check_data_readable(model, input_shapes, data, random_values)
    verify_int8.register()
    clock = _Clock()
    options = {"chunk": chunk, "target": target, "bits": bits, "method": method,
               "per_channel": per_channel, "seed": seed, "verify_samples": verify_samples,
               "data": str(data) if isinstance(data, str | os.PathLike) else
               (data.description if data is not None else f"--random {random}")}

    # -- the stages ---------------------------------------------------------------------------
    opt = clock.run("optimize", lambda: optimize_model(model, input_shapes=input_shapes,
                                                      check_tolerance=check_tolerance,
                                                      input_values=random_values))
    float_stream = None
    # What the checks share (VerifyCache): offline analyses (streamify's, reused by verify),
    # and per engine one runner of each offline model, run once per sample.
    cache = v.VerifyCache()
    if chunk is not None:  # an impossible chunk is refused here, before any line is printed
        float_stream = clock.run("streamify", lambda: streamify_model(
            opt.model, chunk, axes=axes, overrides=overrides))
        cache.add_streamify_analysis(opt.model, float_stream, overrides)
    _progress(clock, "optimize", f"{sum(opt.ops_before.values())} -> "
              f"{sum(opt.ops_after.values())} nodes")
    if verbose:
        from espstream.optimize import print_summary

        print_summary(opt)
    inputs = model_inputs(opt.model)
    if isinstance(data, CalibrationData):
        calib = data
    elif data is not None:
        calib = read_calibration_data(os.fspath(data), inputs, values=random_values)
    else:
        from espstream.quant.data import warn_random

        warn_random()
        calib = random_data(inputs, random, seed, random_values)  # type: ignore[arg-type]
    cal = clock.run("calibrate", lambda: calibrate_model(
        opt.model, calib, target=target, bits=bits, method=method, per_channel=per_channel,
        report_samples=32 if verbose else 0, **(ptq or {}), **(calibrate_options or {})))
    _progress(clock, "calibrate", f"{cal.samples} samples, {target}, int{bits}, {method}")
    if verbose:
        from espstream.quant import print_summary as print_calibrate

        print_calibrate(cal)
    streamed = None
    to_export = cal.model
    if chunk is not None:
        streamed = clock.run("streamify", lambda: streamify_model(
            cal.model, chunk, axes=axes, overrides=overrides))
        cache.add_streamify_analysis(cal.model, streamed, overrides)
        to_export = streamed.model
        _progress(clock, "streamify", f"chunk {chunk}, {len(streamed.caches)} state(s), "
                  f"{streamed.state_bytes_int8} B int8")
        if verbose:
            from espstream.stream.streamify import print_summary as print_streamify

            print_streamify(streamed)
    samples = _samples(calib, verify_samples)
    if isinstance(test_data, str) and test_data == FIRST_SAMPLE:
        test_data = samples[0]
    exported = clock.run("export", lambda: export_model(to_export, target=target,
                                                        test_data=test_data))
    _progress(clock, "export", f"{len(exported.data)} bytes")
    offline = None
    if offline_too:
        offline = clock.run("export", lambda: export_model(cal.model, target=target,
                                                           test_data=test_data))
        _progress(clock, "export", f"offline {len(offline.data)} bytes")
    if verbose:
        from espstream.export import print_summary as print_export

        print_export(exported)
    result = ConvertResult(
        data=exported.data, options=options, optimized=opt, calibrated=cal, streamed=streamed,
        exported=exported, notes=list(cal.notes) + (list(streamed.notes) if streamed else []),
        offline=offline,
    )

    # -- the checks ---------------------------------------------------------------------------
    c = opt.check
    if c is not None:
        result.checks.append(Check(
            "optimize", c.passed,
            f"optimized vs input model: max |err| {c.max_abs:.3g}, {c.ratio:.2g} of the "
            f"tolerance" if c.passed else c.failure(skip_hint=False),
            {"comparison": c.to_json()}))
    stacked = _stacked(samples) if chunk is not None else {}

    def use_exported_graph() -> None:
        """The model export lowered (streaming, or the offline QDQ model without a chunk) runs
        in the simulator on export's graph: lowering it again would give the same graph."""
        r = verify_int8.Int8Runner(
            to_export, "streaming model" if chunk is not None else "calibrated model",
            graph=exported.graph)
        if chunk is None:
            r.keep_outputs()  # offline: each sample simulated once (SQNR and agreement)
        cache.add_runner("int8", to_export, r)

    if chunk is not None:
        assert float_stream is not None and streamed is not None
        runs = [("float", "verify.float", opt.model, float_stream.model),
                ("fakequant", "verify.fakequant", cal.model, streamed.model),
                ("int8", "verify.int8", cal.model, streamed.model)]

        def verify(off: onnx.ModelProto, st: onnx.ModelProto, engine: str) -> Any:
            if engine == "int8":
                use_exported_graph()
            return v.verify_models(off, st, data=stacked, engine=engine, seed=seed,
                                   overrides=overrides, cache=cache)

        for engine, stage, off, st in runs:
            r = clock.run(stage, lambda off=off, st=st, engine=engine: verify(off, st, engine))
            if not any(not o.skipped for o in r.outputs):
                raise _not_comparable(r)
            result.checks.append(_verify_check(engine, r))
            if verbose:
                v.print_result(r)
    else:
        clock.run("verify.sqnr", use_exported_graph)
    sq = clock.run("verify.sqnr", lambda: _sqnr_check(opt.model, cal.model, samples, cache))
    result.sqnr, check = sq
    result.checks.append(check)
    result.checks.append(clock.run("verify.espdl", lambda: _espdl_check(exported.data)))
    if offline is not None:
        from espstream import offline_pair

        result.checks.append(clock.run("verify.espdl", lambda: _espdl_check(offline.data)))
        result.checks[-1].name = "offline " + result.checks[-1].name
        result.pair = offline_pair.report(offline.graph, exported.graph)
        result.checks.append(Check("offline pair", result.pair["ok"],
                                   f"{result.pair['exponents']}; {result.pair['split']}",
                                   {"pair": result.pair}))
    _progress(clock, "verify", "ok" if result.ok else "FAILED",
              stages=[k for k in clock.seconds if k.startswith("verify")])
    result.seconds = dict(clock.seconds)
    return result


def _progress(clock: _Clock, stage: str, what: str, stages: list[str] | None = None) -> None:
    secs = sum(clock.seconds.get(s, 0.0) for s in (stages or [stage]))
    log.info(f"convert: {stage}: {what} ({secs:.2f} s)")


def _check_offline_float(model: onnx.ModelProto) -> None:
    """convert starts from the float offline model: refuse a QDQ or a streaming one up front."""
    meta = {p.key for p in model.metadata_props}
    if "espstream.chunk" in meta:
        raise UserError("the input model is already a streaming model (espstream.chunk); "
                        "convert takes the offline float model")
    q = next((n for n in model.graph.node
              if n.op_type in ("QuantizeLinear", "DequantizeLinear")), None)
    if q is not None or "espstream.bits" in meta:
        what = f"node {q.name or q.op_type!r} is a {q.op_type}" if q else "espstream.bits"
        raise UserError(f"the input model is already quantized ({what}); convert takes the "
                        "float model")


def _not_comparable(r: Any) -> UserError:
    """No output of the streaming model could be compared with offline on this data."""
    reasons = "; ".join(f"output {o.name!r}: {o.skipped}" for o in r.outputs)
    hint = ""
    if r.frames % r.chunk:
        fits = [c for c in range(1, r.frames + 1) if r.frames % c == 0]
        hint = (f"; choose a chunk that divides the data's {r.frames} frames "
                f"({', '.join(map(str, fits))})")
    return UserError(f"--chunk {r.chunk}: the streaming model cannot be checked against the "
                     f"offline model on this data ({reasons}){hint}")


def _verify_check(engine: str, r: Any) -> Check:
    label = {"float": "float", "fakequant": "fake-quant", "int8": "int8 (lower + simulator)"}
    name = f"{label[engine]}: streaming == offline"
    if not r.ok:
        return Check(name, False, r.failure(), {"verify": r.to_json()})
    parts = []
    for o in r.outputs:
        if o.skipped:
            parts.append(f"{o.name} not compared ({o.skipped})")
        else:
            where = o.frames if o.kind == "summary" else f"frames {o.frames}"
            parts.append(f"{o.name} max |err| {o.max_abs:.3g} ({where})")
    detail = f"{r.samples} sequence(s) of {r.frames} frames, chunk {r.chunk}: " + ", ".join(parts)
    return Check(name, True, detail, {"verify": r.to_json()})


def _sqnr_check(
    float_model: onnx.ModelProto, qdq: onnx.ModelProto, samples: list[dict[str, np.ndarray]],
    cache: v.VerifyCache | None = None,
) -> tuple[dict[str, dict[str, float]], Check]:
    """SQNR of fake-quant and of int8 against float, offline, and their agreement (check 5).

    cache: the runners of the streaming checks (same models, same samples), else new ones."""
    from espstream.verify_int8 import AgreementSums

    cache = cache or v.VerifyCache()
    runners = {"float": cache.runner(v.FloatEngine(), float_model, "optimized model"),
               "fakequant": cache.runner(v.FakeQuantEngine(), qdq, "calibrated model"),
               "int8": cache.runner(verify_int8.Int8Engine(), qdq, "calibrated model")}
    sim = runners["int8"]
    if sim.graph.streaming:
        raise UserError("int8 vs fake-quant agreement is measured on the offline model")
    # One sample at a time, its outputs dropped after adding them to the sums: memory stays
    # that of one sample (and the runners' kept outputs, within verify.KEEP_BYTES).
    sums: dict[str, dict[str, SqnrSums]] = {}
    agreement = AgreementSums(sim)
    for s in samples:
        ref = runners["float"].run(s)
        fq = runners["fakequant"].run(s)
        i8 = sim.run(s)
        ints = sim.run_int(s)  # the same simulation: kept by run (verify.OutputMemo)
        for name, r in ref.items():
            acc = sums.setdefault(name, {"fakequant": SqnrSums(), "int8": SqnrSums()})
            acc["fakequant"].add(r, fq[name])
            acc["int8"].add(r, i8[name])
        agreement.add(fq, ints)
        del ref, fq, ints, i8
    sqnr: dict[str, dict[str, float]] = {}
    bad = []
    for name, acc in sums.items():
        fq_db, i8_db = acc["fakequant"].db(), acc["int8"].db()
        sqnr[name] = {"fakequant": fq_db, "int8": i8_db}
        if min(i8_db, SQNR_CAP_DB) < min(fq_db, SQNR_CAP_DB) - INT8_MARGIN_DB:
            bad.append(f"output {name!r}: int8 {i8_db:.1f} dB vs fake-quant {fq_db:.1f} dB "
                       f"against float (allowed {INT8_MARGIN_DB:g} dB less)")
    agree = agreement.result()
    lsb = ", ".join(f"{c.name} {100 * c.identical_share:.1f}% identical, max {c.max_lsb} LSB"
                    for c in agree.checks)
    name = "int8 vs fake-quant"
    report = {"sqnr_db": {k: {e: _finite(x) for e, x in d.items()} for k, d in sqnr.items()},
              "margin_db": INT8_MARGIN_DB, "agreement": agree.to_json()}
    if bad:
        from espstream.ops.recurrent import saturation_note

        why = saturation_note(qdq)  # ESP-DL's own gate arithmetic, which fake-quant lacks
        return sqnr, Check(name, False, "; ".join(bad) + f" ({lsb})" + (f"; {why}" if why else ""),
                           report)
    return sqnr, Check(name, True, f"{len(samples)} sample(s): {lsb}", report)


def _espdl_check(data: bytes) -> Check:
    """The written bytes read back; their test values reproduce in the simulator (check 6)."""
    from espstream import espdl
    from espstream.verify_int8 import check_test_values

    name = ".espdl test values"
    graph = espdl.read(data)
    if not graph.test_inputs:
        return Check(".espdl read back", True, f"{len(graph.nodes)} nodes, no test values")
    checks = check_test_values(graph)
    report = {"outputs": [c.to_json() for c in checks]}
    if not all(c.ok for c in checks):
        return Check(name, False, "; ".join(c.describe() for c in checks if not c.ok), report)
    detail = ", ".join(f"{c.name} {c.size} values identical" if c.max_lsb == 0 else
                       f"{c.name} within {c.max_lsb} LSB" for c in checks)
    return Check(name, True, f"Model::test() reproduces: {detail}", report)


# ---- the summary --------------------------------------------------------------------------


def print_summary(result: ConvertResult, output: str | None = None) -> None:
    """The stderr summary: outputs (delay, SQNR), checks, memory, parameters, size, time."""
    from espstream.report import table

    o = result.options
    mode = f"chunk {o['chunk']}" if o["chunk"] else "offline"
    log.info(f"convert summary: {o['target']}, int{o['bits']}, {mode}, calibration {o['data']}")
    rows = []
    for name, r in result.outputs().items():
        if r["kind"] == "offline":
            delay = "-"
        elif r["kind"] == "summary":
            delay = f"{r['delay']} (window)"
        else:
            delay = str(r["delay"])
            if r["warmup"]:
                delay += f" (first {r['warmup']} may differ)"
        rows.append([name, delay, _db(r["sqnr_fakequant_db"]), _db(r["sqnr_int8_db"])])
    log.info(table(["output", "delay (frames)", "SQNR fake-quant dB", "SQNR int8 dB"], rows))
    log.info(table(["check", "result", "detail"],
                   [[c.name, "ok" if c.ok else "FAILED", c.detail] for c in result.checks]))
    count, nbytes = result.parameters
    states = len(result.streamed.caches) if result.streamed else 0
    g = result.exported.graph
    rec = json.loads(g.metadata.get("espstream.recurrent_states", "[]"))
    if rec:  # GRU / LSTM states are model inputs / outputs, held by the application
        app = sum(g.value_info(r["input"]).dtype.itemsize
                  * int(np.prod(g.value_info(r["input"]).shape)) for r in rec)
        log.info(f"state memory: {result.state_bytes} bytes in StreamingCaches, {app} bytes of "
                 f"{len(rec)} recurrent state(s) the application copies back each call "
                 f"({states} state(s) in all)")
    else:
        log.info(f"state memory: {result.state_bytes} bytes ({states} cache(s))")
    log.info(f"parameters:   {count} values, {nbytes} bytes")
    where = f" -> {output}" if output else ""
    log.info(f"file size:    {len(result.data)} bytes{where}")
    if result.offline is not None:
        log.info(f"offline file: {len(result.offline.data)} bytes"
                 + (f" -> {offline_path(output)}" if output and output != "stdout" else ""))
    if result.streamed is not None:
        from espstream.offline_pair import delay_notes

        for n in delay_notes(result.exported.graph):
            log.info(n)
    log.info(f"time:         {time_line(result.seconds)}")
    for n in result.notes:
        log.warn(n)


def offline_path(output: str) -> str:
    """Where `--offline-too` writes the offline file: m.espdl -> m.offline.espdl."""
    from pathlib import Path

    p = Path(output)
    stem = p.name[: -len(".espdl")] if p.name.endswith(".espdl") else p.name
    return str(p.with_name(stem + ".offline.espdl"))


def time_line(seconds: dict[str, float]) -> str:
    """'1.23 s: optimize 0.10, ..., verify 0.50 (float 0.01, ...)' from per-stage seconds."""
    stages: dict[str, float] = {}
    parts: dict[str, list[str]] = {}
    for k, secs in seconds.items():
        stage, _, part = k.partition(".")
        stages[stage] = stages.get(stage, 0.0) + secs
        if part:
            parts.setdefault(stage, []).append(f"{part} {secs:.2f}")
    text = ", ".join(
        f"{k} {v:.2f}" + (f" ({', '.join(parts[k])})" if k in parts else "")
        for k, v in stages.items()
    )
    return f"{sum(seconds.values()):.2f} s: {text}"


def _db(x: float | None) -> str:
    return "inf" if x is None else f"{x:.1f}"

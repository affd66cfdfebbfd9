"""The `calibrate` stage: float ONNX + calibration data -> QDQ ("fake-quant") ONNX for ESP-DL.

The output runs as it is in onnxruntime and carries every exponent ESP-DL needs. `lower` and the
integer simulator read it by this contract:

1. Exponent e means scale 2^e (a float32 initializer holding exactly 2^e); symmetric, zero point 0
   of the integer type. `--bits 8`: int8 [-128, 127]; `--bits 16`: int16 [-32768, 32767].
2. Activations: every float tensor ESP-DL holds as an integer is produced as
   `X_float -> QuantizeLinear(scale 2^e, zp 0) -> X_quantized -> DequantizeLinear -> X`; the
   dequantized tensor keeps the original name X, so consumers and graph outputs are unchanged.
   A graph input x is the exception (its name is fixed): its consumers read `x_dequantized`.
   `CalibrateResult.qdq_names` maps each float tensor to the name of its fake-quant value.
3. Which tensors get which exponent (`espstream.quant.plan`): graph inputs, gemm layers, SiLU,
   Add / Sub / Concat, elementwise and pooling operators get their own exponent from the
   observer (`--method`), except that a tensor whose only use is one Add / Sub / Concat
   (and is no graph output) takes that node's output exponent, so it needs no requantization.
   Outputs of Reshape, Transpose, Flatten, Slice, Squeeze, Unsqueeze,
   MaxPool, Pad, Split (and Identity, GlobalMaxPool) pass through Q/DQ with exactly their input's
   exponent. A Relu / Clip right after Conv / ConvTranspose / Gemm / MatMul (the gemm output's
   only consumer) is fused: no Q/DQ between them, the Relu / Clip output carries the exponent.
   `Mul(x, Sigmoid(x))` is SiLU (ESP-DL's Swish table): no Q/DQ on the Sigmoid output, the Mul
   output carries the exponent. Sigmoid, Tanh, HardSigmoid, HardSwish, LeakyRelu, PRelu (and
   Relu / Clip not after a gemm) get their own exponent. Softmax's output stays float.
4. Weights of Conv / ConvTranspose / Gemm / MatMul: an int8 (int16) initializer `W_quantized`
   behind `DequantizeLinear` with scale `W_scale` and zero point `W_zero_point`; per output
   channel (scale and zero point 1-D, `axis` = the output-channel axis: 0 for Conv, 1 for
   ConvTranspose, 0 / 1 for Gemm with transB 1 / 0, the last for MatMul) by default on esp32p4,
   per tensor (scalars, no `axis`) on esp32s3 and c; `--per-channel / --per-tensor` override.
   Weight exponents minimise the squared rounding-and-clipping error of the weights (per
   channel; `weight_method="mse"`, the default) or cover max |w| (`"minmax"`). Offline constants
   round half to even. Gemm's alpha and beta are folded into W and C (both then 1).
5. Bias: an int32 initializer `B_quantized` behind `DequantizeLinear` (1-D scale with axis 0
   when the weights are per channel). 8-bit: the value is round(b / 2^(e_in + e_w)), saturated
   to 20 bits on esp32s3 (32 bits elsewhere), with scale 2^(e_in + e_w); e_in is the exponent of
   the gemm's input. 16-bit: ESP-DL's bias is int64 (40 bits on esp32s3 / esp32p4), but ONNX's
   DequantizeLinear takes no int64 (and a float bias, or Cast(int64) * scale, is re-quantized
   by onnxruntime's own bias-quantization transformer to int32 with saturation, which breaks
   the fake-quant model). So the stored int32 is the int64 bias shifted right by the smallest
   k >= 0 that fits int32, with scale 2^(e_in + e_w + k); the lowering reads
   k = log2(scale) - e_in - e_w and shifts left by k. k is 0 whenever the bias fits int32.
6. Add / Sub / Concat: an input whose exponent differs from the output's goes through an extra
   Q/DQ pair at the output's exponent (`X_requant_2^e`), an explicit requantization; a constant
   input is stored as an integer initializer at the output's exponent directly. A constant input
   of Mul / PRelu / MatMul-of-activations gets its own per-tensor minmax exponent.
7. Opset: 8-bit models keep their opset (raised to 13 if older, for per-axis DequantizeLinear);
   16-bit models are converted to opset 21 with `onnx.version_converter` and IR version 10,
   because int16 QuantizeLinear / DequantizeLinear exist in the default domain only from opset
   21 (the com.microsoft variants would run in onnxruntime, but onnx.checker cannot check them).
8. `metadata_props`: `espstream.target`, `espstream.bits` ("8" / "16"), `espstream.rounding`
   ("half_even" on esp32p4, "half_up" otherwise), `espstream.method`, `espstream.per_channel`
   ("true" / "false"), `espstream.weight_method`, and `espstream.percentile` for that method;
   `espstream.ptq` lists the rule-10 techniques applied (absent when none is).
9. onnxruntime's QuantizeLinear rounds half to even. That is esp32p4's rounding; for the half-up
   targets an exact tie rounds differently in the fake-quant model than on the chip, which the
   integer simulator measures.
10. Beyond exponents (`espstream.quant.ptq`): `equalize` (cross-layer equalization of the
   float model before planning), `bias_correction`, `adaround` (weight rounding from the
   layer inputs' moments) and `exponent_search` (+-1 on free activation exponents against
   the output error). They change initializer values and exponents only. Defaults
   (`PTQ_DEFAULTS`): int8 equalize and bias correction on, AdaRound and the search off;
   int16 all off. A field set to True / False overrides its default.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper, version_converter

from espstream import log
from espstream.errors import UserError, first_line
from espstream.quant import scheme
from espstream.quant.data import CalibrationData
from espstream.quant.engine import observe
from espstream.quant.observers import METHODS, HistogramObserver, weight_exponents
from espstream.quant.plan import (
    FLOAT,
    OWN,
    SHARE,
    Plan,
    check_float_model,
    constants_to_initializers,
    make_plan,
    name_nodes,
)

DEFAULT_METHOD = "mse"
DEFAULT_PERCENTILE = 99.99
PTQ_NAMES = ("equalize", "bias_correction", "adaround", "exponent_search")
#: rule 10's defaults by bit width, chosen on the development half of the evaluation zoo
#: (benchmarks/zoo.py, benchmarks/results/zoo_quality.json, int8 on esp32p4 and esp32s3):
#: equalization + bias correction gained a median +0.7 dB there at almost no cost; AdaRound
#: added ~0.1-0.2 dB more but costs seconds per layer on large models (K x K moments, 800
#: steps), so it is asked for; the search gained nothing. 16-bit models were not measured.
PTQ_DEFAULTS: dict[int, dict[str, bool]] = {
    8: {"equalize": True, "bias_correction": True, "adaround": False, "exponent_search": False},
}


@dataclass
class CalibrateOptions:
    target: str = "esp32p4"
    bits: int = 8
    method: str = DEFAULT_METHOD
    percentile: float = DEFAULT_PERCENTILE
    per_channel: bool | None = None  # None: the target's default
    batch: int = 64
    bins: int = 4096
    weight_method: str = "mse"
    report_samples: int = 32  # 0: no report
    int16: tuple[str, ...] = ()  # mixed precision: nodes in int16 (espstream.quant.mixed)
    mixed: Any = None  # mixed.AutoBudget-like (mode, max_macs, target_sqnr) for --mixed auto
    # espstream.quant.ptq (rule 10); None: PTQ_DEFAULTS for the bit width
    equalize: bool | None = None
    bias_correction: bool | None = None
    adaround: bool | None = None
    exponent_search: bool | None = None

    def ptq_applied(self) -> list[str]:
        """The rule-10 techniques asked for (or on by default), in the order they run."""
        dflt = PTQ_DEFAULTS.get(self.bits, {})
        return [k for k in PTQ_NAMES
                if (getattr(self, k) if getattr(self, k) is not None else dflt.get(k, False))]

    def with_ptq_resolved(self) -> CalibrateOptions:
        """A copy whose rule-10 fields are all True / False (defaults filled in)."""
        on = set(self.ptq_applied())
        return dataclasses.replace(self, **{k: k in on for k in PTQ_NAMES})

    def validate(self) -> scheme.Target:
        t = scheme.get_target(self.target)
        scheme.check_bits(self.bits)
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise UserError(f"--percentile {self.percentile}: give a value in (0, 100]")
        if self.batch < 1:
            raise UserError(f"--batch {self.batch}: give a positive number")
        if self.weight_method not in ("minmax", "mse"):
            raise UserError(f"weight method {self.weight_method!r}: choose minmax or mse")
        return t


@dataclass
class CalibrateResult:
    model: onnx.ModelProto
    float_model: onnx.ModelProto  # the input, with node names and Constants as initializers
    plan: Plan
    options: CalibrateOptions
    exponents: dict[str, int]  # every quantized activation, by float tensor name
    weight_exponents: dict[str, list[int]]  # by gemm node name
    bias_exponents: dict[str, list[int]]  # by gemm node name
    bias_clipped: dict[str, int]  # gemm node -> number of saturated bias values
    bias_shift: dict[str, int]  # gemm node -> k of rule 5 (16-bit int64 bias stored as int32)
    requantized: list[dict[str, Any]]  # the explicit Q/DQ requantizations
    observers: dict[str, HistogramObserver]
    qdq_names: dict[str, str]
    samples: int
    batched: bool
    seconds: float
    report: Any = None  # espstream.quant.qreport.QuantReport
    notes: list[str] = field(default_factory=list)
    stream: Any = None  # espstream.quant.stream_calib.StreamSpec for a streaming model
    chunks: int = 0  # chunks run (streaming model)
    ptq: list[str] = field(default_factory=list)  # rule-10 techniques applied
    precision: Any = None  # espstream.quant.mixed.Precision of a mixed model
    mixed: Any = None  # espstream.quant.mixed.MixedChoice of --mixed auto

    def bits_of(self, t: str) -> int:
        return self.precision.of_tensor(t) if self.precision else self.options.bits

    def to_json(self) -> dict[str, Any]:
        o = self.options
        tensors = []
        for layer in self.plan.layers:
            t = layer.output
            obs = self.observers[t]
            tensors.append({
                "tensor": t,
                "layer": layer.name,
                "op": layer.op,
                "exponent": self.exponents[t],
                "min": obs.min if obs.count else None,
                "max": obs.max if obs.count else None,
                "clipped": obs.clipped_fraction(self.exponents[t], o.bits),
            })
        shared = {t: {"exponent": self.exponents[t], "from": self.plan.root(t)}
                  for t in self.plan.share_root}
        out: dict[str, Any] = {
            "stage": "calibrate",
            "target": o.target,
            "bits": o.bits,
            "method": o.method,
            "percentile": o.percentile if o.method == "percentile" else None,
            "per_channel": self.per_channel,
            "weight_method": o.weight_method,
            "ptq": self.ptq,
            "notes": self.notes,
            "samples": self.samples,
            "batched": self.batched,
            "seconds": round(self.seconds, 3),
            "tensors": tensors,
            "shared": shared,
            "weights": {k: {"exponents": v, "bias_exponents": self.bias_exponents.get(k),
                            "bias_clipped": self.bias_clipped.get(k, 0),
                            "bias_shift": self.bias_shift.get(k, 0)}
                        for k, v in self.weight_exponents.items()},
            "requantized": self.requantized,
        }
        if self.stream is not None:
            out["streaming"] = {**self.stream.to_json(), "chunks_run": self.chunks,
                                "tied_states": [list(p) for p in self.plan.ties]}
        if self.report is not None:
            out.update(self.report.to_json())
        return out

    @property
    def per_channel(self) -> bool:
        o = self.options
        return scheme.get_target(o.target).per_channel if o.per_channel is None else o.per_channel


def prepare_float_model(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """A copy ready for planning: checked float, Constants as initializers, named nodes, opset."""
    m = copy.deepcopy(model)
    check_float_model(m)
    constants_to_initializers(m)
    name_nodes(m)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    want = 21 if bits == 16 else 13
    if opset < want:
        try:
            m = version_converter.convert_version(m, want)
        except Exception as e:  # the converter raises bare RuntimeErrors
            raise UserError(
                f"cannot convert the model from opset {opset} to {want} (needed for "
                f"{'int16 QuantizeLinear' if bits == 16 else 'per-channel DequantizeLinear'}): "
                f"{first_line(e)}; re-export the model with opset {want}"
            ) from None
        m.ir_version = max(m.ir_version, 10 if want >= 21 else 7)
        constants_to_initializers(m)
        name_nodes(m)
    return m


def choose_exponents(plan: Plan, observers: dict[str, HistogramObserver],
                     opts: CalibrateOptions, delta: dict[str, int] | None = None,
                     precision: Any = None) -> dict[str, int]:
    """`delta`: steps added to layer outputs' exponents (the exponent search's trials);
    `precision`: the bits of each tensor in a mixed model."""
    bits = precision.of_tensor if precision else (lambda t: opts.bits)
    exps: dict[str, int] = {}
    for layer in plan.layers:
        exps[layer.output] = observers[layer.output].exponent(opts.method, bits(layer.output),
                                                              opts.percentile)
        if delta:
            exps[layer.output] += delta.get(layer.output, 0)
    for c, (lo, hi) in plan.const_ranges.items():  # plan rule 9: a cached constant (mask)
        exps[c] = scheme.exponent_for_range(lo, hi, opts.bits)
    # Rule 5 of the plan: last node first, so that a chain of Adds settles from the end.
    for out, inputs in reversed(plan.adopt):
        for i in inputs:
            if bits(i) == bits(out):  # mixed rule 5
                exps[i] = exps[out]
    for t in plan.share_root:
        exps[t] = exps[plan.root(t)]
    if plan.ties:  # plan rule 10: hand-written state pairs
        from espstream.quant.stream_calib import tie_exponents

        tie_exponents(plan, observers, exps, opts)
    return exps


def calibrate_model(
    model: onnx.ModelProto, data: CalibrationData, options: CalibrateOptions | None = None,
    stream: Any = None, **kwargs: Any,
) -> CalibrateResult:
    """Calibrate `model` on `data`; keyword arguments override fields of `options`.

    `stream` (a `espstream.quant.stream_calib.StreamSpec`) marks a streaming model: `data`
    then holds whole sequences, run chunk by chunk with the states fed back (see that module).
    """
    opts = dataclasses.replace(options or CalibrateOptions(), **kwargs)
    target = opts.validate()
    opts = opts.with_ptq_resolved()
    t0 = time.perf_counter()
    mixed_wanted = bool(opts.int16) or opts.mixed is not None
    if mixed_wanted and opts.bits != 8:
        raise UserError("--int16 / --mixed take an int8 model (--bits 8): they choose which "
                        "layers go to int16")
    fm = prepare_float_model(model, 16 if mixed_wanted else opts.bits)
    notes: list[str] = []
    if opts.equalize and stream is None:  # ptq rule 4
        from espstream.quant.equalize import equalize_model

        fm, pairs = equalize_model(fm)
        notes.append(f"cross-layer equalization: {pairs} layer pair(s)")
    plan = make_plan(fm)
    chunks = 0
    if stream is not None:
        from espstream.quant.stream_calib import observe_stream

        plan.ties = stream.manual_pairs(fm)
        observers, batched, chunks = observe_stream(fm, plan.observed(), data, stream,
                                                    opts.batch, opts.bins)
    else:
        observers, batched = observe(fm, plan.observed(), data, opts.batch, opts.bins)
    if plan.recurrent:  # GRU / LSTM: gate exponents from the data (espstream.ops.recurrent)
        from espstream.ops.recurrent import choose_gate_exponents

        choose_gate_exponents(fm, plan, data, stream, opts.bits)
    precision = choice = None
    if mixed_wanted:
        from espstream.quant import mixed

        names = list(opts.int16)
        if opts.mixed is not None:
            if stream is not None:
                raise UserError("--mixed auto: calibrate the offline model (streamify after)")
            choice = mixed.choose_auto(fm, plan, observers, opts, data, *opts.mixed)
            names = sorted({*names, *(n for la in plan.layers if la.name in choice.layers16
                                      for n in la.nodes[-1:])})
        precision = mixed.from_options(plan, fm, names)
    from espstream.quant import ptq  # rule 10

    exps = choose_exponents(plan, observers, opts, precision=precision)
    adjust = ptq.weight_adjuster(fm, plan, data, exps, target, opts, stream, notes, precision,
                                 observers)

    def build(e: dict[str, int]) -> tuple[onnx.ModelProto, dict[str, int], _Rewriter]:
        return build_qdq(fm, plan, observers, opts, precision, stream, adjust, e)

    def trial(d: dict[str, int]) -> dict[str, int]:
        return choose_exponents(plan, observers, opts, d, precision)

    exps = ptq.search_exponents(fm, plan, data, exps, opts, stream, notes,
                                lambda d: build(trial(d))[0], trial)
    qm, exps, rw = build(exps)
    applied = opts.ptq_applied() if stream is None else []  # ptq rule 4
    result = CalibrateResult(
        model=qm, float_model=fm, plan=plan, options=opts, exponents=exps,
        weight_exponents=rw.weight_exps, bias_exponents=rw.bias_exps,
        bias_clipped=rw.bias_clipped, bias_shift=rw.bias_shift, requantized=rw.requantized,
        observers=observers,
        qdq_names=rw.qdq_names, samples=len(data), batched=batched,
        seconds=time.perf_counter() - t0, stream=stream, chunks=chunks, notes=notes,
        ptq=applied, precision=precision, mixed=choice,
    )
    clipped = {k: v for k, v in rw.bias_clipped.items() if v}
    if clipped:
        note = (f"{sum(clipped.values())} bias values saturated to "
                f"{target.bias_bits(opts.bits)} bits ({target.name}) in "
                + ", ".join(sorted(clipped)))
        result.notes.append(note)
        log.warn(note)
    if opts.report_samples > 0 and stream is not None:
        from espstream.quant.stream_calib import build_stream_report

        result.report = build_stream_report(result, data, stream, opts.report_samples)
    elif opts.report_samples > 0:
        from espstream.quant.qreport import build_report

        result.report = build_report(result, data, opts.report_samples)
    result.seconds = time.perf_counter() - t0
    return result


def build_qdq(fm: onnx.ModelProto, plan: Plan, observers: dict[str, HistogramObserver],
              opts: CalibrateOptions, precision: Any = None, stream: Any = None,
              adjust: Any = None, exps: dict[str, int] | None = None,
              ) -> tuple[onnx.ModelProto, dict[str, int], _Rewriter]:
    """Exponents (unless given), the QDQ rewrite and its metadata, from observers already
    collected; `adjust`: the PTQ weight adjuster (rule 10), applied to layers at `opts.bits`."""
    target = scheme.get_target(opts.target)
    if exps is None:
        exps = choose_exponents(plan, observers, opts, precision=precision)
    per_channel = target.per_channel if opts.per_channel is None else opts.per_channel
    rw = _Rewriter(fm, plan, exps, target, opts.bits, per_channel, opts.weight_method, adjust)
    if precision is not None:
        rw.precision, rw.observers, rw.opts = precision, observers, opts
    qm = rw.run()
    meta = {
        "espstream.target": target.name,
        "espstream.bits": str(opts.bits),
        "espstream.rounding": target.rounding,
        "espstream.method": opts.method,
        "espstream.per_channel": "true" if per_channel else "false",
        "espstream.weight_method": opts.weight_method,
    }
    if opts.method == "percentile":
        meta["espstream.percentile"] = repr(float(opts.percentile))
    applied = opts.ptq_applied() if stream is None else []  # ptq rule 4
    if applied:  # rule 10
        meta["espstream.ptq"] = ",".join(applied)
    if plan.recurrent:
        import json

        from espstream.ops.recurrent import gate_exponent, saturated_gates

        meta["espstream.gate_exponents"] = json.dumps(
            {k: gate_exponent(v, precision.of_node(k) if precision else opts.bits)
             for k, v in plan.recurrent.items()}, sort_keys=True)
        saturated = saturated_gates(plan.recurrent)
        if saturated:  # read by ops/recurrent.py saturation_note
            meta["espstream.gate_saturation"] = json.dumps(saturated, sort_keys=True)
    if stream is not None and stream.source == "options":
        meta.update(stream.metadata())  # the hand-written model's streaming facts
    if precision is not None:
        from espstream.quant.mixed import metadata

        meta.update(metadata(precision))
    set_metadata(qm, meta)
    onnx.checker.check_model(qm)
    return qm, exps, rw


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)


class _Names:
    def __init__(self, used: set[str]) -> None:
        self.used = set(used)

    def new(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


class _Rewriter:
    """Builds the QDQ graph from the float graph, the plan and the exponents (module rules)."""

    def __init__(self, fm: onnx.ModelProto, plan: Plan, exps: dict[str, int],
                 target: scheme.Target, bits: int, per_channel: bool, weight_method: str,
                 adjust: Any = None) -> None:
        self.fm, self.plan, self.exps = fm, plan, exps
        self.adjust = adjust  # espstream.quant.ptq.WeightAdjuster, or None
        self.target, self.bits, self.per_channel = target, bits, per_channel
        self.weight_method = weight_method
        self.inits = {t.name: t for t in fm.graph.initializer}
        self.onnx_nodes = {n.name: n for n in fm.graph.node}
        self.qdt = scheme.int_dtype(bits)
        self.weight_exps: dict[str, list[int]] = {}
        self.bias_exps: dict[str, list[int]] = {}
        self.bias_clipped: dict[str, int] = {}
        self.bias_shift: dict[str, int] = {}
        self.requantized: list[dict[str, Any]] = []
        self.qdq_names: dict[str, str] = {}
        self.precision: Any = None  # espstream.quant.mixed.Precision (mixed models)
        self.observers: dict[str, HistogramObserver] = {}
        self.opts: Any = None

    # ---- helpers ------------------------------------------------------------------------
    def _scale(self, e: int) -> gs.Constant:
        if e not in self.scales:
            name = self.names.new(f"scale_2^{e}")
            self.scales[e] = gs.Constant(name, np.array(scheme.scale_of(e), np.float32))
        return self.scales[e]

    def tbits(self, t: str) -> int:
        return self.precision.of_tensor(t) if self.precision else self.bits

    def nbits(self, n: str) -> int:
        return self.precision.of_node(n) if self.precision else self.bits

    def in_exp(self, node: str, t: str) -> int:
        """The exponent node `node` reads tensor `t` at (mixed rule 4 across precisions)."""
        b = self.nbits(node)
        if self.tbits(t) == b:
            return self.exps[t]
        from espstream.quant.mixed import reader_exponent

        return reader_exponent(self.exps, self.observers, self.plan, t, b, self.opts)

    def _zp(self, bits: int) -> gs.Constant:
        if bits == self.bits:
            return self.zp
        if bits not in self.zps:
            self.zps[bits] = gs.Constant(self.names.new(f"zero_point_int{bits}"),
                                         np.array(0, scheme.int_dtype(bits)))
        return self.zps[bits]

    def _qdq(self, src: gs.Variable, e: int, base: str, out: gs.Variable | None = None,
             bits: int | None = None) -> gs.Variable:
        bits = bits or self.bits
        q = gs.Variable(self.names.new(f"{base}_quantized"), dtype=scheme.int_dtype(bits))
        out = out or gs.Variable(self.names.new(f"{base}_dequantized"), dtype=np.float32)
        s = self._scale(e)
        zp = self._zp(bits)
        self.graph.nodes.append(gs.Node("QuantizeLinear", self.names.new(f"{base}_QuantizeLinear"),
                                        inputs=[src, s, zp], outputs=[q]))
        self.graph.nodes.append(gs.Node("DequantizeLinear",
                                        self.names.new(f"{base}_DequantizeLinear"),
                                        inputs=[q, s, zp], outputs=[out]))
        return out

    def _int_const(self, base: str, q: np.ndarray, exps: np.ndarray, axis: int | None
                   ) -> gs.Variable:
        """An integer initializer behind DequantizeLinear (per-axis when `axis` is set)."""
        qc = gs.Constant(self.names.new(f"{base}_quantized"), q)
        zp_dtype = q.dtype
        if axis is None:
            scale = self._scale(int(exps.reshape(-1)[0]))
            zp = gs.Constant(self.names.new(f"{base}_zero_point"), np.array(0, zp_dtype))
            attrs = {}
        else:
            scale = gs.Constant(self.names.new(f"{base}_scale"),
                                np.ldexp(np.ones(len(exps)), exps).astype(np.float32))
            zp = gs.Constant(self.names.new(f"{base}_zero_point"), np.zeros(len(exps), zp_dtype))
            attrs = {"axis": int(axis)}
        out = gs.Variable(self.names.new(f"{base}_dequantized"), dtype=np.float32)
        self.graph.nodes.append(gs.Node("DequantizeLinear",
                                        self.names.new(f"{base}_DequantizeLinear"), attrs=attrs,
                                        inputs=[qc, scale, zp], outputs=[out]))
        return out

    # ---- the rewrite --------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        self.graph = gs.import_onnx(self.fm)
        tensors = self.graph.tensors()
        self.names = _Names(set(tensors) | {n.name for n in self.graph.nodes})
        self.scales: dict[int, gs.Constant] = {}
        self.zp = gs.Constant(self.names.new(f"zero_point_int{self.bits}"), np.array(0, self.qdt))
        self.zps: dict[int, gs.Constant] = {}
        nodes = {n.name: n for n in self.graph.nodes}
        self._weights(nodes)
        if self.plan.recurrent:
            from espstream.ops.recurrent import quantize_recurrent

            quantize_recurrent(self, nodes)
        self._activations(tensors)
        if self.precision is not None:
            self._boundaries(nodes)
        self._requant_and_constants(nodes)
        self.graph.cleanup().toposort()
        m = gs.export_onnx(self.graph)
        m.ir_version = self.fm.ir_version
        m.producer_name = "espstream"
        del m.metadata_props[:]
        m.metadata_props.extend(self.fm.metadata_props)
        return m

    def _weights(self, nodes: dict[str, gs.Node]) -> None:
        cache: dict[tuple, gs.Variable] = {}
        for name, info in self.plan.gemms.items():
            node, onode = nodes[name], self.onnx_nodes[name]
            from espstream.ops._linear import gemm_weight_bias

            w, b, cout = gemm_weight_bias(onode, self.inits)
            axis = info.channel_axis if self.per_channel else None
            bits = self.nbits(name)
            w_e = weight_exponents(w, axis, bits, self.weight_method)
            self.weight_exps[name] = w_e.tolist()
            alpha = 1.0
            if onode.op_type == "Gemm":
                alpha = float(node.attrs.get("alpha", 1.0))
                node.attrs["alpha"] = 1.0
                node.attrs["beta"] = 1.0
            adjust = self.adjust if bits == self.bits else None  # ptq: int8 layers only
            key = (info.weight, axis, alpha, bits, name if adjust else "")
            if adjust is not None:  # ptq: rounding chosen on data, bias corrected
                wq, b = adjust(name, w, b, w_e, axis)
            if key not in cache:
                if adjust is None:
                    wq = scheme.quantize(w, w_e if axis is not None else int(w_e[0]), bits,
                                         "half_even", axis)
                cache[key] = self._int_const(info.weight, wq, w_e, axis)
            node.inputs[1] = cache[key]
            if b is None:
                continue
            e_in = self.in_exp(name, info.input)
            per_ch = w_e if axis is not None else np.full(1, w_e[0])
            b_e = e_in + per_ch
            self.bias_exps[name] = b_e.tolist()
            lo, hi = scheme.bias_range(self.target, bits)
            b64 = b.astype(np.float64)
            raw = np.rint(np.ldexp(b64, -np.broadcast_to(b_e, b.shape)))
            self.bias_clipped[name] = int(np.sum((raw < lo) | (raw > hi)))
            # Rule 5: the stored int32 is the int64 bias shifted right by k >= 0 bits, the
            # smallest k that fits int32 (always 0 for 8-bit models, whose range is 32 bits).
            k = 0
            i32 = np.iinfo(np.int32)
            while np.abs(np.clip(raw, lo, hi)).max(initial=0) / 2.0**k > i32.max:
                k += 1
            if k:
                raw = np.rint(np.ldexp(b64, -np.broadcast_to(b_e + k, b.shape)))
            bq = np.clip(raw, lo >> k, hi >> k).astype(np.int32)
            self.bias_shift[name] = k
            base = info.bias or f"{name}_bias"
            node.inputs[2] = self._int_const(base, bq, b_e + k, 0 if axis is not None else None)

    def _activations(self, tensors: dict[str, gs.Tensor]) -> None:
        inputs = set(self.plan.inputs)
        for t in self.plan.quantized():
            var = tensors[t]
            e = self.exps[t]
            b = self.tbits(t)
            if t in inputs:
                consumers = list(var.outputs)
                dq = self._qdq(var, e, t, bits=b)
                for c in consumers:
                    for k, inp in enumerate(c.inputs):
                        if inp is var:
                            c.inputs[k] = dq
                self.qdq_names[t] = dq.name
            else:
                producer = var.inputs[0]
                raw = gs.Variable(self.names.new(f"{t}_float"), dtype=np.float32, shape=var.shape)
                k = next(i for i, o in enumerate(producer.outputs) if o is var)
                producer.outputs[k] = raw
                self._qdq(raw, e, t, out=var, bits=b)
                self.qdq_names[t] = t

    def _boundaries(self, nodes: dict[str, gs.Node]) -> None:
        """Mixed rule 4: a layer node reading an activation of the other precision reads it
        through a Q/DQ pair of its own precision (Add / Sub / Concat: `_requant_and_constants`)."""
        requant = set(self.plan.requant_nodes)
        cache: dict[tuple[str, int], gs.Variable] = {}
        for layer in self.plan.layers:
            for name in layer.nodes:
                if name in requant:
                    continue
                node, onode = nodes[name], self.onnx_nodes[name]
                b = self.nbits(name)
                for k, inp in enumerate(onode.input):
                    if self.plan.state.get(inp) not in (OWN, SHARE) or self.tbits(inp) == b:
                        continue
                    e = self.in_exp(name, inp)
                    if (inp, b) not in cache:
                        cache[(inp, b)] = self._qdq(node.inputs[k], e, f"{inp}_int{b}", bits=b)
                    node.inputs[k] = cache[(inp, b)]
                    self.requantized.append({"node": name, "input": inp, "from": self.exps[inp],
                                             "to": e, "bits": [self.tbits(inp), b]})

    def _requant_and_constants(self, nodes: dict[str, gs.Node]) -> None:
        cache: dict[tuple[str, int], gs.Variable] = {}
        for name in self.plan.requant_nodes:
            node, onode = nodes[name], self.onnx_nodes[name]
            e_out = self.exps[onode.output[0]]
            b_out = self.tbits(onode.output[0])
            for k, inp in enumerate(onode.input):
                if inp not in self.plan.state:
                    continue
                if self.plan.state[inp] == FLOAT:  # make_plan refuses this; keep it loud
                    raise AssertionError(f"float input {inp} of {name}")
                e_in = self.exps[inp]
                if e_in == e_out and self.tbits(inp) == b_out:
                    continue
                if (inp, e_out, b_out) not in cache:
                    cache[(inp, e_out, b_out)] = self._qdq(node.inputs[k], e_out,
                                                           f"{inp}_requant_2^{e_out}", bits=b_out)
                node.inputs[k] = cache[(inp, e_out, b_out)]
                self.requantized.append({"node": name, "input": inp, "from": e_in, "to": e_out})
        for name, k, mode in self.plan.const_inputs:
            node, onode = nodes[name], self.onnx_nodes[name]
            c = numpy_helper.to_array(self.inits[onode.input[k]]).astype(np.float64)
            cb = self.nbits(name)
            if mode == "output":
                e = self.exps[onode.output[0]]
            else:
                e = scheme.exponent_for_range(min(float(c.min()), 0.0), max(float(c.max()), 0.0),
                                              cb)
            q = np.asarray(scheme.quantize(c, e, cb, "half_even"))  # 0-d stays an array
            node.inputs[k] = self._int_const(onode.input[k], q, np.array([e]), None)


def print_summary(result: CalibrateResult) -> None:
    """What a user reads on stderr: the setting, the per-layer table, the outputs' SQNR."""
    o = result.options
    how = "batched runs" if result.batched else "one sample per run"
    log.info(
        f"calibrate: {result.samples} samples, {how}, {result.seconds:.2f} s; target {o.target}, "
        f"int{o.bits}, method {o.method}"
        + (f" {o.percentile}" if o.method == "percentile" else "")
        + f", weights {'per channel' if result.per_channel else 'per tensor'}"
    )
    if result.stream is not None:
        st = result.stream
        tied = f"; {len(result.plan.ties)} hand-written state pair(s), exponents tied" if (
            result.plan.ties) else ""
        log.info(f"  streaming model ({st.source}): {result.chunks} chunks of {st.chunk} "
                 f"frames, {len(st.states)} state(s) fed back{tied}")
    if result.requantized:
        log.info(f"  {len(result.requantized)} explicit requantizations (Add/Sub/Concat inputs)")
    for note in result.notes:
        if "saturated" not in note:  # that one was a warning already
            log.info(f"  {note}")
    if result.report is not None:
        log.info(f"per-layer SQNR on {result.report.samples} samples, worst local first:")
        log.info(result.report.table())

"""Mixed precision: some layers in int16, the rest in int8, with ESP-DL's boundaries.

What ESP-DL 3.3 does (read in its sources and in ESP-PPQ 1.3.12's exporter; pinned by the
ESP-PPQ exports in tests/data/mixed-ppq/): every operator runs in one precision (`quant_type`
S8 / S16: int16 activations *and* int16 weights, int64 bias); where a tensor crosses from one
precision to the other the exporter inserts a `RequantizeLinear` node whose output has the
reader's type (ESP-PPQ's `InsertRequantNodePattern`, `quant_type` = the output's), and the
runtime converts with `TensorBase::assign`: saturate(round(q * 2^(e_in - e_out))) into the
output type (a pure saturation or widening at equal exponents).

Rules (`--int16 NODE[,NODE...]`, `Precision`):
1. A name is an ONNX node of the float model; it selects the plan layer holding it (a Conv
   with its fused Relu is one layer). An unknown name is one error listing the closest names;
   naming a data-movement node (its exponent is its input's) or a graph input is an error too.
2. A selected layer computes in int16: its output is an int16 activation with its own exponent
   chosen by the method at 16 bits, its weights are int16 and its bias int64 (calibrate's rule
   5); every other layer is int8, as `--bits 8`. A GRU / LSTM is ESP-DL's S16 module: X, W, R,
   Y / Y_h (and initial_h) int16, its bias int16 at the gate exponent as at 8 bits, and the
   gate exponent the one `--bits 16` would give it (recurrent.gate_exponent: what the data
   needs, not finer than GATE_EXP_MIN[16]); its X crosses precisions by rule 4 like any
   layer's input.
3. A tensor that shares its input's exponent (data movement, StreamingCache) has that input's
   precision. A graph input is int16 when one of its readers is an int16 layer, else int8.
4. A layer reading an activation of the other precision reads it through one more Q/DQ pair
   of its own precision (the `RequantizeLinear` of ESP-DL): int8 -> int16 at e_int8 - 8
   (lossless: every int8 value times 2^8 fits int16, as ESP-PPQ's exports show), int16 -> int8
   at the exponent the method gives the tensor at 8 bits. Add / Sub / Concat already requantize
   their inputs to the output's exponent: that pair takes the output's precision.
5. An input of Add / Sub / Concat adopts the output's exponent (plan rule 5) only when both
   have one precision.
6. The model is written at opset 21 (int16 QuantizeLinear) as soon as one layer is int16;
   `espstream.bits` stays "8" and `espstream.int16` lists the int16 layers (JSON).

Automatic choice (`--mixed auto`, `choose_auto`):
7. Candidates: every layer with an exponent of its own but graph inputs (gemm layers, GRU /
   LSTM, Add / Concat, activations, pools). Two sensitivities per candidate, each an output
   SQNR (worst output) on the calibration data against float, the observers collected once and
   each case a fresh QDQ model from the same histograms: the gain when only that layer is int16
   (reported), and the loss when only that layer returns to int8 from all-int16 (used for the
   order, because a lone int16 layer between int8 ones gains little: its output is requantized
   to int8 by its next reader). A model with a GRU / LSTM is measured in the integer
   simulator instead (its fake-quant model computes the gates in float where ESP-DL reads
   tables at the gate exponent, and may promise 30 dB more than the chip computes).
8. Order: by loss per MAC, smallest first (a layer without MACs counts as 1 MAC, and comes after
   every layer with MACs: returning it to int8 saves no MAC budget).
9. `--max-int16-macs PCT`: start from all-int16 and return layers to int8 in that order until
   the int16 share of MACs is at most PCT (PCT 0: none left in int16). The set is then measured.
10. `--target-sqnr DB`: a set *holds* when its measured SQNR on the calibration data reaches
   DB + TARGET_MARGIN_DB (2 dB). If all-int16 does not hold, all candidates stay int16 (the
   result says whether DB itself was reached); otherwise one pass over the order returns each
   layer to int8 when the set without it still holds (a measured set each time, never a sum of
   per-layer figures). The margin, chosen on the zoo's development half
   (benchmarks/mixed_precision.py --sweep), covers what the calibration data does not show:
   there, tcn_res_a's choice without it reached 40.9 dB on its 32 calibration samples and 39.7
   on held-out ones, all lost on one held-out sample (25 dB; the other 63: 41.8) that drives a
   residual sum 31% beyond its calibration range; splits of the calibration data (every
   quarter must hold; or 2- / 4-fold cross-validation, observers from the other parts)
   measured no gap and chose the same set.
   Both remain as `Evaluator.guarded`'s options, off by default.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from espstream.errors import UserError
from espstream.quant import scheme

GEMM_KINDS = ("gemm",)


@dataclass
class Precision:
    """Bits per layer (by plan layer name), per quantized tensor and per gemm node."""

    int16_layers: list[str]
    tensor: dict[str, int] = field(default_factory=dict)
    node: dict[str, int] = field(default_factory=dict)
    default: int = 8

    def of_tensor(self, t: str) -> int:
        return self.tensor.get(t, self.default)

    def of_node(self, n: str) -> int:
        return self.node.get(n, self.default)

    @property
    def any16(self) -> bool:
        return bool(self.int16_layers)


def parse_names(text: str | None) -> list[str]:
    """`--int16 a,b,c` -> ["a", "b", "c"]; empty entries are an error."""
    if text is None:
        return []
    names = [s.strip() for s in text.split(",")]
    if not names or any(not s for s in names):
        raise UserError(f"--int16 {text!r}: give node names separated by commas")
    return names


def resolve_layers(plan: Any, model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Rule 1: node names -> plan layer names (in plan order)."""
    node_layer = {n: layer.name for layer in plan.layers for n in layer.nodes}
    kind = {layer.name: layer.kind for layer in plan.layers}
    all_nodes = [n.name for n in model.graph.node]
    ops = {n.name: n.op_type for n in model.graph.node}
    chosen: set[str] = set()
    unknown = [n for n in names if n not in ops]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, all_nodes, n=3, cutoff=0.4)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(map(repr, close))}?)"
                                     if close else ""))
        raise UserError(f"--int16: no node named {', '.join(hints)} in the model")
    for n in names:
        if n not in node_layer:
            raise UserError(f"--int16: node {n!r} ({ops[n]}) has no exponent of its own (data "
                            "movement shares its input's, and so its precision); name the layer "
                            "that produces its input")
        chosen.add(node_layer[n])
    for layer in chosen:
        if kind[layer] == "input":
            raise UserError(f"--int16: {layer!r} is a graph input; it follows its readers")
    return [layer.name for layer in plan.layers if layer.name in chosen]


def make_precision(plan: Any, model: onnx.ModelProto, layers16: list[str]) -> Precision:
    """Rules 2 and 3: bits of every quantized tensor and of every node of a layer."""
    p = Precision(list(layers16))
    bits_of_layer = {layer.name: (16 if layer.name in layers16 else 8) for layer in plan.layers}
    readers: dict[str, list[str]] = {}
    node_layer = {n: layer.name for layer in plan.layers for n in layer.nodes}
    for n in model.graph.node:
        for i in n.input:
            if i in plan.inputs and n.name in node_layer:
                readers.setdefault(i, []).append(node_layer[n.name])
    for layer in plan.layers:
        if layer.kind == "input":
            b = 16 if any(bits_of_layer[r] == 16 for r in readers.get(layer.output, [])) else 8
        else:
            b = bits_of_layer[layer.name]
        p.tensor[layer.output] = b
        for n in layer.nodes:
            p.node[n] = b
    for t in plan.share_root:
        p.tensor[t] = p.tensor.get(plan.root(t), 8)
    return p


def from_options(plan: Any, model: onnx.ModelProto, names: list[str]) -> Precision | None:
    if not names:
        return None
    return make_precision(plan, model, resolve_layers(plan, model, names))


def reader_exponent(exps: dict[str, int], observers: dict, plan: Any, t: str, bits: int,
                    opts: Any) -> int:
    """Rule 4: the exponent of tensor `t` as read by a layer of `bits` precision."""
    e = exps[t]
    if bits == 16:
        return e - 8
    obs = observers.get(plan.root(t))
    if obs is None or not obs.count:
        return e + 8
    return obs.exponent(opts.method, 8, opts.percentile)


def metadata(p: Precision) -> dict[str, str]:
    return {"espstream.int16": json.dumps(p.int16_layers)}


# ---- cost -----------------------------------------------------------------------------------


def layer_macs(model: onnx.ModelProto, plan: Any) -> dict[str, int]:
    """MACs of every gemm layer on one sample (output elements x weights per output), and of
    every GRU / LSTM (steps x directions x gates x hidden x (input + hidden))."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else 1
                for d in v.type.tensor_type.shape.dim]
        shapes[v.name] = dims
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    out: dict[str, int] = {}
    for layer in plan.layers:
        total = 0
        for name in layer.nodes:
            n = nodes[name]
            if name in plan.recurrent:  # per step and direction: G*H x (input + hidden)
                x, r = shapes.get(n.input[0]), inits.get(n.input[2])
                if x is not None and r is not None and len(x) == 3:
                    dirs, gh, hidden = list(r.dims)
                    total += x[0] * x[1] * dirs * gh * (x[2] + hidden)
                continue
            if name not in plan.gemms:
                continue
            w = inits.get(n.input[1])
            y = shapes.get(n.output[0])
            if w is None or y is None:
                continue
            wdims = list(w.dims)
            n_out = int(np.prod(y)) if y else 0
            if n.op_type in ("Conv",):
                per = int(np.prod(wdims[1:]))
            elif n.op_type == "ConvTranspose":
                per = int(np.prod(wdims[2:])) * wdims[0] // max(wdims[1], 1)
            else:  # Gemm / MatMul: the reduced dimension
                per = wdims[0] if (n.op_type == "MatMul" or not _attr(n, "transB", 0)) else (
                    wdims[1])
            total += n_out * per
        if total:
            out[layer.name] = total
    return out


def layer_weight_bytes(model: onnx.ModelProto, plan: Any) -> dict[str, tuple[int, int]]:
    """Parameter bytes per gemm / recurrent layer as (int8, int16): a gemm's weights 1 or 2
    bytes and bias 4 or 8 (int32 / int64); a GRU / LSTM's W and R 1 or 2 bytes, its bias int16
    (2 bytes) at either width."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def size(name: str) -> int:
        return int(np.prod(inits[name].dims)) if name and name in inits else 0

    out: dict[str, tuple[int, int]] = {}
    for layer in plan.layers:
        b8 = b16 = 0
        for name in layer.nodes:
            if name in plan.recurrent:
                ins = list(nodes[name].input)
                w = size(ins[1]) + size(ins[2])
                bias = 2 * size(ins[3]) if len(ins) > 3 else 0
                b8, b16 = b8 + w + bias, b16 + 2 * w + bias
                continue
            info = plan.gemms.get(name)
            if info is None:
                continue
            w, bias = size(info.weight), size(info.bias or "")
            b8, b16 = b8 + w + 4 * bias, b16 + 2 * w + 8 * bias
        if b8:
            out[layer.name] = (b8, b16)
    return out


def _attr(n: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in n.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ---- automatic choice -------------------------------------------------------------------------


@dataclass
class MixedChoice:
    """What `choose_auto` decided and measured (rules 7 to 9)."""

    mode: str  # "max-int16-macs" | "target-sqnr"
    budget: float
    layers16: list[str]
    sqnr_int8_db: float
    sqnr_int16_all_db: float
    sqnr_db: float
    gains_db: dict[str, float]
    macs: dict[str, int]
    weights: dict[str, tuple[int, int]]
    reached: bool = True
    evaluations: int = 0
    loss_db: dict[str, float] = field(default_factory=dict)  # rule 7: back to int8 from all-int16
    margin_db: float = 0.0  # rule 10's margin (target-sqnr)

    @property
    def int16_macs(self) -> int:
        return sum(self.macs.get(layer, 0) for layer in self.layers16)

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    def extra_bytes(self) -> int:
        """Parameter bytes added by the int16 layers (`layer_weight_bytes`)."""
        return sum(b16 - b8 for layer, (b8, b16) in self.weights.items()
                   if layer in self.layers16)

    def parameter_bytes(self) -> tuple[int, int]:
        """(bytes of the int16 layers' parameters, of all layers' parameters) as chosen."""
        b16 = sum(w[1] for layer, w in self.weights.items() if layer in self.layers16)
        return b16, b16 + sum(w[0] for layer, w in self.weights.items()
                              if layer not in self.layers16)

    def to_json(self) -> dict[str, Any]:
        share = self.int16_macs / self.total_macs if self.total_macs else 0.0
        return {
            "mode": self.mode, "budget": self.budget, "int16_layers": self.layers16,
            "int16_macs": self.int16_macs, "total_macs": self.total_macs,
            "int16_mac_share": round(share, 4), "extra_parameter_bytes": self.extra_bytes(),
            "int16_parameter_bytes": self.parameter_bytes()[0],
            "parameter_bytes": self.parameter_bytes()[1],
            "int16_byte_share": round(self.parameter_bytes()[0] / self.parameter_bytes()[1], 4)
            if self.parameter_bytes()[1] else 0.0,
            "margin_db": self.margin_db,
            "sqnr_int8_db": _r(self.sqnr_int8_db),
            "sqnr_all_int16_db": _r(self.sqnr_int16_all_db),
            "sqnr_db": _r(self.sqnr_db), "gain_db": _r(self.sqnr_db - self.sqnr_int8_db),
            "reached": self.reached, "evaluations": self.evaluations,
            "sensitivity_db": {k: _r(v) for k, v in self.gains_db.items()},
            "loss_from_all_int16_db": {k: _r(v) for k, v in self.loss_db.items()},
        }

    def summary(self) -> str:
        j = self.to_json()
        how = "--int16" if self.mode == "int16" else f"{self.mode} {self.budget:g}"
        return (f"mixed precision ({how}): {len(self.layers16)} int16 "
                f"layer(s) {', '.join(self.layers16) or '-'}; {100 * j['int16_mac_share']:.1f}% "
                f"of MACs and {100 * j['int16_byte_share']:.1f}% of parameter bytes in int16, "
                f"+{j['extra_parameter_bytes']} parameter bytes; output SQNR "
                f"{_fmt(self.sqnr_db)} dB (all int8 {_fmt(self.sqnr_int8_db)}"
                + (f", all int16 {_fmt(self.sqnr_int16_all_db)}" if not math.isnan(
                    self.sqnr_int16_all_db) else "") + ")"
                + ("" if self.reached else "; target NOT reached"))


def _r(x: float) -> float | None:
    return round(x, 3) if math.isfinite(x) else None


def _fmt(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else str(x)


def calibrate_kwargs(int16: str | None, mixed: str | None, max_macs: float | None,
                     target_sqnr: float | None) -> dict[str, Any]:
    """The CLI's --int16 / --mixed / --max-int16-macs / --target-sqnr as CalibrateOptions
    fields (checked: one line and exit 2 for bad values)."""
    check_budget(mixed, max_macs, target_sqnr)
    out: dict[str, Any] = {}
    if int16 is not None:
        out["int16"] = tuple(parse_names(int16))
    if mixed is not None:
        out["mixed"] = (max_macs, target_sqnr)
    return out


def check_budget(mode: str | None, max_macs: float | None, target_sqnr: float | None) -> None:
    """Bad flag combinations and values (one line each, exit 2)."""
    if mode is None:
        if max_macs is not None or target_sqnr is not None:
            raise UserError("--max-int16-macs / --target-sqnr need --mixed auto")
        return
    if mode != "auto":
        raise UserError(f"--mixed {mode!r}: the only mode is 'auto'")
    if (max_macs is None) == (target_sqnr is None):
        raise UserError("--mixed auto needs exactly one budget: --max-int16-macs PCT or "
                        "--target-sqnr DB")
    if max_macs is not None and not (0.0 <= max_macs <= 100.0 and math.isfinite(max_macs)):
        raise UserError(f"--max-int16-macs {max_macs}: give a percentage in [0, 100]")
    if target_sqnr is not None and not math.isfinite(target_sqnr):
        raise UserError(f"--target-sqnr {target_sqnr}: give a finite number of dB")


class Evaluator:
    """Output SQNR (worst output, dB) of a precision choice on the calibration data (rule 7),
    and the guarded figure `--target-sqnr` is held to (rule 10)."""

    def __init__(self, fm: onnx.ModelProto, plan: Any, observers: dict, opts: Any, data: Any,
                 samples: int) -> None:
        from espstream.quant.engine import Runner

        self.fm, self.plan, self.observers, self.opts = fm, plan, observers, opts
        self.feeds = [s for _, s in zip(range(samples), data, strict=False)]
        outs = [o.name for o in fm.graph.output]
        self.outs = outs
        runner = Runner(fm, outs, batch=1)
        self.ref = [[v.astype(np.float64) for v in vals] for _, vals in runner.run(self.feeds)]
        self.count = 0
        self._sums: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        self._fold_obs: dict[tuple[int, int], dict] = {}
        # rule 7: the fake-quant model computes a GRU / LSTM's gates in float, ESP-DL from
        # tables at the gate exponent (conv_gru_a: 69 dB against 39 in the simulator)
        self.engine = "sim" if plan.recurrent else "fake-quant"

    def sums(self, layers16: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per sample and output, the float output's energy and the error's: [samples, outputs]
        each (one QDQ model built and run per distinct set)."""
        key = frozenset(layers16)
        if key not in self._sums:
            self._sums[key] = self._measure(layers16, self.observers, self.feeds, self.ref)
        return self._sums[key]

    def _measure(self, layers16: list[str], observers: dict, feeds: list, ref: list
                 ) -> tuple[np.ndarray, np.ndarray]:
        from espstream.quant.calibrate import build_qdq

        self.count += 1
        prec = make_precision(self.plan, self.fm, layers16) if layers16 else None
        qm = build_qdq(self.fm, self.plan, observers, self.opts, prec)[0]
        sig = np.zeros((len(ref), len(self.outs)))
        err = np.zeros_like(sig)
        for i, (r_, vals) in enumerate(zip(ref, self._outputs(qm, feeds), strict=True)):
            for k, (r, v) in enumerate(zip(r_, vals, strict=True)):
                v = np.asarray(v, np.float64).reshape(r.shape)
                sig[i, k] = float(np.sum(r * r))
                err[i, k] = float(np.sum((r - v) ** 2))
        return sig, err

    def _outputs(self, qm: onnx.ModelProto, feeds: list) -> Any:
        """Each feed's outputs: the fake-quant model in onnxruntime, or (rule 7, a model with
        a GRU / LSTM) the integer simulator, falling back to onnxruntime when lowering fails."""
        from espstream.quant.engine import Runner

        if self.engine == "sim":
            from espstream.verify_int8 import Int8Runner

            try:
                sim = Int8Runner(qm, "mixed precision candidate")
            except UserError:
                self.engine = "fake-quant"  # not lowered: onnxruntime from now on
            else:
                return ([np.asarray(sim.run(f)[o]) for o in self.outs] for f in feeds)
        return (vals for _, vals in Runner(qm, self.outs, batch=1).run(feeds))

    def sqnr(self, layers16: list[str]) -> float:
        sig, err = self.sums(layers16)
        return _worst(sig, err)

    def guarded(self, layers16: list[str], margin_db: float = 0.0, folds: int = 1,
                cross: int = 0) -> float:
        """Rule 10's figure, less `margin_db`: with `cross` >= 2, the worst over `cross`
        contiguous parts of the samples of the SQNR on that part of the model calibrated on
        the others (cross-validation: exponents chosen without the samples they are judged
        on); else the worst of the SQNRs of `folds` contiguous parts (1: all samples)."""
        if cross >= 2 and len(self.feeds) >= cross:
            return min(_worst(*self._cross(layers16, k, cross)) for k in range(cross)) - margin_db
        sig, err = self.sums(layers16)
        parts = np.array_split(np.arange(len(sig)), max(1, min(folds, len(sig))))
        return min(_worst(sig[p], err[p]) for p in parts) - margin_db

    def _cross(self, layers16: list[str], k: int, cross: int) -> tuple[np.ndarray, np.ndarray]:
        from espstream.quant.engine import observe

        key = (frozenset(layers16), k, cross)
        if key in self._sums:
            return self._sums[key]  # type: ignore[index]
        part = np.array_split(np.arange(len(self.feeds)), cross)[k]
        if (k, cross) not in self._fold_obs:
            rest = [f for i, f in enumerate(self.feeds) if i not in set(part)]
            self._fold_obs[(k, cross)] = observe(self.fm, self.plan.observed(), rest,
                                                 self.opts.batch, self.opts.bins)[0]
        out = self._measure(layers16, self._fold_obs[(k, cross)],
                            [self.feeds[i] for i in part], [self.ref[i] for i in part])
        self._sums[key] = out  # type: ignore[index]
        return out


def _worst(sig: np.ndarray, err: np.ndarray) -> float:
    """The worst output's SQNR of the samples in `sig` / `err` ([samples, outputs])."""
    return min(scheme.sqnr_from_sums(float(s), float(e))
               for s, e in zip(sig.sum(axis=0), err.sum(axis=0), strict=True))


#: rule 10's guard against the calibration data's optimism (the defaults): the set must
#: reach the target by this margin, on each of this many contiguous parts of the samples
TARGET_MARGIN_DB = 2.0
TARGET_FOLDS = 1
TARGET_CROSS = 0


def choose_auto(fm: onnx.ModelProto, plan: Any, observers: dict, opts: Any, data: Any,
                max_macs: float | None = None, target_sqnr: float | None = None,
                samples: int = 32, margin_db: float | None = None,
                folds: int | None = None, cross: int | None = None) -> MixedChoice:
    """Rules 7 to 10 on the calibration data (the first `samples` samples)."""
    margin_db = TARGET_MARGIN_DB if margin_db is None else margin_db
    folds = TARGET_FOLDS if folds is None else folds
    cross = TARGET_CROSS if cross is None else cross
    ev = Evaluator(fm, plan, observers, opts, data, samples)
    macs = layer_macs(fm, plan)
    weights = layer_weight_bytes(fm, plan)
    cands = [layer.name for layer in plan.layers if layer.kind != "input"]
    base = ev.sqnr([])
    every = ev.sqnr(cands) if cands else base
    gains = {c: ev.sqnr([c]) - base for c in cands}
    loss = {c: every - ev.sqnr([d for d in cands if d != c]) for c in cands}

    def key(c: str) -> tuple:
        m = macs.get(c, 0)
        lo = loss[c] if math.isfinite(loss[c]) else math.inf
        return (m == 0, lo / max(m, 1))

    order = sorted(cands, key=key)
    total = sum(macs.values()) or 1
    mode = "max-int16-macs" if max_macs is not None else "target-sqnr"
    budget = float(max_macs if max_macs is not None else target_sqnr)  # type: ignore[arg-type]
    chosen = list(cands)
    reached = True
    sq = every
    if max_macs is not None:
        if max_macs <= 0:
            chosen = []
        else:
            used = sum(macs.get(c, 0) for c in chosen)
            for c in order:
                if 100.0 * used / total <= max_macs + 1e-12:
                    break
                chosen.remove(c)
                used -= macs.get(c, 0)
        sq = ev.sqnr(chosen) if chosen else base
    elif ev.guarded(cands, margin_db, folds, cross) < target_sqnr:  # type: ignore[operator]
        reached = every >= target_sqnr  # type: ignore[operator]
    else:
        for c in order:  # rule 10: one measured pass
            trial = [d for d in chosen if d != c]
            if ev.guarded(trial, margin_db, folds, cross) >= target_sqnr:  # type: ignore[operator]
                chosen, sq = trial, ev.sqnr(trial)
    keep = [layer.name for layer in plan.layers if layer.name in chosen]
    return MixedChoice(mode, budget, keep, base, every, sq, gains, macs, weights, reached,
                       ev.count, loss, margin_db if target_sqnr is not None else 0.0)


def report_of(result: Any, data: Any, samples: int) -> MixedChoice:
    """The calibration report's mixed-precision part: the int16 layers, their MACs and extra
    bytes, and the output SQNR against all-int8 on the report samples (measured, not summed)."""
    if result.mixed is not None:
        return result.mixed
    plan, fm = result.plan, result.float_model
    ev = Evaluator(fm, plan, result.observers, result.options, data, samples)
    layers16 = list(result.precision.int16_layers)
    base, sq = ev.sqnr([]), ev.sqnr(layers16)
    return MixedChoice("int16", 0.0, layers16, base, math.nan, sq, {}, layer_macs(fm, plan),
                       layer_weight_bytes(fm, plan), True, ev.count)


def weight_bytes_of(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)

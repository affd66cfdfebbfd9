"""Per-layer SQNR of the fake-quant model against float: where "accuracy collapsed after int8".

One onnxruntime session runs three things side by side on each report sample:
1. the float model (every tensor renamed `float::NAME`);
2. the QDQ model as written (cumulative error: everything upstream quantized);
3. for each layer, a clone of the layer's quantized nodes fed from the *float* tensors, with
   the layer's own quantization only: its weights and bias, the requantization of its inputs
   for Add / Sub / Concat, and its output Q/DQ (local error: only this layer quantized).
SQNR = 10 log10(sum ref^2 / sum (ref - x)^2) summed over the report samples; +inf (JSON null)
when a tensor is reproduced exactly. Clipping shares come from the calibration histograms.
The sums are computed inside the session (`_with_sums`: Cast to float64, Sub, ReduceSumSquare,
the graph's outputs only these scalars), so a run does not hold every reported tensor of the
sample at once: memory stays flat in sequence length (issue 16, item 4).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream import report as rep
from espstream.quant import scheme
from espstream.quant.data import CalibrationData
from espstream.quant.engine import Runner

FLOAT_PREFIX = "float::"
LOCAL_PREFIX = "local::"


@dataclass
class LayerStat:
    layer: str
    op: str
    tensor: str
    exponent: int
    min: float | None
    max: float | None
    clipped: float
    cumulative_db: float
    local_db: float
    bits: int = 8


@dataclass
class QuantReport:
    layers: list[LayerStat]  # worst local SQNR first
    outputs: dict[str, float]
    samples: int
    mixed: Any = None  # espstream.quant.mixed: the int16 layers and their cost, when mixed

    def to_json(self) -> dict[str, Any]:
        return {
            "report_samples": self.samples,
            "layers": [
                {
                    "layer": s.layer, "op": s.op, "tensor": s.tensor, "exponent": s.exponent,
                    "min": s.min, "max": s.max, "clipped": s.clipped,
                    "sqnr_cumulative_db": _finite(s.cumulative_db),
                    "sqnr_local_db": _finite(s.local_db),
                    "bits": s.bits,
                }
                for s in self.layers
            ],
            "outputs": {k: _finite(v) for k, v in self.outputs.items()},
            **({"mixed_precision": self.mixed.to_json()} if self.mixed is not None else {}),
        }

    def table(self) -> str:
        rows = [
            [s.layer, s.op + (f" (int{s.bits})" if self.mixed is not None and s.bits == 16
                              else ""), s.exponent, f"{100 * s.clipped:.3f}%", _db(s.local_db),
             _db(s.cumulative_db), rep.bar(_clamp(s.local_db), 0.0, 60.0)]
            for s in self.layers
        ]
        text = rep.table(["layer", "op", "exp", "clipped", "local dB", "cumul. dB",
                          "local 0..60 dB"], rows)
        outs = "\n".join(f"output {k}: SQNR {_db(v)} dB" for k, v in self.outputs.items())
        if self.mixed is not None:
            outs += "\n" + self.mixed.summary()
        return text + "\n" + outs


def _finite(x: float) -> float | None:
    return round(x, 3) if math.isfinite(x) else None


def _db(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _clamp(x: float) -> float:
    return 60.0 if x == math.inf else (0.0 if not math.isfinite(x) else x)


def _combined(result: Any) -> tuple[onnx.ModelProto, list[tuple[str, str, str]]]:
    """The side-by-side model and, per reported tensor, (name, fake-quant name, local name)."""
    plan, exps = result.plan, result.exponents
    gq = gs.import_onnx(result.model)
    # a copy: exporting renamed lazily loaded constants renames the source protos in place
    gf = gs.import_onnx(copy.deepcopy(result.float_model))
    qin = {t.name: t for t in gq.inputs}
    for t in gf.tensors().values():
        if t.name not in qin:
            t.name = FLOAT_PREFIX + t.name
    for n in gf.nodes:
        n.name = FLOAT_PREFIX + n.name
        for k, t in enumerate(n.inputs):
            if t.name in qin:
                n.inputs[k] = qin[t.name]
    ftensors = gf.tensors()
    qnodes = {n.name: n for n in gq.nodes}
    new_nodes: list[gs.Node] = []
    bits_of = getattr(result, "bits_of", lambda t: result.options.bits)
    zps = {b: gs.Constant(f"local::zero_point{'' if b == 8 else b}",
                          np.array(0, scheme.int_dtype(b))) for b in (8, 16)}
    count = [0]

    def qdq(src: gs.Variable, e: int, name: str, bits: int) -> gs.Variable:
        zp_dtype, zp = scheme.int_dtype(bits), zps[bits]
        count[0] += 1
        s = gs.Constant(f"local::scale_{count[0]}", np.array(scheme.scale_of(e), np.float32))
        q = gs.Variable(f"local::q_{count[0]}", dtype=zp_dtype)
        out = gs.Variable(name, dtype=np.float32)
        new_nodes.append(gs.Node("QuantizeLinear", f"local::Q_{count[0]}", inputs=[src, s, zp],
                                 outputs=[q]))
        new_nodes.append(gs.Node("DequantizeLinear", f"local::DQ_{count[0]}",
                                 inputs=[q, s, zp], outputs=[out]))
        return out

    def float_of(t: str) -> gs.Tensor:
        return qin[t] if t in qin else ftensors[FLOAT_PREFIX + t]

    reported = []
    onodes = {n.name: n for n in result.float_model.graph.node}
    for layer in plan.layers:
        t = layer.output
        fq = result.qdq_names[t]
        if layer.kind == "input":
            reported.append((t, fq, fq))
            continue
        produced: dict[str, gs.Variable] = {}
        e_out = exps[t]
        for name in layer.nodes:
            qn, on = qnodes[name], onodes[name]
            inputs = []
            for k, src in enumerate(on.input):
                if src in produced:
                    inputs.append(produced[src])
                elif src in plan.state:
                    f = float_of(src)
                    if layer.kind == "requant":
                        f = qdq(f, e_out, f"local::{src}@{name}", bits_of(t))
                    inputs.append(f)
                else:
                    inputs.append(qn.inputs[k] if k < len(qn.inputs) else gs.Variable.empty())
            outs = []
            for o in on.output:
                v = gs.Variable(f"local::{o}_raw", dtype=np.float32)
                produced[o] = v
                outs.append(v)
            new_nodes.append(gs.Node(qn.op, LOCAL_PREFIX + name, attrs=dict(qn.attrs),
                                     inputs=inputs, outputs=outs))
        local = qdq(produced[t], e_out, LOCAL_PREFIX + t, bits_of(t))
        reported.append((t, fq, local.name))
    graph = gs.Graph(nodes=list(gq.nodes) + list(gf.nodes) + new_nodes, inputs=list(gq.inputs),
                     outputs=[], opset=gq.opset)
    tensors = graph.tensors()
    outs: list[str] = []
    for t, fq, local in reported:
        outs += [FLOAT_PREFIX + t if t not in qin else t, fq, local]
    for o in result.model.graph.output:
        outs += [FLOAT_PREFIX + o.name, o.name]
    seen: set[str] = set()
    for name in outs:
        if name not in seen:
            seen.add(name)
            v = tensors[name]
            v.dtype = np.float32
            graph.outputs.append(v)
    m = gs.export_onnx(graph)
    m.ir_version = result.model.ir_version
    if result.model.functions:  # a streaming model's StreamingCache function (plan rule 9)
        have = {o.domain for o in m.opset_import}
        m.opset_import.extend(o for o in result.model.opset_import if o.domain not in have)
        del m.functions[:]
        m.functions.extend(result.model.functions)
    del m.graph.value_info[:]
    return m, reported


def build_report(result: Any, data: CalibrationData, samples: int) -> QuantReport:
    model, reported = _combined(result)
    pairs = []
    for t, fq, local in reported:
        ref = t if t in {i.name for i in model.graph.input} else FLOAT_PREFIX + t
        pairs.append((ref, fq))
        pairs.append((ref, local))
    for o in result.model.graph.output:
        pairs.append((FLOAT_PREFIX + o.name, o.name))
    acc = {p: [0.0, 0.0] for p in pairs}
    model, sums = _with_sums(model, list(acc))
    names = list(dict.fromkeys(sums))
    index = {t: i for i, t in enumerate(names)}
    runner = Runner(model, names, batch=1)
    n = 0
    for _, values in runner.run(_first(data, samples)):
        n += 1
        for k, a in enumerate(acc.values()):
            a[0] += float(values[index[sums[2 * k]]])
            a[1] += float(values[index[sums[2 * k + 1]]])
    bits_of = getattr(result, "bits_of", lambda t: result.options.bits)
    stats = []
    for layer, (t, fq, local) in zip(result.plan.layers, reported, strict=True):
        ref = pairs[2 * len(stats)][0]
        obs = result.observers[t]
        stats.append(LayerStat(
            layer=layer.name, op=layer.op, tensor=t, exponent=result.exponents[t],
            min=obs.min if obs.count else None, max=obs.max if obs.count else None,
            clipped=obs.clipped_fraction(result.exponents[t], bits_of(t)),
            cumulative_db=scheme.sqnr_from_sums(*acc[(ref, fq)]),
            local_db=scheme.sqnr_from_sums(*acc[(ref, local)]),
            bits=bits_of(t),
        ))
    outputs = {o.name: scheme.sqnr_from_sums(*acc[(FLOAT_PREFIX + o.name, o.name)])
               for o in result.model.graph.output}
    stats.sort(key=lambda s: (s.local_db, s.cumulative_db))
    mixed = None
    if getattr(result, "precision", None) is not None:
        from espstream.quant.mixed import report_of

        mixed = report_of(result, data, samples)
    return QuantReport(stats, outputs, n, mixed)


def _with_sums(model: onnx.ModelProto, pairs: list[tuple[str, str]],
               ) -> tuple[onnx.ModelProto, list[str]]:
    """`model` whose outputs are, per (ref, x) pair, the float64 scalars sum ref^2 and
    sum (ref - x)^2 of one run (what build_report adds up), in that order."""
    from onnx import TensorProto, helper

    m = copy.deepcopy(model)
    g = m.graph
    wide: dict[str, str] = {}

    def f64(t: str) -> str:
        if t not in wide:
            wide[t] = f"sum::{t}@f64"
            g.node.append(helper.make_node("Cast", [t], [wide[t]], f"sum::cast_{len(wide)}",
                                           to=TensorProto.DOUBLE))
        return wide[t]

    signal: dict[str, str] = {}
    outs = []
    for k, (ref, x) in enumerate(pairs):
        r = f64(ref)
        if ref not in signal:
            signal[ref] = f"sum::signal_{len(signal)}"
            g.node.append(helper.make_node("ReduceSumSquare", [r], [signal[ref]],
                                           f"sum::signal_{len(signal)}", keepdims=0))
        d, noise = f"sum::diff_{k}", f"sum::noise_{k}"
        g.node.append(helper.make_node("Sub", [r, f64(x)], [d], f"sum::sub_{k}"))
        g.node.append(helper.make_node("ReduceSumSquare", [d], [noise], noise, keepdims=0))
        outs += [signal[ref], noise]
    del g.output[:]  # the reported tensors themselves are no longer outputs, so not held
    for name in dict.fromkeys(outs):
        g.output.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, []))
    return m, outs


def _first(data: CalibrationData, k: int):
    for i, s in enumerate(data):
        if i >= k:
            return
        yield s

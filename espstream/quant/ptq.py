"""Post-training quantization techniques beyond exponent choice: what calibrate runs, and when.

1. Order: cross-layer equalization (`equalize`) rewrites the float model before planning;
   observation and exponent choice follow as before; then, for every Conv / Gemm / MatMul
   with a constant weight, the input patches' moments are gathered in one more pass over the
   calibration data (`collect_moments`), and the weights are rounded (`adaround`, else to
   nearest) and the biases corrected (`bias_correction`) when the QDQ model is written;
   finally the exponent search (`exponent_search`) tries +-1 on each free activation exponent.
2. The moments are of the layer input as the integer model sees it: the float model's value
   fake-quantized at the input's exponent (target rounding).
3. Every technique only changes initializer values and exponents: the output is the same kind
   of QDQ model, which export and the integer simulator take as they are.
4. A streaming calibration (whole sequences, states fed back) takes equalization and the
   exponent search's absence: the data passes of bias correction, AdaRound and the search
   are not defined on chunked runs, so they are skipped there with a note.
5. The weight adjustments are computed once per layer and kept, so the exponent search's
   rebuilds reuse them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from espstream.quant import scheme
from espstream.quant.adaround import adaround
from espstream.quant.bias_correction import corrected_bias
from espstream.quant.data import CalibrationData
from espstream.quant.engine import Runner
from espstream.quant.patches import Moments, layout
from espstream.quant.plan import Plan


def collect_moments(fm: onnx.ModelProto, plan: Plan, data: CalibrationData,
                    exps: dict[str, int], target: scheme.Target, bits: int, batch: int
                    ) -> dict[str, Moments]:
    """Rules 1-2: per gemm node (that `patches.layout` takes), its input patches' moments."""
    inits = {t.name: t for t in fm.graph.initializer}
    nodes = {n.name: n for n in fm.graph.node}
    moments: dict[str, Moments] = {}
    by_input: dict[str, list[str]] = {}
    for name, info in plan.gemms.items():
        lay = layout(nodes[name], inits)
        if lay is None or info.input not in exps:
            continue
        moments[name] = Moments(lay)
        by_input.setdefault(info.input, []).append(name)
    if not moments:
        return moments
    graph_inputs = {i.name for i in fm.graph.input}

    def feed(t: str, v: np.ndarray) -> None:
        xq = scheme.fake_quant(v, exps[t], bits, target.rounding)
        for name in by_input[t]:
            moments[name].update(xq)

    direct = [t for t in by_input if t in graph_inputs]
    inner = [t for t in by_input if t not in graph_inputs]
    if direct:
        for s in data:
            for t in direct:
                feed(t, s[t])
    if inner:
        runner = Runner(fm, inner, batch, samples=len(data))
        for _, values in runner.run(data):
            for t, v in zip(inner, values, strict=True):
                feed(t, v)
    return moments


class WeightAdjuster:
    """The rewriter's weight hook (rules 1, 5): integer weight and float bias of a gemm node."""

    def __init__(self, fm: onnx.ModelProto, moments: dict[str, Moments], bits: int,
                 use_adaround: bool, use_bias_correction: bool) -> None:
        self.moments, self.bits = moments, bits
        self.use_adaround, self.use_bias_correction = use_adaround, use_bias_correction
        self.cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self.stats: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, w: np.ndarray, b: np.ndarray | None, w_e: np.ndarray,
                 axis: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        if name in self.cache:
            return self.cache[name]
        e = w_e if axis is not None else int(w_e[0])
        nearest = scheme.quantize(w, e, self.bits, "half_even", axis)
        m = self.moments.get(name)
        if m is None:
            self.cache[name] = (nearest, b)
            return self.cache[name]
        wq = adaround(m.lay, w, w_e, m, self.bits) if self.use_adaround else nearest
        st: dict[str, Any] = {}
        if self.use_adaround:
            st["flipped"] = int(np.sum(wq != nearest))
        if self.use_bias_correction and b is not None:
            nb = corrected_bias(m.lay, w, scheme.dequantize(wq, e, axis), b, m)
            st["bias_shift_max"] = float(np.max(np.abs(nb - b), initial=0.0))
            b = nb
        self.stats[name] = st
        self.cache[name] = (wq, b)
        return self.cache[name]

"""Post-training quantization techniques beyond exponent choice: what calibrate runs, and when.

1. Order: cross-layer equalization (`equalize`) rewrites the float model before planning;
   observation and exponent choice follow as before; then, for every Conv / Gemm / MatMul
   with a constant weight, the input patches' moments are gathered in one more pass over the
   calibration data (`collect_moments`), and the weights are rounded (`adaround`, else to
   nearest) and the biases corrected (`bias_correction`) when the QDQ model is written;
   finally the exponent search (`exponent_search`) tries +-1 on each free activation exponent.
2. The moments are of the layer input as the integer model sees it: the float model's value
   fake-quantized at the input's exponent (target rounding), beside the float value itself;
   from the first MOMENT_SAMPLES (256) samples at most. A run of that pass holds at most
   MOMENT_RUN_BYTES of layer inputs (engine rule 3 with a quarter of its budget): each value is
   then fake-quantized and zero-padded in float64 beside it, about three more copies, so the
   pass stays within what observation holds, at any sequence length.
3. Every technique only changes initializer values and exponents: the output is the same kind
   of QDQ model, which export and the integer simulator take as they are.
4. A streaming calibration (whole sequences, states fed back) takes none of them, with a
   note: the data passes run the model on whole samples, which a streaming model does not
   take, and equalization would pair layers differently through the caches' Concats, so a
   streaming calibration stays equal to the offline one calibrated with them off
   (`convert --chunk` calibrates the offline model, so it has them).
5. The weight adjustments are computed once per layer and kept, so the exponent search's
   rebuilds reuse them.
6. Mixed precision: only the layers at the model's `--bits` are adjusted (an int16 layer of
   an int8 model keeps nearest rounding and its bias), each from its input as it reads it: at
   the reader's exponent (`mixed.reader_exponent`) where the input is of the other width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from espstream.quant import scheme
from espstream.quant.adaround import adaround
from espstream.quant.bias_correction import corrected_bias
from espstream.quant.data import CalibrationData
from espstream.quant.engine import MAX_BATCH_BYTES, Runner
from espstream.quant.patches import Moments, layout
from espstream.quant.plan import Plan

#: rule 2: the moments come from at most this many samples (the first ones): means and
#: second moments of patches settle long before, and the extra pass would otherwise cost a
#: whole second observation of large data sets
MOMENT_SAMPLES = 256
#: rule 2: layer inputs one run of the moments pass may hold (measured on a 128-channel TCN at
#: T=10000: the pass peaked at 3.5x what its runs held, 966 MB with the full budget)
MOMENT_RUN_BYTES = MAX_BATCH_BYTES // 4


class _first:
    """The first n samples of `data`, re-iterable, with len."""

    def __init__(self, data: CalibrationData, n: int) -> None:
        self.data, self.n = data, min(n, len(data))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import itertools

        return itertools.islice(iter(self.data), self.n)


def collect_moments(fm: onnx.ModelProto, plan: Plan, data: CalibrationData,
                    exps: dict[str, int], target: scheme.Target, bits: int, batch: int,
                    second: bool = True, in_exps: dict[str, int] | None = None,
                    ) -> dict[str, Moments]:
    """Rules 1-2: per gemm node (that `patches.layout` takes), its input patches' moments.
    `in_exps` (mixed precision, rule 6): the nodes to take, each with the exponent it reads
    its input at in `bits`; default every node at its input's exponent."""
    inits = {t.name: t for t in fm.graph.initializer}
    nodes = {n.name: n for n in fm.graph.node}
    moments: dict[str, Moments] = {}
    by_input: dict[str, dict[int, list[str]]] = {}
    for name, info in plan.gemms.items():
        lay = layout(nodes[name], inits)
        if lay is None or info.input not in exps or (in_exps is not None and
                                                      name not in in_exps):
            continue
        moments[name] = Moments(lay, second)  # second: AdaRound's (bias correction: means)
        e = exps[info.input] if in_exps is None else in_exps[name]
        by_input.setdefault(info.input, {}).setdefault(e, []).append(name)
    if not moments:
        return moments
    graph_inputs = {i.name for i in fm.graph.input}

    def feed(t: str, v: np.ndarray) -> None:
        for e, names in by_input[t].items():
            xq = scheme.fake_quant(v, e, bits, target.rounding)
            for name in names:
                moments[name].update(xq, v)

    data = _first(data, MOMENT_SAMPLES)
    direct = [t for t in by_input if t in graph_inputs]
    inner = [t for t in by_input if t not in graph_inputs]
    if direct:
        for s in data:
            for t in direct:
                feed(t, s[t])
    if inner:
        runner = Runner(fm, inner, batch, samples=len(data), max_bytes=MOMENT_RUN_BYTES)
        for _, values in runner.run(data):
            for t, v in zip(inner, values, strict=True):
                feed(t, v)
    return moments


#: bias correction also removes the mean shift of the layer's input quantization
#: (bias_correction rule 1); AdaRound leaves the mean to bias correction when both run
#: (adaround rule 2). Both chosen on the zoo's development half.
WITH_INPUT = True
CENTERED = True


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
        # with bias correction after it, the rounding leaves the mean error to the bias
        centered = CENTERED and self.use_bias_correction and b is not None
        wq = adaround(m.lay, w, w_e, m, self.bits, centered) if self.use_adaround else nearest
        st: dict[str, Any] = {}
        if self.use_adaround:
            st["flipped"] = int(np.sum(wq != nearest))
        if self.use_bias_correction and b is not None:
            nb = corrected_bias(m.lay, w, scheme.dequantize(wq, e, axis), b, m, WITH_INPUT)
            st["bias_shift_max"] = float(np.max(np.abs(nb - b), initial=0.0))
            b = nb
        self.stats[name] = st
        self.cache[name] = (wq, b)
        return self.cache[name]


def weight_adjuster(fm: onnx.ModelProto, plan: Plan, data: CalibrationData,
                    exps: dict[str, int], target: scheme.Target, opts: Any, stream: Any,
                    notes: list[str], precision: Any = None,
                    observers: dict | None = None) -> WeightAdjuster | None:
    """calibrate's hook: the rewriter's weight adjuster when bias correction or AdaRound is
    asked for (rule 1), None otherwise; rule 4 for a streaming calibration; rule 6 for a
    mixed model (`precision`)."""
    if stream is not None:
        if opts.ptq_applied():
            notes.append("equalization, bias correction, AdaRound and the exponent search are "
                         "not run on a streaming calibration")
        return None
    if not (opts.adaround or opts.bias_correction):
        return None
    in_exps = None
    if precision is not None:
        from espstream.quant.mixed import reader_exponent

        in_exps = {}
        for name, info in plan.gemms.items():
            if precision.of_node(name) != opts.bits or info.input not in exps:
                continue  # an int16 layer of an int8 model: not adjusted (rewriter)
            t_bits = precision.of_tensor(info.input)
            in_exps[name] = exps[info.input] if t_bits == opts.bits else reader_exponent(
                exps, observers or {}, plan, info.input, opts.bits, opts)
    moments = collect_moments(fm, plan, data, exps, target, opts.bits, opts.batch,
                              second=bool(opts.adaround), in_exps=in_exps)
    return WeightAdjuster(fm, moments, opts.bits, opts.adaround, opts.bias_correction)


def search_exponents(fm: onnx.ModelProto, plan: Plan, data: CalibrationData,
                     exps: dict[str, int], opts: Any, stream: Any, notes: list[str],
                     build: Callable[[dict[str, int]], onnx.ModelProto],
                     exponents: Callable[[dict[str, int]], dict[str, int]]) -> dict[str, int]:
    """calibrate's hook: the exponents after the search (rule 1), or `exps` unchanged."""
    if not opts.exponent_search or stream is not None:
        return exps
    from espstream.quant.exponent_search import OutputError, search

    delta, before, after, trials = search(plan, build, OutputError(fm, data, opts.batch))
    notes.append(f"exponent search: {len(delta)} exponent(s) moved in {trials} trials, "
                 f"calibration-data SQNR {before:.2f} -> {after:.2f} dB")
    return exponents(delta)

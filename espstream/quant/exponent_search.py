"""Exponent search: try each free activation exponent one step up and down against the
network output's error.

1. Free exponents: the outputs of the plan's layers whose exponent is their own (not adopted
   by an Add / Sub / Concat, not shared with a root: plan rules 3 and 5), in graph order.
2. Objective: the SQNR of all graph outputs of the fake-quant QDQ model (onnxruntime) against
   the float model, summed over the calibration data (one signal and one noise sum over every
   output and sample).
3. Greedy, one pass in graph order: for each free tensor, e + 1 then e - 1; a change is kept
   when it raises the objective by more than 0.01 dB, and later tensors are tried on the
   model with every change so far. The constraints of the plan are re-applied after each
   change (an adopted input follows its Add's output).
4. The model is rebuilt by `build(delta)` for each trial (calibrate's rewriter with the
   weights it already has), so each trial is the QDQ model calibrate would write.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from espstream.quant.data import CalibrationData
from espstream.quant.engine import Runner
from espstream.quant.plan import Plan

MIN_GAIN_DB = 0.01


def free_tensors(plan: Plan) -> list[str]:
    """Rule 1."""
    adopted = {i for _, ins in plan.adopt for i in ins}
    return [layer.output for layer in plan.layers
            if layer.output not in adopted and layer.output not in plan.share_root]


class OutputError:
    """Rule 2: the objective of a QDQ model on `data`, the float outputs computed once."""

    def __init__(self, fm: onnx.ModelProto, data: CalibrationData, batch: int) -> None:
        self.data, self.batch = data, batch
        self.names = [o.name for o in fm.graph.output]
        self.ref = self._run(fm)
        self.signal = float(sum(np.sum(r * r) for r in self.ref))

    def _run(self, model: onnx.ModelProto) -> list[np.ndarray]:
        runner = Runner(model, self.names, self.batch, samples=len(self.data))
        return [v.astype(np.float64) for _, values in runner.run(self.data) for v in values]

    def sqnr(self, qm: onnx.ModelProto) -> float:
        got = self._run(qm)
        noise = float(sum(np.sum((r - g) ** 2) for r, g in zip(self.ref, got, strict=True)))
        if noise == 0.0:
            return float("inf")
        return 10.0 * float(np.log10(max(self.signal, 1e-300) / noise))


def search(plan: Plan, build: Callable[[dict[str, int]], onnx.ModelProto],
           objective: OutputError) -> tuple[dict[str, int], float, float, int]:
    """Rules 1-4: (kept deltas, objective before, after, trials)."""
    delta: dict[str, int] = {}
    start = best = objective.sqnr(build(delta))
    trials = 0
    for t in free_tensors(plan):
        for step in (1, -1):
            trial = {**delta, t: delta.get(t, 0) + step}
            trials += 1
            got = objective.sqnr(build(trial))
            if got > best + MIN_GAIN_DB:
                delta, best = trial, got
                break
    return delta, start, best, trials

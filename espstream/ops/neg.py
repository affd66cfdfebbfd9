"""Neg: ESP-DL's saturating negation.

Calibrate: the output shares the input's exponent (ESP-DL's Neg never rescales). Streamify:
pointwise, f(0) = 0. Lower: a `Neg` node at the input's exponent (a RequantizeLinear follows
when the output's Q wants another). Simulate (dl_module_neg.hpp): -q, with the type's minimum
mapped to its maximum; the exponents are not read, as on the chip, and a `lut` attribute
(ESP-PPQ writes one) is ignored because the module never reads it.
"""

from __future__ import annotations

import numpy as np
import onnx

from espstream.intgraph import Node
from espstream.lower import Lowerer
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import share
from espstream.sim import Fn, Simulator
from espstream.stream.rules import rule_unary

MODULE = "neg"


def lower_neg(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.act(n.input[0], n)
    name, out = lw.define_output(n.output[0], n, x.shape, x.cl, x)
    lw.need_q(n, out)
    lw.emit("Neg", n.name, [x.name], [name], {"quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def neg(q: np.ndarray) -> np.ndarray:
    """-q saturated: only the type's minimum has no negation in range."""
    info = np.iinfo(q.dtype)
    return np.where(q == info.min, info.max, -q).astype(q.dtype)


def sim_neg(sim: Simulator, node: Node) -> Fn:
    def fn(args: list) -> list:
        x = args[0]
        return [neg(x) if x.dtype.kind == "i" else -x]

    return fn


register(OpSpec("Neg", MODULE, calibrate=share, calibrate_rule="input's exponent",
                stream=rule_unary, stream_rule="pointwise", zero_keeping=True,
                lower=lower_neg, espdl=("Neg",)))
# int8 and int16 pinned by the operator suite's ESP-PPQ files (values ESP-DL's CI checks)
register_sim(SimSpec("Neg", MODULE, sim_neg, ESPDL_GOLDEN))

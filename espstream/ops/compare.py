"""Equal, Greater, GreaterOrEqual, Less, LessOrEqual: ESP-DL 3.3's `dl_module_equal.hpp`,
`dl_module_greater*.hpp`, `dl_module_less*.hpp` and their `dl_base_*.cpp` kernels.

ESP-DL compares the integer codes of its two inputs as they are (no rescaling; the exponents
are not read) and writes `bool` (one byte, 0 or 1), at 8 and 16 bits; every target computes the
same (the PIE kernels mask their compare result to 1, the C path stores the C++ bool).

Calibrate: the output is bool and stays unquantized (plan rule 8: a node with no float output is
left alone); the inputs keep the exponents their producers give them, lowering aligns them.
`calibrate_compare` only runs when a model declares the output float, which ONNX forbids.
Streamify: broadcast (`rule_broadcast`); a bool output is zero-keeping only for Greater / Less
against a zero constant, so the generic pre-start rules apply.
Lower (rules):
1. The node compares at one exponent E ("align to large", as ESP-PPQ's
   `logical_elementwise_alignment`): the largest of the activation inputs' exponents, and of
   the smallest exponent at which a float constant input fits the integer range.
2. An activation at another exponent is requantized to E (RequantizeLinear).
3. A float constant c is stored at E so that the integer comparison equals the float one on
   E's grid: for `x > c` and `x <= c` floor(c / 2**E), for `x >= c` and `x < c` ceil(c / 2**E)
   (the sides swap when the constant is input 0); Equal rounds (a constant off the grid is
   never equal; its nearest code is used).
4. The output is a bool graph output (ESP-DL has no operator that reads a bool; espstream
   refuses a comparison whose output feeds another node).
Simulate: numpy's comparison of the codes, broadcast the ONNX way, output bool; inputs at
different exponents give a warning (the chip compares the codes all the same).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node, ValueInfo
from espstream.lower import Act, Lowerer, perm_of
from espstream.ops._elemwise import broadcast_pair
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import PlanCtx
from espstream.sim import Fn, Simulator
from espstream.stream.rules import rule_broadcast

MODULE = "compare"

#: op -> (numpy comparison, rounding of a constant at input 1, at input 0)
OPS = {
    "Equal": (np.equal, "round", "round"),
    "Greater": (np.greater, "floor", "ceil"),
    "GreaterOrEqual": (np.greater_equal, "ceil", "floor"),
    "Less": (np.less, "ceil", "floor"),
    "LessOrEqual": (np.less_equal, "floor", "ceil"),
}
_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.int16): (-32768, 32767)}


def fit_exponent(c: np.ndarray, dtype: np.dtype) -> int:
    """The smallest exponent e with every |c| / 2**e within the type's positive range."""
    m = float(np.max(np.abs(c))) if np.size(c) else 0.0
    if m == 0.0:
        return -10**6
    hi = _RANGE[np.dtype(dtype)][1]
    e = math.ceil(math.log2(m / hi))
    while m / 2.0 ** e > hi:
        e += 1
    return e


def quantize_const(c: np.ndarray, e: int, how: str, dtype: np.dtype) -> np.ndarray:
    """Rule 3: the codes that make the integer comparison equal the float one on 2**e's grid."""
    v = np.asarray(c, np.float64) / 2.0 ** e
    q = {"floor": np.floor, "ceil": np.ceil, "round": np.rint}[how](v)
    lo, hi = _RANGE[np.dtype(dtype)]
    return np.clip(q, lo, hi).astype(dtype)


def calibrate_compare(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    raise UserError(f"node {n.name!r} ({n.op_type}): its output is declared float; ONNX "
                    "comparisons output bool")


def lower_compare(lw: Lowerer, n: onnx.NodeProto) -> None:
    names = list(n.input[:2])
    acts = [lw.acts.get(nm) for nm in names]
    if not any(acts):
        raise UserError(f"{n.op_type} '{n.name}' has only constant inputs; run espstream "
                        "optimize first")
    consts: dict[int, np.ndarray] = {}
    for k, nm in enumerate(names):
        if acts[k] is None:
            if nm not in lw.consts:
                acts[k] = lw.act(nm, n)  # refuses with the reason
            else:
                consts[k] = np.asarray(lw.consts[nm], np.float32)
    real = [a for a in acts if a is not None]
    dtype = real[0].dtype
    if any(a.dtype != dtype for a in real):
        raise UserError(f"{n.op_type} '{n.name}': inputs of different integer widths")
    e = max([a.exp for a in real] + [fit_exponent(c, dtype) for c in consts.values()])
    shape = lw.shape(n.output[0])
    rank = len(shape)
    cl = rank >= 3 and any(a.cl and a.rank >= 3 for a in real)
    inputs = []
    for k, nm in enumerate(names):
        if k in consts:
            q = quantize_const(consts[k], e, OPS[n.op_type][1 + (k == 0)], dtype)
            q = q.reshape((1,) * (rank - q.ndim) + q.shape) if q.ndim < rank else q
            if cl and rank >= 3:
                q = np.transpose(q, perm_of(rank))
            inputs.append(lw.initializer(lw.fresh(f"{nm}_2^{e}"), q, [e]))
        else:
            a = acts[k]
            a = lw.layout_as(a, cl) if a.rank >= 3 else a
            inputs.append(lw.requantize(a, e).name)
    out = n.output[0]
    if lw.consumers.get(out) or out not in lw.graph_outputs:
        raise UserError(f"{n.op_type} '{n.name}': its bool output feeds other operators; ESP-DL "
                        "has no operator that reads a bool, so it can only be a graph output")
    lw.emit(n.op_type, n.name, inputs, [out], {"quant_type": lw.qtype(dtype)})
    res = Act(out, 0, shape, cl, np.dtype(np.bool_))
    lw.out.value_infos[out] = ValueInfo(out, np.dtype(np.bool_), res.runtime_shape(), [0])
    lw.float_outs[out] = out  # an unquantized graph output, as Softmax's
    lw.acts[out] = res  # so the output's layout (espstream.layout) is its own
    lw.used_names.add(out)


def sim_compare(sim: Simulator, node: Node) -> Fn:
    f = OPS[node.op_type][0]
    g = sim.graph
    exps = {sim.init_exp(x) if x in g.initializers else sim.exp(x) for x in node.inputs[:2]}
    if len(exps) > 1:
        sim.warn_once(node, f"inputs at exponents {sorted(exps)}: ESP-DL compares the integer "
                      "codes as they are")

    def fn(args: list) -> list:
        a, b = broadcast_pair(np.asarray(args[0]), np.asarray(args[1]))
        return [f(a.astype(np.int32), b.astype(np.int32))]

    return fn


for _op in OPS:
    register(OpSpec(_op, MODULE, calibrate=calibrate_compare,
                    calibrate_rule="bool output, unquantized; inputs aligned when lowered",
                    stream=rule_broadcast,
                    stream_rule="broadcast: time axes aligned, delays matched by caches",
                    lower=lower_compare, espdl=(_op,)))
    register_sim(SimSpec(_op, MODULE, sim_compare, ESPDL_GOLDEN))

"""Elementwise nonlinearities: ESP-DL's lookup-table activations, and SiLU as Swish.

Calibrate: each output gets an exponent of its own (plan rule 6); a Sigmoid whose only
consumer is `Mul(x, Sigmoid(x))` is internal, the Mul's output takes the exponent (rule 3).
Streamify: pointwise (`rule_unary`), with each operator's f(0) = 0 and sign facts; Clip's
depend on its range. Lower (lower's rule 6): in 8 bits a 256-entry int8 table
`<Op>_lut_<k>` at the output's exponent, indexed by q + 128, entry
saturate(round(f(q * 2^e_in) / 2^e_out)) with the target's rounding; in 16 bits the node
without a table (Clip: min / max as int16 at the input's exponent). Simulate (sim's rule 6):
an 8-bit node's table where the file has one, else the same table computed in float64; a
16-bit node per element in float64, its `lut` ignored as ESP-DL's modules do (`LUT` and Gelu
nodes read theirs: int16 tables nearest neighbour, `table16`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Act, Lowerer
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    ESPPPQ_FIXTURE,
    NUMPY_ORACLE,
    OpSpec,
    SimSpec,
    register,
    register_lower_pattern,
    register_sim,
    register_table_lookup,
)
from espstream.quant import scheme
from espstream.quant.plan import INTERNAL, OWN, Layer, PlanCtx, own
from espstream.sim import Fn, Simulator, round_float, saturate
from espstream.stream.rules import Ctx, rule_unary, unary_time

MODULE = "activation"

#: LUT operators: ONNX op type -> f(x, attrs) in float64.
LUT_FUNCS = {
    "Sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, a: np.tanh(x),
    "Swish": lambda x, a: x / (1.0 + np.exp(-x)),
    "HardSigmoid": lambda x, a: np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda x, a: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 0.01) * x),
    "Elu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 1.0) * np.expm1(x)),
    "Exp": lambda x, a: np.exp(x),
    "Log": lambda x, a: np.log(x),
    "Sqrt": lambda x, a: np.sqrt(x),
    "Clip": lambda x, a: np.clip(x, a["min"], a["max"]),
}


def build_lut(op: str, attrs: dict[str, Any], e_in: int, e_out: int, rounding: str,
              ) -> np.ndarray:
    """The 256-entry int8 table: entry i = saturate(round(f((i - 128) * 2^e_in) / 2^e_out))."""
    q = np.arange(-128, 128, dtype=np.float64)
    with np.errstate(all="ignore"):
        y = LUT_FUNCS[op](np.ldexp(q, e_in), attrs)
        # log / sqrt of a negative input: NaN in ONNX; the table holds 0 there
        y = np.nan_to_num(np.asarray(y, dtype=np.float64), nan=0.0, posinf=1e300, neginf=-1e300)
        v = scheme.round_with(np.ldexp(y, -e_out), rounding)
    return np.clip(v, -128, 127).astype(np.int8)



def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _hard_sigmoid(x: np.ndarray, node: Node) -> np.ndarray:
    alpha = float(node.attrs.get("alpha", 0.2))
    beta = float(node.attrs.get("beta", 0.5))
    return np.clip(alpha * x + beta, 0.0, 1.0)


ELEMENTWISE: dict[str, Callable[[np.ndarray, Node], np.ndarray]] = {
    "Sigmoid": lambda x, n: _sigmoid(x),
    "Tanh": lambda x, n: np.tanh(x),
    "Swish": lambda x, n: x * _sigmoid(x),
    "Silu": lambda x, n: x * _sigmoid(x),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda x, n: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Elu": lambda x, n: np.where(x > 0, x, float(n.attrs.get("alpha", 1.0)) * np.expm1(x)),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, float(n.attrs.get("alpha", 0.01)) * x),
    "Exp": lambda x, n: np.exp(x),
    "Log": lambda x, n: np.log(x),
    "Sqrt": lambda x, n: np.sqrt(x),
    "Softplus": lambda x, n: np.logaddexp(0.0, x),
    "Gelu": lambda x, n: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
}


# ---- calibrate -----------------------------------------------------------------------------


def _is_silu(sig: onnx.NodeProto, only_consumer) -> bool:
    mul = only_consumer(sig.output[0])
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
        return False
    return sorted(mul.input) == sorted([sig.input[0], sig.output[0]])


def calibrate_sigmoid(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    """Plan rule 3: SiLU = Mul(x, Sigmoid(x)) is one Swish table; else rule 6."""
    if not _is_silu(n, pc.only_consumer):
        return own(pc, n, float_outs)
    mul = pc.only_consumer(n.output[0])
    pc.plan.state[n.output[0]] = INTERNAL
    pc.plan.state[mul.output[0]] = OWN
    pc.plan.layers.append(Layer(mul.name, "SiLU", "own", [n.name, mul.name], mul.output[0]))
    pc.done.add(mul.name)


# ---- streamify -----------------------------------------------------------------------------


def _clip_bound(ctx: Ctx, node: gs.Node, slot: int, attr: str, default: float) -> float:
    if len(node.inputs) > slot and node.inputs[slot].name:
        v = ctx.consts.value(node.inputs[slot])
        return default if v is None else float(np.asarray(v).reshape(-1)[0])
    return float(node.attrs.get(attr, default))


def stream_clip(ctx: Ctx, node: gs.Node) -> None:
    """Pointwise; pre-start zeros stay zeros when the range holds 0, the output is non-negative
    when min >= 0 (or the input is)."""
    xt = unary_time(ctx, node)
    if xt is None:
        return rule_unary(ctx, node)
    lo = _clip_bound(ctx, node, 1, "min", -np.inf)
    hi = _clip_bound(ctx, node, 2, "max", np.inf)
    return rule_unary(ctx, node, zero=lo <= 0 <= hi, nonneg=lo >= 0 or xt.nonneg)


# ---- lower ---------------------------------------------------------------------------------


def _silu_mul(lw: Lowerer, sig: onnx.NodeProto) -> onnx.NodeProto | None:
    cons = lw.consumers.get(sig.output[0], [])
    if (len(cons) == 1 and cons[0].op_type == "Mul" and sig.input[0] in cons[0].input
            and sig.output[0] not in lw.graph_outputs):
        return cons[0]
    return None


def _silu_sigmoid(lw: Lowerer, mul: onnx.NodeProto) -> onnx.NodeProto | None:
    for k in (0, 1):
        p = lw.producer.get(mul.input[k])
        if (p is not None and p.op_type == "Sigmoid" and p.input[0] == mul.input[1 - k]
                and _silu_mul(lw, p) is mul):
            return p
    return None


def clip_bounds(lw: Lowerer, n: onnx.NodeProto) -> dict[str, float]:
    lo, hi = -math.inf, math.inf
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    lo, hi = float(attrs.get("min", lo)), float(attrs.get("max", hi))
    for k, which in ((1, "min"), (2, "max")):
        if len(n.input) > k and n.input[k]:
            c = lw.consts.get(n.input[k])
            if c is None:
                raise UserError(f"Clip '{n.name}': its {which} is not a constant")
            if which == "min":
                lo = float(c)
            else:
                hi = float(c)
    return {"min": lo, "max": hi}


def lower_lut(lw: Lowerer, op: str, n: onnx.NodeProto, x: Act, float_out: str,
         attrs: dict[str, Any]) -> None:
    name, out = lw.define_output(float_out, n, x.shape, x.cl)
    lw.need_q(n, out)
    if out.dtype != x.dtype:
        raise UserError(f"{op} '{n.name}': input and output integer types differ")
    node_attrs: dict[str, Any] = {"quant_type": lw.qtype(x.dtype)}
    inputs = [x.name]
    if x.dtype == np.int8:
        k = lw.lut_count.get(op, 0)
        lw.lut_count[op] = k + 1
        table = build_lut(op, attrs, x.exp, out.exp, lw.rounding)
        lut_name = lw.initializer(lw.fresh(f"{op}_lut_{k}"), table, [out.exp], None)
        node_attrs["lut"] = lut_name
    elif op == "Clip":  # 16 bits: min / max at the input's exponent
        for which in ("min", "max"):
            v = attrs[which]
            lo, hi = scheme.qrange(16)
            q = lo if v == -math.inf else hi if v == math.inf else int(np.clip(
                scheme.round_with(np.ldexp(v, -x.exp), lw.rounding), lo, hi))
            inputs.append(lw.initializer(lw.fresh(f"{n.name}_{which}"),
                                           np.asarray(q, np.int16), [x.exp]))
    if op in ("LeakyRelu", "Elu", "HardSigmoid"):
        for k2, v in attrs.items():
            if k2 in ("alpha", "beta"):
                node_attrs[k2] = float(v)
    lw.emit(op, n.name, inputs, [name], node_attrs)
    lw.finish_output(out)


@register_lower_pattern
def lower_silu(lw: Lowerer, n: onnx.NodeProto) -> bool:
    """SiLU written as Mul(x, Sigmoid(x)): the Sigmoid is skipped, the Mul becomes Swish."""
    if n.op_type == "Sigmoid" and n.domain in ("", "ai.onnx") and _silu_mul(lw, n) is not None:
        return True  # lowered with its Mul as Swish
    if n.op_type == "Mul" and n.domain in ("", "ai.onnx"):
        sig = _silu_sigmoid(lw, n)
        if sig is not None:
            x = lw.act(sig.input[0], n)
            lower_lut(lw, "Swish", n, x, n.output[0], {})
            return True
    return False


def lower_table_op(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.act(n.input[0], n)
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    if n.op_type == "Clip":
        attrs.update(clip_bounds(lw, n))
    lower_lut(lw, n.op_type, n, x, n.output[0], attrs)


# ---- simulate ------------------------------------------------------------------------------


def sim_lookup(sim: Simulator, node: Node) -> Fn:
    """The file's `lut` table: 256 int8 entries indexed by q + 128, or an int16 table read
    nearest neighbour (`table16`)."""
    lut_name = node.attrs.get("lut")
    if isinstance(lut_name, bytes):
        lut_name = lut_name.decode()
    if not lut_name or lut_name not in sim.graph.initializers:
        raise UserError(f"node '{node.name}': lookup table '{lut_name}' is not in the file")
    table = sim.graph.initializers[lut_name].data.reshape(-1)
    if table.dtype == np.int16:
        return table16(node.name, lut_name, table, sim.rounding)
    if table.size != 256 or table.dtype != np.int8:
        raise UserError(
            f"node '{node.name}': lookup table '{lut_name}' must be 256 int8 values or "
            f"2^16 / step + 1 int16 values, got {table.size} {table.dtype}"
        )

    # table[q + 128] as one gather by the byte: q viewed as uint8 is q + 256 for q < 0
    by_byte = np.concatenate([table[128:], table[:128]])

    def lut(args: list) -> list:
        x = args[0]
        if x.dtype != np.int8:
            raise UserError(f"node '{node.name}': a 256-entry table needs int8 input, "
                            f"got {x.dtype}")
        return [by_byte.take(x.view(np.uint8))]

    return lut


def sim_table(sim: Simulator, node: Node) -> Fn:
    """f computed from the exponents: a 256-entry table in 8 bits, per element in 16 (the
    node's own `lut`, when ESP-DL reads it, is dispatched to `sim_lookup` by the simulator)."""
    e_in, e_out = sim.exp(node.inputs[0]), sim.exp(node.outputs[0])
    if node.op_type not in ELEMENTWISE:
        raise UserError(f"node '{node.name}': operator '{node.op_type}' is not supported")
    f = ELEMENTWISE[node.op_type]
    dtype = sim.dtype_of(node.outputs[0], np.int8)
    rounding = sim.rounding
    if dtype.kind == "f":  # a float node (quant_type F32): ESP-DL's float path
        def in_float(args: list) -> list:
            with np.errstate(all="ignore"):
                return [f(np.asarray(args[0], np.float32), node).astype(dtype)]

        return in_float

    def compute(q: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            y = f(q.astype(np.float64) * 2.0**e_in, node) * 2.0**-e_out
        y = np.nan_to_num(y, posinf=1e9, neginf=-1e9)
        return saturate(round_float(y, rounding), dtype)

    table8 = compute(np.arange(-128, 128)) if dtype == np.int8 else None
    # table8[q + 128] as one gather by the byte (q viewed as uint8 is q + 256 for q < 0)
    by_byte = None if table8 is None else np.concatenate([table8[128:], table8[:128]])

    def fn(args: list) -> list:
        x = args[0]
        if x.dtype == np.int8 and by_byte is not None:
            return [by_byte.take(x.view(np.uint8))]
        return [compute(x)]

    return fn


def table16_index(x: np.ndarray, shift: int, rounding: str) -> np.ndarray:
    """ESP-DL's int16 table index (dl_base_lut.cpp, nearest neighbour): u = x + 32768, then
    u / 2^shift rounded half up (esp32s3, C path) or half to even (esp32p4's PIE v2)."""
    u = x.astype(np.int32) + 32768
    if shift == 0:
        return u
    idx, rem = u >> shift, u & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = rem > half if rounding == "half_even" else rem >= half
    if rounding == "half_even":
        up |= (rem == half) & ((idx & 1) == 1)
    return idx + up


def table16(node_name: str, lut_name: str, table: np.ndarray, rounding: str) -> Fn:
    """An int16 LUT: 2^16 / step + 1 entries, step a power of two (ESP-DL's LUT module)."""
    # ESP-DL: step = 65536 / (entries - 1); step 1 indexes x + 32768 directly
    step = 65536 // max(table.size - 1, 1)
    if table.size < 2 or step & (step - 1) or (step > 1 and table.size != 65536 // step + 1):
        raise UserError(f"node '{node_name}': int16 lookup table '{lut_name}' has {table.size} "
                        "entries; ESP-DL needs 2^16 / step + 1 with step a power of two")
    shift = step.bit_length() - 1

    def lut16(args: list) -> list:
        x = args[0]
        if x.dtype != np.int16:
            raise ValueError(f"an int16 table needs int16 input, got {x.dtype}")
        return [table[table16_index(x, shift, rounding)]]

    return lut16


def sim_clip(sim: Simulator, node: Node) -> Fn:
    """A Clip without a table (16 bits, or 8 without `lut`): min / max inputs are integers at
    the input's exponent; the output takes the input's exponent."""
    shift = sim.exp(node.outputs[0]) - sim.exp(node.inputs[0])
    lo = (
        sim.init(node, 1, "min").reshape(-1)[0]
        if len(node.inputs) > 1 and node.inputs[1]
        else None
    )
    hi = (
        sim.init(node, 2, "max").reshape(-1)[0]
        if len(node.inputs) > 2 and node.inputs[2]
        else None
    )
    k, rounding = sim.kernels, sim.rounding

    def fn(args: list) -> list:
        y = np.clip(args[0], lo, hi).astype(args[0].dtype)
        return [y if shift == 0 else k.requantize(y, shift, rounding=rounding)]

    return fn


register_table_lookup(sim_lookup)


# ---- the table -----------------------------------------------------------------------------

# (op, calibrate rule, f(0) == 0, never negative, lowered as a table)
_OPS: list[tuple[str, Callable | None, bool, bool, bool]] = [
    ("Sigmoid", calibrate_sigmoid, False, True, True),
    ("Tanh", own, True, False, True),
    ("HardSigmoid", own, False, True, True),
    ("HardSwish", own, True, False, True),
    ("LeakyRelu", own, True, False, True),
    ("Elu", own, True, False, True),
    ("Exp", own, False, True, True),
    ("Log", own, False, False, True),
    ("Sqrt", own, True, True, True),
    ("Swish", None, True, False, True),
    ("Softplus", own, False, True, False),
    ("Gelu", None, True, False, False),
]
for _op, _cal, _zero, _nonneg, _lut in _OPS:
    register(OpSpec(
        _op, MODULE, calibrate=_cal,
        calibrate_rule=("SiLU pair, else own exponent" if _cal is calibrate_sigmoid
                        else "own exponent") if _cal else "",
        stream=rule_unary, stream_rule="pointwise", zero_keeping=_zero, nonneg=_nonneg,
        lower=lower_table_op if _lut else None, espdl=(_op,) if _lut else ()))
register(OpSpec("Clip", MODULE, calibrate=own, calibrate_rule="own exponent",
                stream=stream_clip, stream_rule="pointwise (zero and sign from its range)",
                lower=lower_table_op, espdl=("Clip",)))

# Swish is pinned by the ESP-PPQ fixtures (tutorial_tcn's SiLU tables); the others by NumPy only
# ESP-DL reads their `lut` at 8 bits only; Gelu's deserializer is the LUT module's own
for _op in ("Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Exp", "Log",
            "Sqrt", "Softplus", "Silu"):
    # all but Softplus and Silu pinned by the operator suite (values ESP-DL checks on chips)
    register_sim(SimSpec(_op, MODULE, sim_table,
                         NUMPY_ORACLE if _op in ("Softplus", "Silu") else ESPDL_GOLDEN, lut="s8"))
register_sim(SimSpec("Gelu", MODULE, sim_table, NUMPY_ORACLE, lut="always"))
register_sim(SimSpec("LUT", MODULE, sim_lookup, ESPDL_GOLDEN, lut="always"))
register_sim(SimSpec("Swish", MODULE, sim_table, ESPPPQ_FIXTURE, lut="s8"))
register_sim(SimSpec("Clip", MODULE, sim_clip, ESPDL_GOLDEN, lut="s8"))

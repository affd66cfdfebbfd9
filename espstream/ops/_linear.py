"""What Conv, ConvTranspose, Gemm and MatMul share: the linear layer with a constant weight.

Calibration (plan rule 2): the weight per output channel or per tensor, the bias at
`e_in + e_w`; a Relu or Clip that is the output's only consumer is fused, the linear output
stays float inside the pair. Lowering (lower's rules 4-5): the fused activation, the weight as
an integer initializer, the bias at `e_in + e_w` (int32, or int64 for 16 bits). Simulation
(sim's rules 2-3): the per-channel shift `e_out - e_in - e_w` and the bias checked at
`e_in + e_w`. The operator modules (`conv`, `gemm`) supply what differs: the weight's
output-channel axis, the attributes, the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Act, Lowerer, QConst, base_name
from espstream.ops.activation import clip_bounds, lower_lut
from espstream.quant import scheme
from espstream.quant.plan import INTERNAL, OWN, GemmInfo, Layer, PlanCtx, own_with_constants
from espstream.sim import Simulator

#: activations a linear layer absorbs when they are its output's only consumer
FUSABLE_OPS = {"Relu", "Clip"}


# ---- calibrate -----------------------------------------------------------------------------


def calibrate_linear(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str],
                     weight_axis: Callable[[dict, np.ndarray], int | None]) -> None:
    """Plan rule 2 for a layer whose weight (input 1) is a float constant; MatMul of two
    activations is an operator with an exponent of its own (rule 6), other layers refuse a
    computed weight. `weight_axis(attrs, w)`: the output-channel axis of the weight, or None
    where per-channel exponents are impossible."""
    plan, inits, op = pc.plan, pc.inits, n.op_type
    if not (len(n.input) > 1 and pc.const_float(n.input[1])):
        if op != "MatMul":
            raise UserError(
                f"node {n.name!r} ({op}): its weight is not a constant; calibrate needs "
                "constant weights (run `espstream optimize` to fold them)"
            )
        return own_with_constants(pc, n, float_outs)
    ins = pc.act_inputs(n)
    if not ins or n.input[0] not in plan.state:
        raise UserError(
            f"node {n.name!r} ({op}): its data input is a constant; fold it first with "
            "`espstream optimize`"
        )
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    w = numpy_helper.to_array(inits[n.input[1]])
    if op == "Gemm" and attrs.get("transA", 0):
        raise UserError(f"node {n.name!r} (Gemm): transA=1 is not supported; transpose the input")
    axis = weight_axis(attrs, w)
    bias = None
    if op != "MatMul" and len(n.input) > 2 and n.input[2]:
        if n.input[2] not in inits:
            raise UserError(f"node {n.name!r} ({op}): its bias is not a constant")
        bias = n.input[2]
    plan.gemms[n.name] = GemmInfo(n.name, n.input[0], n.input[1], axis, bias)
    out = n.output[0]
    act = pc.only_consumer(out)
    if act is not None and act.op_type in FUSABLE_OPS and act.input[0] == out:
        plan.state[out] = INTERNAL
        plan.state[act.output[0]] = OWN
        plan.layers.append(Layer(act.name, f"{op}+{act.op_type}", "gemm", [n.name, act.name],
                                 act.output[0]))
        pc.done.add(act.name)
    else:
        plan.state[out] = OWN
        plan.layers.append(Layer(n.name, op, "gemm", [n.name], out))


def gemm_weight_bias(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Float weight and bias of a gemm layer with Gemm's alpha / beta folded; returns out channels.

    A Gemm bias is reshaped to one value per output channel.
    """
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    b = None
    if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
    if node.op_type == "Conv":
        cout = w.shape[0]
    elif node.op_type == "ConvTranspose":
        cout = w.shape[1] * attrs.get("group", 1)
    elif node.op_type == "Gemm":
        cout = w.shape[0] if attrs.get("transB", 0) else w.shape[1]
        w = w * np.float32(attrs.get("alpha", 1.0))
        if b is not None:
            b = b * np.float32(attrs.get("beta", 1.0))
            if b.size == 1:
                b = np.full(cout, b.reshape(()), np.float32)
            elif b.size == cout:
                b = b.reshape(cout)
            else:
                raise UserError(
                    f"node {node.name!r} (Gemm): bias of shape {list(b.shape)} is not one value "
                    "per output; only a per-output bias can be quantized"
                )
    else:
        cout = w.shape[-1]
    return w, b, cout


# ---- lower ---------------------------------------------------------------------------------


def fused_activation(lw: Lowerer, n: onnx.NodeProto) -> tuple[str, onnx.NodeProto | None, dict]:
    """('Relu' | 'Linear', the fused node or None, clip bounds for a non-Relu Clip)."""
    cons = lw.consumers.get(n.output[0], [])
    if len(cons) != 1 or n.output[0] in lw.graph_outputs:
        return "Linear", None, {}
    c = cons[0]
    if c.op_type == "Relu":
        return "Relu", c, {}
    if c.op_type == "Clip" and lw.q_consumers(c.output[0]):
        b = clip_bounds(lw, c)
        qs = lw.q_consumers(c.output[0])
        e, dtype = lw.q_exp_dtype(qs[0])
        qmax = scheme.qrange(8 if dtype == np.int8 else 16)[1]
        if b["min"] == 0.0 and b["max"] >= math.ldexp(qmax + 0.5, e):
            return "Relu", c, {}
        return "Linear", c, b
    return "Linear", None, {}


def lower_linear(lw: Lowerer, n: onnx.NodeProto,
                 prepare: Callable[[Lowerer, onnx.NodeProto], tuple[Act, dict, list[str],
                                                                    str | None, bool]]) -> None:
    """Conv / Gemm / MatMul with their fused activation (lower's rule 4). `prepare` reads the
    operator's own input, attributes, weight and bias: (x, attrs, weights, bias, out_cl)."""
    op = n.op_type
    act, fused, clip = fused_activation(lw, n)
    float_out = fused.output[0] if fused is not None else n.output[0]
    if fused is not None:
        lw.absorbed.add(fused.name)
    x, attrs, w, b, out_cl = prepare(lw, n)
    inputs = [x.name, *w]
    if b is not None:
        inputs.append(b)
    attrs = {"activation": act, **attrs, "quant_type": lw.qtype(x.dtype)}
    shape = lw.shape(n.output[0])
    if clip:  # Conv at the Clip's exponent, then a Clip table at that exponent
        qs = lw.q_consumers(float_out)
        e, dtype = lw.q_exp_dtype(qs[0])
        mid = Act(n.output[0], e, shape, out_cl, dtype)
        lw.emit(op, n.name, inputs, [mid.name], attrs)
        lw.value_info(mid)
        lower_lut(lw, "Clip", fused, mid, float_out, clip)
        return
    name, out = lw.define_output(float_out, n, shape, out_cl)
    lw.need_q(n, out)
    lw.emit(op, n.name, inputs, [name], attrs)
    lw.finish_output(out)


def weight(lw: Lowerer, n: onnx.NodeProto, k: int, what: str) -> QConst:
    if len(n.input) <= k or not n.input[k]:
        raise UserError(f"{n.op_type} '{n.name}' has no {what}")
    qc = lw.qconst(n.input[k])
    if qc is None:
        raise UserError(f"{n.op_type} '{n.name}': its {what} '{n.input[k]}' is not a quantized "
                        "constant (DequantizeLinear of an integer initializer)")
    return qc


def bias(lw: Lowerer, n: onnx.NodeProto, k: int, nout: int, x: Act, wexps: list[int],
          ) -> str | None:
    """The bias at exponent e_in + e_w: int32 (8-bit) or int64 (16-bit).

    calibrate stores a 16-bit model's int64 bias as int32 shifted right by
    k = log2(scale) - e_in - e_w (rule 5 of its contract); it is shifted back here.
    """
    if len(n.input) <= k or not n.input[k]:
        return None
    qc = weight(lw, n, k, "bias")
    data = qc.data.reshape(-1).astype(np.int64)
    if data.size != nout:
        raise UserError(f"{n.op_type} '{n.name}': bias has {data.size} values for {nout} "
                        "output channels")
    if qc.data.dtype.kind != "i":
        raise UserError(f"{n.op_type} '{n.name}': bias is {qc.data.dtype}, expected integers")
    want = np.asarray([x.exp + e for e in wexps] if len(wexps) > 1 else [x.exp + wexps[0]])
    have = np.asarray(qc.exps)
    shift = np.broadcast_to(have, (nout,)) - np.broadcast_to(want, (nout,))
    sixteen = x.dtype == np.int16
    if np.any(shift < 0) or (not sixteen and np.any(shift != 0)):
        raise UserError(f"{n.op_type} '{n.name}': bias exponents {have.tolist()[:4]} do not "
                        f"match input + weight exponents {want.tolist()[:4]}; quantize the "
                        "model with espstream calibrate")
    if sixteen:
        data = data << shift.astype(np.int64)
    else:
        data = data.astype(np.int32)
    return lw.initializer(base_name(n.input[k]), data, [int(e) for e in want])


# ---- simulate ------------------------------------------------------------------------------


def fused_relu(sim: Simulator, node: Node) -> bool:
    act = node.attrs.get("activation", "Linear")
    if isinstance(act, bytes):
        act = act.decode()
    if act not in ("Linear", "Relu"):
        raise UserError(
            f"node '{node.name}' ({node.op_type}): fused activation '{act}' is not "
            "supported (Linear, Relu)"
        )
    return act == "Relu"


def shift_and_bias(sim: Simulator, node: Node, w_name: str, n_out: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-channel right shift e_out - e_in - e_w and the bias (checked at e_in + e_w)."""
    e_in = sim.exp(node.inputs[0])
    e_out = sim.exp(node.outputs[0])
    w_exp = np.asarray(sim.graph.initializers[w_name].exponents, np.int64)
    if w_exp.size not in (1, n_out):
        raise UserError(
            f"node '{node.name}': weight '{w_name}' has {w_exp.size} exponents for "
            f"{n_out} output channels"
        )
    w_exp = np.broadcast_to(w_exp, (n_out,))
    shift = (e_out - e_in - w_exp).astype(np.int64)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2]:
        b_name = node.inputs[2]
        bias = sim.init(node, 2, "bias").reshape(-1)
        if bias.size != n_out:
            raise UserError(
                f"node '{node.name}': bias '{b_name}' has {bias.size} values for "
                f"{n_out} output channels"
            )
        b_exp = np.asarray(sim.graph.initializers[b_name].exponents, np.int64)
        if b_exp.size not in (1, n_out):
            raise UserError(
                f"node '{node.name}': bias '{b_name}' has {b_exp.size} exponents for "
                f"{n_out} output channels"
            )
        b_exp = np.broadcast_to(b_exp, (n_out,))
        if (
            sim.arithmetic == "esp32s3"
            and bias.dtype == np.int32
            and (bias.min() < -(2**19) or bias.max() >= 2**19)
        ):
            sim.warn_once(node, f"bias '{b_name}' exceeds the 20 bits of esp32s3's bias")
        want = e_in + w_exp
        if not np.array_equal(b_exp, want):
            k = int(np.flatnonzero(b_exp != want)[0])
            raise UserError(
                f"node '{node.name}': bias '{b_name}' channel {k} has exponent "
                f"{int(b_exp[k])}, but ESP-DL adds it at e_in + e_w = {int(want[k])}"
            )
    return shift, bias


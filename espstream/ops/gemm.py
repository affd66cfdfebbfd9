"""Gemm and MatMul: a linear layer over the last axis, or a product of two activations.

Calibrate: a linear layer (`_linear`) when input 1 is a float constant (Gemm: weight axis 0
with transB, else 1; MatMul: the last axis); MatMul of two activations gets an exponent of its
own. Streamify (`rule_matmul`): pointwise in time when time is a row axis of the data operand;
contracting over time, or two per-frame operands, is refused. Lower: Gemm with transB 0,
alpha = beta = 1, weight [1, 1, K, N]; MatMul in the ONNX layout (a Transpose back to it is
inserted). Simulate: the weight as a 1x1 convolution over [M, K] rows; MatMul of two
activations with exact int64 products and one rounding shift.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Act, Lowerer, attr, base_name
from espstream.ops._linear import (
    bias,
    calibrate_linear,
    fused_relu,
    lower_linear,
    shift_and_bias,
    weight,
)
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    ESPPPQ_FIXTURE,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant.plan import PlanCtx
from espstream.sim import Fn, Simulator, saturate
from espstream.stream.axes import Summary, Time
from espstream.stream.rules import Ctx, generic, rank_of, static_broadcasts_time, unsupported

MODULE = "gemm"


def calibrate_gemm(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    calibrate_linear(pc, n, float_outs, lambda attrs, w: 0 if attrs.get("transB", 0) else 1)


def calibrate_matmul(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    # B is [..., K, N]
    calibrate_linear(pc, n, float_outs, lambda attrs, w: w.ndim - 1 if w.ndim >= 2 else None)


def rule_matmul(ctx: Ctx, node: gs.Node) -> None:
    """MatMul and Gemm with weights on one side.

    1. Time on a row/batch axis of the data operand (not the contracted one): pointwise.
    2. Time contracted, or both operands per-frame (attention over time): refused.
    """
    a, b = node.inputs[0], node.inputs[1]
    at, bt = ctx.get(a), ctx.get(b)
    if not isinstance(at, Time) and not isinstance(bt, Time):
        return generic(ctx, node)
    if isinstance(at, (Time, Summary)) and isinstance(bt, (Time, Summary)):
        raise unsupported(node, "multiplies two per-frame tensors (attention over time)")
    out = node.outputs[0]
    r_out = rank_of(ctx, out)
    if node.op == "Gemm":
        if not isinstance(at, Time):
            raise unsupported(node, "has the time axis on its weight operand")
        row = 1 if int(node.attrs.get("transA", 0)) else 0
        if at.axis != row:
            raise unsupported(node, "contracts over the time axis")
        ctx.set(out, at.but(axis=0, dirty=at.delay > 0, nonneg=False))
        for extra in node.inputs[2:]:
            if static_broadcasts_time(ctx, extra, 2, 0):
                raise unsupported(node, "adds a bias that varies along time")
        return
    if isinstance(at, Time):
        ra = rank_of(ctx, a)
        if at.axis == ra - 1 or ra == 1:
            raise unsupported(node, "contracts over the time axis")
        ctx.set(out, at.but(axis=at.axis + r_out - ra, dirty=at.delay > 0, nonneg=False))
    else:
        rb = rank_of(ctx, b)
        if bt.axis == rb - 2 or rb == 1:
            raise unsupported(node, "contracts over the time axis")
        ctx.set(out, bt.but(axis=bt.axis + r_out - rb, dirty=bt.delay > 0, nonneg=False))


def gemm_params(lw: Lowerer, n: onnx.NodeProto, x: Act) -> tuple[dict, list[str], str | None]:
    if int(attr(n, "transA", 0)):
        raise UserError(f"Gemm '{n.name}': transA = 1 is not supported by ESP-DL")
    for k in ("alpha", "beta"):
        if float(attr(n, k, 1.0)) != 1.0:
            raise UserError(f"Gemm '{n.name}': {k} = {attr(n, k)}; calibrate folds it to 1")
    qc = weight(lw, n, 1, "weight (B)")
    w = qc.data
    if w.ndim != 2:
        raise UserError(f"Gemm '{n.name}': B has rank {w.ndim}")
    trans = int(attr(n, "transB", 0))
    kn = w.T if trans else w
    out_axis = 0 if trans else 1
    if qc.axis not in (None, out_axis):
        raise UserError(f"Gemm '{n.name}': weights quantized per axis {qc.axis}, not per "
                        "output channel")
    wname = lw.initializer(base_name(n.input[1]), kn.reshape(1, 1, *kn.shape), qc.exps, None)
    b = bias(lw, n, 2, kn.shape[1], x, qc.exps)
    return {"alpha": 1.0, "beta": 1.0, "transB": 0}, [wname], b


def matmul_params(lw: Lowerer, n: onnx.NodeProto) -> tuple[dict, list[str], str | None]:
    qc = lw.qconst(n.input[1])
    if qc is not None:
        if qc.data.ndim < 2:
            raise UserError(f"MatMul '{n.name}': a 1-D constant operand is not supported")
        if qc.axis not in (None, qc.data.ndim - 1):
            raise UserError(f"MatMul '{n.name}': weights quantized per axis {qc.axis}, not per "
                            "output channel")
        return {}, [lw.initializer(base_name(n.input[1]), qc.data, qc.exps, None)], None
    y = lw.layout_as(lw.act(n.input[1], n), False)
    return {}, [y.name], None


def _prepare_gemm(lw: Lowerer, n: onnx.NodeProto):
    x = lw.act(n.input[0], n)
    if x.rank != 2:
        raise UserError(f"Gemm '{n.name}': input of rank {x.rank}, expected 2")
    attrs, w, b = gemm_params(lw, n, x)
    return x, attrs, w, b, False


def _prepare_matmul(lw: Lowerer, n: onnx.NodeProto):
    x = lw.layout_as(lw.act(n.input[0], n), False)
    attrs, w, b = matmul_params(lw, n)
    return x, attrs, w, b, False


def lower_gemm(lw: Lowerer, n: onnx.NodeProto) -> None:
    lower_linear(lw, n, _prepare_gemm)


def lower_matmul(lw: Lowerer, n: onnx.NodeProto) -> None:
    lower_linear(lw, n, _prepare_matmul)


def sim_gemm(sim: Simulator, node: Node) -> Fn:
    if node.op_type == "Gemm":
        for a, default in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0)):
            if float(node.attrs.get(a, default)) != default:
                raise UserError(
                    f"node '{node.name}' (Gemm): {a}={node.attrs[a]} is not supported "
                    f"(ESP-DL's Gemm has {a}={default})"
                )
    relu = fused_relu(sim, node)
    w_name = node.inputs[1] if len(node.inputs) > 1 else ""
    if w_name in sim.graph.initializers:
        w = sim.graph.initializers[w_name].data
        if w.ndim < 2:
            raise UserError(
                f"node '{node.name}': constant weight of shape {list(w.shape)} must be "
                "[.., C, N]"
            )
        if int(np.prod(w.shape[:-2])) != 1:
            return _batched_constant(sim, node, w, w_name, relu)
        w2 = w.reshape(w.shape[-2], w.shape[-1])  # [C, N]
        kw = np.ascontiguousarray(w2.T[:, None, :])  # [N, kW=1, C]
        shift, bias = shift_and_bias(sim, node, w_name, w2.shape[1])
        if bias is not None:
            bias = bias.astype(np.int64)
        k, rounding = sim.kernels, sim.rounding
        prepare = getattr(k, "conv_prepared", None)
        if prepare is not None:  # checks the arguments once, not on every call
            conv = prepare(kw, bias, shift=shift, rounding=rounding, relu=relu)
        else:
            def conv(rows: np.ndarray) -> np.ndarray:
                return k.conv(rows, kw, bias, shift=shift, rounding=rounding, relu=relu)

        def fn(args: list) -> list:
            x = args[0]
            if x.shape[-1] != kw.shape[2]:
                raise ValueError(
                    f"input of shape {list(x.shape)} does not fit weight [C={kw.shape[2]}, N]"
                )
            lead = x.shape[:-1]
            rows = x.reshape(-1, x.shape[-1])  # [M, C] read as NWC with W = M
            y = conv(rows)
            return [y.reshape(*lead, kw.shape[0])]

        return fn
    if node.op_type != "MatMul":
        raise UserError(f"node '{node.name}' (Gemm): its weight must be a constant initializer")
    # MatMul of two activations: exact int64 products, one rounding shift.
    e_out = sim.exp(node.outputs[0])
    shift = e_out - sim.exp(node.inputs[0]) - sim.exp(node.inputs[1])
    dtype = sim.dtype_of(node.outputs[0], np.int8)
    rounding = sim.rounding

    def fn2(args: list) -> list:
        from espstream.kernels.reference import round_shift

        acc = np.matmul(args[0].astype(np.int64), args[1].astype(np.int64))
        v = round_shift(acc, shift, rounding)
        if relu:
            v = np.maximum(v, 0)
        return [saturate(v, dtype)]

    return fn2


def _batched_constant(sim: Simulator, node: Node, w: np.ndarray, w_name: str, relu: bool) -> Fn:
    """MatMul by a constant with batch dims: broadcast batched products, exact in int64, one
    rounding shift per output channel (ESP-DL's MatMul reads a constant B like an activation)."""
    from espstream.kernels.reference import round_shift

    if node.op_type != "MatMul" or (len(node.inputs) > 2 and node.inputs[2]):
        raise UserError(f"node '{node.name}': a batched constant weight needs a MatMul "
                        "without bias")
    shift, _ = shift_and_bias(sim, node, w_name, w.shape[-1])
    w64 = w.astype(np.int64)
    dtype = sim.dtype_of(node.outputs[0], np.int8)
    rounding = sim.rounding

    def fn(args: list) -> list:
        acc = np.matmul(args[0].astype(np.int64), w64)
        v = round_shift(acc, shift, rounding)
        return [saturate(np.maximum(v, 0) if relu else v, dtype)]

    return fn


register(OpSpec("Gemm", MODULE, calibrate=calibrate_gemm,
                calibrate_rule="weight per channel, bias at e_in + e_w, fuses Relu / Clip",
                stream=rule_matmul, stream_rule="pointwise over rows; time contracted: refused",
                lower=lower_gemm, espdl=("Gemm",)))
register(OpSpec("MatMul", MODULE, calibrate=calibrate_matmul,
                calibrate_rule="constant B: weight per channel; two activations: own exponent",
                stream=rule_matmul, stream_rule="pointwise over rows; time contracted: refused",
                lower=lower_matmul, espdl=("MatMul",)))
register_sim(SimSpec("Gemm", MODULE, sim_gemm, ESPPPQ_FIXTURE))
register_sim(SimSpec("MatMul", MODULE, sim_gemm, ESPDL_GOLDEN))

"""ConvTranspose, lowered as ESP-DL's `InsertZeros` + `Conv` (dl_module_insert_zeros.hpp), the
way ESP-PPQ 1.3.12 decomposes it.

Calibrate: a linear layer (`_linear`), weight exponents per output channel (axis 1 of the ONNX
weight when group is 1). Streamify: upsampling (`rule_conv_transpose`). Lower:

1. A ConvTranspose with stride s, kernel k, dilation d, pads (pb, pe) and output_padding op is a
   Conv (stride 1, dilation d) over x with s - 1 zeros between its frames (`InsertZeros`,
   attributes `stride` [s..] and `output_padding` [op..], which adds op zeros at the end), with
   the kernel flipped and its in / out channel axes swapped, and pads (d (k - 1) - pb,
   d (k - 1) - pe). Stride 1 on every axis needs no InsertZeros (ESP-PPQ writes a plain Conv).
2. Refused (one line): group > 1, 3-D and higher, output_shape or auto_pad, and pads larger
   than d (k - 1) (the equivalent Conv would need negative padding).
3. The Conv's weight keeps the ConvTranspose weight's per-output-channel exponents, its bias
   is at e_in + e_w, a following Relu is fused, as for Conv (`_linear`).

Simulate InsertZeros: zeros, with the input's frames at multiples of the stride (values copied,
exponent unchanged).
"""

from __future__ import annotations

import numpy as np
import onnx

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Act, Lowerer, attr, base_name
from espstream.ops._linear import bias, calibrate_linear, lower_linear, weight
from espstream.ops.conv import rule_conv_transpose
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import PlanCtx
from espstream.sim import Fn, Simulator, ints

MODULE = "conv_transpose"


def insert_zeros(x: np.ndarray, stride: list[int], output_padding: list[int]) -> np.ndarray:
    """x [N, *spatial, C] -> zeros with x[.., i, ..] at i * stride, output_padding zeros after."""
    nsp = x.ndim - 2
    s = list(stride) * nsp if len(stride) == 1 else list(stride)
    op = list(output_padding) * nsp if len(output_padding) == 1 else list(output_padding)
    if len(s) != nsp or len(op) != nsp:
        raise UserError(f"InsertZeros: stride {stride} / output_padding {output_padding} do not "
                        f"fit {nsp} spatial axes")
    if any(v < 1 for v in s) or any(v < 0 for v in op):
        raise UserError(f"InsertZeros: stride {stride} must be >= 1, output_padding >= 0")
    dims = [d + (si - 1) * (d - 1) + o for d, si, o in zip(x.shape[1:-1], s, op, strict=True)]
    out = np.zeros((x.shape[0], *dims, x.shape[-1]), x.dtype)
    out[(slice(None), *(slice(0, si * (d - 1) + 1, si) for d, si in
                        zip(x.shape[1:-1], s, strict=True)), slice(None))] = x
    return out


def calibrate_conv_transpose(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    calibrate_linear(pc, n, float_outs, lambda attrs, w: 1 if attrs.get("group", 1) == 1 else None)


def _equivalent_conv(n: onnx.NodeProto, nsp: int, k: list[int]):
    where = f"ConvTranspose '{n.name}'"
    if int(attr(n, "group", 1)) != 1:
        raise UserError(f"{where}: group {attr(n, 'group')}; ESP-DL's InsertZeros + Conv "
                        "lowering takes group 1")
    if attr(n, "output_shape") is not None:
        raise UserError(f"{where}: output_shape is set; give explicit pads (espstream "
                        "optimize) instead")
    auto = attr(n, "auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
        raise UserError(f"{where}: auto_pad is set; give explicit pads instead")
    s = [int(v) for v in attr(n, "strides", [1] * nsp)]
    d = [int(v) for v in attr(n, "dilations", [1] * nsp)]
    p = [int(v) for v in attr(n, "pads", [0] * (2 * nsp))]
    op = [int(v) for v in attr(n, "output_padding", [0] * nsp)]
    cp = []
    for i in range(nsp):
        full = d[i] * (k[i] - 1)
        if p[i] > full or p[i + nsp] > full:
            raise UserError(f"{where}: pads {p} exceed dilation * (kernel - 1) = {full}; the "
                            "equivalent Conv would crop (not supported)")
        cp.append((full - p[i], full - p[i + nsp]))
    pads = [c[0] for c in cp] + [c[1] for c in cp]  # ONNX order, as Conv's attribute
    return s, d, pads, op


def _prepare(lw: Lowerer, n: onnx.NodeProto):
    where = f"ConvTranspose '{n.name}'"
    x = lw.layout_as(lw.act(n.input[0], n), True)
    qw = weight(lw, n, 1, "weight")
    w = qw.data  # [C_in, C_out, (kh,) kw]
    nsp = w.ndim - 2
    if nsp not in (1, 2):
        raise UserError(f"{where}: {nsp}-D; ESP-DL has 1-D and 2-D")
    if qw.axis not in (None, 1):
        raise UserError(f"{where}: weights quantized per axis {qw.axis}, expected the "
                        "output-channel axis 1")
    k = [int(v) for v in w.shape[2:]]
    s, d, pads, op = _equivalent_conv(n, nsp, k)
    src = x
    if any(v != 1 for v in s) or any(op):
        dims = [v + (si - 1) * (v - 1) + o for v, si, o in zip(x.shape[2:], s, op, strict=True)]
        z = Act(lw.fresh(f"{x.name}_insert_zeros"), x.exp, [*x.shape[:2], *dims], True, x.dtype)
        lw.emit("InsertZeros", lw.fresh_node(f"{n.name}_InsertZeros"), [x.name], [z.name],
                {"output_padding": op, "quant_type": lw.qtype(x.dtype), "stride": s})
        lw.value_info(z)
        src = z
    # the Conv's weight: kernel flipped, [C_in, C_out, k..] -> logical [k.., C_in, C_out]
    flipped = np.flip(w, axis=tuple(range(2, w.ndim)))
    logical = np.ascontiguousarray(np.transpose(flipped, (*range(2, w.ndim), 0, 1)))
    wname = lw.initializer(base_name(n.input[1]), logical, qw.exps, None)
    b = bias(lw, n, 2, int(w.shape[1]), src, qw.exps)
    attrs = {"dilations": d, "group": 1, "kernel_shape": k, "pads": pads,
             "strides": [1] * nsp}
    return src, attrs, [wname], b, True


def lower_conv_transpose(lw: Lowerer, n: onnx.NodeProto) -> None:
    conv = onnx.NodeProto()
    conv.CopyFrom(n)
    conv.op_type = "Conv"  # the node ESP-DL runs after the InsertZeros
    lower_linear(lw, conv, _prepare)


def sim_insert_zeros(sim: Simulator, node: Node) -> Fn:
    sim.same_exponent(node)
    stride = ints(node.attrs.get("stride", [1]))
    op = ints(node.attrs.get("output_padding", [0]))

    def fn(args: list) -> list:
        if args[0].ndim not in (3, 4):
            raise UserError(f"node '{node.name}' (InsertZeros): input of rank {args[0].ndim}; "
                            "ESP-DL takes 1 or 2 spatial axes")
        return [insert_zeros(args[0], stride, op)]

    return fn


register(OpSpec("ConvTranspose", MODULE, calibrate=calibrate_conv_transpose,
                calibrate_rule="weight per channel, bias at e_in + e_w, fuses Relu / Clip",
                stream=rule_conv_transpose, stream_rule="upsampling window, output cropped",
                lower=lower_conv_transpose, espdl=("InsertZeros", "Conv")))
register_sim(SimSpec("InsertZeros", MODULE, sim_insert_zeros, ESPDL_GOLDEN))

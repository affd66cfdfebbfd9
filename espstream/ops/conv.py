"""Conv (1-D and 2-D, group 1 or depthwise); ConvTranspose's streaming rule (the operator
itself: ops/conv_transpose.py).

Calibrate: a linear layer (`_linear`), weight exponents per output channel (axis 0).
Streamify: Conv is a window operator (`rule_conv`: a cache of `dilation * (kernel - 1)` past
frames, its time padding removed); ConvTranspose upsamples (`rule_conv_transpose`). Lower
(lower's rule 5): weights [W, C, N] / [H, W, C, N], depthwise [W, N, 1] / [H, W, N, 1], pads in
ONNX order (ESP-DL reorders them on loading); any other group is refused, as ESP-DL's Conv
takes group 1 or group = channels. Simulate (sim's rule 2): int32 (int64 for
int16) accumulation over the taps inside the input, the bias added before one rounding shift,
the fused Relu, saturation (`kernels.conv`).
"""

from __future__ import annotations

from fractions import Fraction

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
from espstream.ops.registry import ESPPPQ_FIXTURE, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import PlanCtx
from espstream.sim import Fn, Simulator, check_window, ints, kernel_pads
from espstream.stream.axes import WARM_ALL, Time
from espstream.stream.rules import (
    Ctx,
    Req,
    conv_geometry,
    generic,
    pass_to_outputs,
    rule_conv,
    slice_output,
    unsupported,
)

MODULE = "conv"


def calibrate_conv(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    calibrate_linear(pc, n, float_outs, lambda attrs, w: 0)


def rule_conv_transpose(ctx: Ctx, node: gs.Node) -> None:
    """ConvTranspose with the time axis among the spatial axes (upsampling by its stride s).

    1. Input frame u adds to output frames `u*s - left + j*dilation`. The op runs on
       `ceil((K - 1) / s)` cached past frames plus the chunk, with no padding, and a Slice keeps
       the `c*s` output frames every input of which is in that span (output_padding is set to
       `s - K` when the kernel is shorter than the stride, so that span exists).
    2. Output stride is stride(x) / s; the output lags by `s * delay(x) + left` frames (the
       cropped `left` frames offline are pre-start frames of the stream).
    3. Pre-start frames of a dirty delayed x are masked: offline there is no input before 0.
    4. `output_shape` (pads derived from a target size) is refused.
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    if xt.axis == 0:
        return pass_to_outputs(ctx, node, xt)
    if xt.axis == 1:
        raise unsupported(node, "mixes frames: the time axis is its channel axis")
    if node.attrs.get("output_shape"):
        raise unsupported(node, "sets output_shape; give explicit pads instead")
    auto = node.attrs.get("auto_pad", "NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET",):
        raise unsupported(node, "uses auto_pad; give explicit pads instead")
    k, dil, s, pads, i, nsp = conv_geometry(ctx, node, x, xt.axis)
    K = dil * (k - 1) + 1
    left = pads[i]
    E = -(-(K - 1) // s)
    if E:
        ctx.req(x, Req(node, 0, E, 0))
        if xt.delay > 0 and xt.dirty:
            ctx.masks.add(x.name)
    out = node.outputs[0]
    t_out = ctx.length(out, xt.axis)
    valid = min(t_out, max(0, xt.valid * s - left))
    warm = 0
    if xt.warmup >= WARM_ALL:
        warm = WARM_ALL
    elif xt.warmup > 0:
        warm = max(0, (xt.warmup - 1) * s - left + K)
    d = s * xt.delay + left
    ctx.set(
        out,
        Time(
            axis=xt.axis,
            stride=xt.stride / s,
            delay=d,
            dirty=d > 0,
            warmup=warm,
            valid=valid,
            length=t_out,
        ),
    )
    axis = xt.axis
    outpad_old = list(node.attrs.get("output_padding") or [0] * nsp)

    def fix(c: int) -> None:
        p = list(pads)
        p[i] = p[i + nsp] = 0
        node.attrs["pads"] = p
        op = list(outpad_old)
        op[i] = max(0, s - K)
        node.attrs["output_padding"] = op
        c_x = int(Fraction(c) / xt.stride)
        slice_output(ctx, node, 0, axis, E * s, E * s + c_x * s)

    ctx.fix(fix)


def conv_params(lw: Lowerer, n: onnx.NodeProto, x: Act) -> tuple[dict, list[str], str | None]:
    qc = weight(lw, n, 1, "weight")
    w = qc.data
    nsp = w.ndim - 2
    if nsp not in (1, 2):
        raise UserError(f"Conv '{n.name}': {nsp}-D convolution; ESP-DL has 1-D and 2-D")
    group = int(attr(n, "group", 1))
    cin = x.shape[1]
    nout = w.shape[0]
    auto_pad = attr(n, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise UserError(f"Conv '{n.name}': auto_pad {auto_pad} is not supported; run "
                        "espstream optimize or export with explicit pads")
    depthwise = group > 1
    if depthwise and not (group == cin and w.shape[1] == 1 and nout == cin):
        raise UserError(f"Conv '{n.name}': group {group} with {cin} input and {nout} output "
                        "channels; ESP-DL supports group 1 or depthwise (group = channels)")
    if depthwise:  # [N, 1, (H,) W] -> [(H,) W, N, 1]
        logical = np.moveaxis(w, (0, 1), (-2, -1))
    else:  # [N, C, (H,) W] -> [(H,) W, C, N]
        logical = np.transpose(w, (*range(2, w.ndim), 1, 0))
    if qc.axis not in (None, 0):
        raise UserError(f"Conv '{n.name}': weights quantized per axis {qc.axis}, expected the "
                        "output-channel axis 0")
    wname = lw.initializer(base_name(n.input[1]), logical, qc.exps, None)
    b = bias(lw, n, 2, nout, x, qc.exps)
    pads = [int(p) for p in attr(n, "pads", [0] * (2 * nsp))]
    if auto_pad == "VALID":
        pads = [0] * (2 * nsp)
    # 2-D pads stay in ONNX order [top, left, bottom, right]: ESP-DL's Conv deserializer
    # reorders them to [top, bottom, left, right] itself (dl_module_conv.hpp)
    attrs = {
        "dilations": [int(d) for d in attr(n, "dilations", [1] * nsp)],
        "group": group,
        "kernel_shape": [int(k) for k in attr(n, "kernel_shape", list(w.shape[2:]))],
        "pads": pads,
        "strides": [int(s) for s in attr(n, "strides", [1] * nsp)],
    }
    return attrs, [wname], b


def _prepare(lw: Lowerer, n: onnx.NodeProto):
    x = lw.layout_as(lw.act(n.input[0], n), True)
    attrs, w, b = conv_params(lw, n, x)
    return x, attrs, w, b, True


def lower_conv(lw: Lowerer, n: onnx.NodeProto) -> None:
    lower_linear(lw, n, _prepare)


def sim_conv(sim: Simulator, node: Node) -> Fn:
    w = sim.init(node, 1, "weight")
    group = int(node.attrs.get("group", 1))
    nd = w.ndim - 2  # [W, C, N] (1-D) or [H, W, C, N] (2-D)
    if nd not in (1, 2):
        raise UserError(
            f"node '{node.name}': Conv weight of shape {list(w.shape)} is not 1-D or 2-D"
        )
    if group > 1 and w.shape[-1] == 1 and w.shape[-2] % group == 0:
        # depthwise [.., N, 1] -> [N, .., 1]
        kw = np.moveaxis(w, -2, 0)
    else:
        # [.., C/g, N] -> [N, .., C/g]
        kw = np.moveaxis(w, -1, 0)
    kw = np.ascontiguousarray(kw)
    n_out = kw.shape[0]
    shift, bias = shift_and_bias(sim, node, node.inputs[1], n_out)
    relu = fused_relu(sim, node)
    stride = ints(node.attrs.get("strides", [1] * nd))
    dilation = ints(node.attrs.get("dilations", [1] * nd))
    pads = kernel_pads(ints(node.attrs.get("pads", [0] * (2 * nd))))
    if len(stride) != nd or len(dilation) != nd or len(pads) != 2 * nd:
        raise UserError(
            f"node '{node.name}': strides {stride}, dilations {dilation}, pads {pads} do "
            f"not fit a {nd}-D Conv"
        )
    check_window(node, w.shape[:nd], stride, dilation, pads)
    if bias is not None:
        bias = bias.astype(np.int64)
    k = sim.kernels
    rounding = sim.rounding
    prepare = getattr(k, "conv_prepared", None)
    if prepare is not None:  # checks the arguments once, not on every call
        run = prepare(kw, bias, stride=stride, dilation=dilation, pads=pads, groups=group,
                      shift=shift, rounding=rounding, relu=relu)
        return lambda args: [run(args[0])]

    def fn(args: list) -> list:
        x = args[0]
        return [
            k.conv(x, kw, bias, stride=stride, dilation=dilation, pads=pads, groups=group,
                   shift=shift, rounding=rounding, relu=relu)
        ]  # fmt: skip

    return fn


register(OpSpec("Conv", MODULE, calibrate=calibrate_conv,
                calibrate_rule="weight per channel, bias at e_in + e_w, fuses Relu / Clip",
                stream=rule_conv, stream_rule="window: cache of dilation * (kernel - 1) frames",
                lower=lower_conv, espdl=("Conv",)))
register_sim(SimSpec("Conv", MODULE, sim_conv, ESPPPQ_FIXTURE))

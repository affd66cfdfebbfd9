"""Pools: AveragePool, MaxPool, GlobalAveragePool, GlobalMaxPool (lowered and simulated;
GlobalMaxPool as ESP-DL's MaxPool over the whole spatial extent, ESP-DL having no module of
its own for it), LpPool / GlobalLpPool (streamed in float only).

Calibrate: MaxPool and GlobalMaxPool share their input's exponent (plan rule 4), the averages
get their own (rule 6). Streamify: the windowed pools are window operators (`rule_conv`; a
MaxPool's -inf padding is neutral only on a non-negative input); the global pools mix every
frame and are refused on a time axis. Lower: 1-D and 2-D, no dilation, explicit pads.
Simulate (sim's rule 7): the average in float32 over the full kernel area, rounded and
saturated; the max copies values.
"""

from __future__ import annotations

from typing import Any

import onnx

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Lowerer, attr
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    ESPPPQ_FIXTURE,
    NUMPY_ORACLE,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant.plan import (
    own,
    share,
)
from espstream.sim import (
    Fn,
    Simulator,
    check_window,
    ints,
    kernel_pads,
)
from espstream.stream.rules import (
    rule_conv,
    rule_mixes_all,
)

MODULE = "pool"


def lower_pool(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.layout_as(lw.act(n.input[0], n), True)
    shape = lw.shape(n.output[0])
    attrs: dict[str, Any] = {}
    if x.rank not in (3, 4):
        raise UserError(
            f"{n.op_type} '{n.name}': {x.rank - 2}-D pooling; ESP-DL has 1-D and 2-D"
        )
    op = n.op_type
    if op == "GlobalMaxPool":
        # ESP-DL has no GlobalMaxPool module: its MaxPool with the whole spatial extent as the
        # kernel (no pads, stride = kernel) computes the same single maximum per channel.
        spatial = [int(d) for d in lw.shape(n.input[0])[2:]]
        if any(d < 1 for d in spatial):
            raise UserError(f"GlobalMaxPool '{n.name}': its input's spatial size is not known; "
                            "fix the input shapes with espstream optimize --input-shape")
        op = "MaxPool"
        attrs = {"ceil_mode": 0, "kernel_shape": spatial, "pads": [0] * (2 * len(spatial)),
                 "strides": spatial}
    elif op != "GlobalAveragePool":
        nsp = x.rank - 2
        if any(int(d) != 1 for d in attr(n, "dilations", [1] * nsp)):
            raise UserError(f"{n.op_type} '{n.name}': dilation is not supported by ESP-DL")
        auto_pad = attr(n, "auto_pad", b"NOTSET")
        if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in (
                "NOTSET", "VALID"):
            raise UserError(f"{n.op_type} '{n.name}': auto_pad is not supported; give pads")
        pads = [int(p) for p in attr(n, "pads", [0] * (2 * nsp))]
        # 2-D pads stay in ONNX order: ESP-DL's pool deserializers reorder them themselves
        attrs = {
            "ceil_mode": int(attr(n, "ceil_mode", 0)),
            "kernel_shape": [int(k) for k in attr(n, "kernel_shape")],
            "pads": pads,
            "strides": [int(s) for s in attr(n, "strides", [1] * nsp)],
        }
        if n.op_type == "AveragePool":
            attrs["count_include_pad"] = int(attr(n, "count_include_pad", 0))
    natural = x if op == "MaxPool" else None
    name, out = lw.define_output(n.output[0], n, shape, True, natural)
    lw.need_q(n, out)
    lw.emit(op, n.name, [x.name], [name],
              {**attrs, "quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def _pool_params(sim: Simulator, node: Node):
    kernel = ints(node.attrs.get("kernel_shape", []))
    nd = len(kernel)
    if nd not in (1, 2):
        raise UserError(
            f"node '{node.name}' ({node.op_type}): kernel_shape {kernel} is not 1-D or 2-D"
        )
    if int(node.attrs.get("ceil_mode", 0)):
        raise UserError(f"node '{node.name}' ({node.op_type}): ceil_mode=1 is not supported")
    stride = ints(node.attrs.get("strides", [1] * nd))
    dilation = ints(node.attrs.get("dilations", [1] * nd))
    pads = kernel_pads(ints(node.attrs.get("pads", [0] * (2 * nd))))
    if len(stride) != nd or len(dilation) != nd or len(pads) != 2 * nd:
        raise UserError(
            f"node '{node.name}' ({node.op_type}): strides {stride}, dilations {dilation}, "
            f"pads {pads} do not fit a {nd}-D kernel"
        )
    check_window(node, kernel, stride, dilation, pads)
    return kernel, stride, dilation, pads


def sim_avgpool(sim: Simulator, node: Node) -> Fn:
    e_in, e_out = sim.exp(node.inputs[0]), sim.exp(node.outputs[0])
    k, rounding = sim.kernels, sim.rounding
    if node.op_type == "GlobalAveragePool":

        def gfn(args: list) -> list:
            x = args[0]
            kernel = list(x.shape[1:-1])  # [1, W, C] or [1, H, W, C]
            y = k.avgpool(x, kernel, e_in=e_in, e_out=e_out, rounding=rounding)
            return [y]

        return gfn
    kernel, stride, dilation, pads = _pool_params(sim, node)
    # the window checked once per input shape, not on every call
    run = k.avgpool_prepared(kernel, stride=stride, dilation=dilation, pads=pads, e_in=e_in,
                             e_out=e_out, rounding=rounding)
    return lambda args: [run(args[0])]


def sim_maxpool(sim: Simulator, node: Node) -> Fn:
    sim.same_exponent(node)
    k = sim.kernels
    if node.op_type == "GlobalMaxPool":
        return lambda args: [k.maxpool(args[0], list(args[0].shape[1:-1]))]
    kernel, stride, dilation, pads = _pool_params(sim, node)
    run = k.maxpool_prepared(kernel, stride=stride, dilation=dilation, pads=pads)
    return lambda args: [run(args[0])]


_WINDOW = "window: cache of kernel - 1 frames"
register(OpSpec("AveragePool", MODULE, calibrate=own, calibrate_rule="own exponent",
                stream=rule_conv, stream_rule=_WINDOW, lower=lower_pool, espdl=("AveragePool",)))
register(OpSpec("MaxPool", MODULE, calibrate=share, calibrate_rule="input's exponent",
                stream=rule_conv, stream_rule=_WINDOW, lower=lower_pool, espdl=("MaxPool",)))
register(OpSpec("GlobalAveragePool", MODULE, calibrate=own, calibrate_rule="own exponent",
                stream=rule_mixes_all, stream_first=True,
                stream_rule="refused on a time axis (mixes every frame)", lower=lower_pool,
                espdl=("GlobalAveragePool",)))
register(OpSpec("GlobalMaxPool", MODULE, calibrate=share, calibrate_rule="input's exponent",
                stream=rule_mixes_all, stream_first=True,
                stream_rule="refused on a time axis (mixes every frame)", lower=lower_pool,
                espdl=("MaxPool",)))
register(OpSpec("LpPool", MODULE, stream=rule_conv, stream_rule=_WINDOW))
register(OpSpec("GlobalLpPool", MODULE, stream=rule_mixes_all, stream_first=True,
                stream_rule="refused on a time axis (mixes every frame)"))
register_sim(SimSpec("AveragePool", MODULE, sim_avgpool, ESPPPQ_FIXTURE))
register_sim(SimSpec("GlobalAveragePool", MODULE, sim_avgpool, ESPDL_GOLDEN))
register_sim(SimSpec("MaxPool", MODULE, sim_maxpool, ESPDL_GOLDEN))
register_sim(SimSpec("GlobalMaxPool", MODULE, sim_maxpool, NUMPY_ORACLE))

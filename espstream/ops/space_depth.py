"""DepthToSpace and SpaceToDepth (4-D, NCHW in ONNX; NHWC in ESP-DL's runtime).

Calibrate: data movement, the output shares the input's exponent. Streamify: both mix the
spatial axes with channels, so a time axis anywhere but the batch axis is refused. Lower: ESP-DL's
`DepthToSpace` (attributes `blocksize`, `mode`) and `SpaceToDepth` (`blocksize`) on channels-last
data. ESP-DL's kernels (dl_module_depth_to_space.hpp, dl_module_space_to_depth.hpp) differ from
ONNX in the channel order, and the lowering makes up for it:

1. DepthToSpace CRD: ONNX's order (input channel c -> output channel c / b^2, row
   (c mod b^2) / b, column c mod b).
2. DepthToSpace DCR: ESP-DL's DCR kernel computes ONNX's DCR only when the output has `b`
   channels (it takes c mod b for the output channel, not c mod C/b^2): written as DCR then,
   as CRD with one output channel (the two orders agree there), and otherwise the channels are
   first reordered from DCR to CRD order (Reshape [N, H, W, b^2, C'] -> Transpose -> Reshape)
   for the CRD kernel.
3. SpaceToDepth: ESP-DL (like ESP-PPQ's executor) writes output channel c * b^2 + (h mod b) * b
   + (w mod b), where ONNX writes ((h mod b) * b + w mod b) * C + c; with more than one input
   channel a Reshape [N, H/b, W/b, C, b^2] -> Transpose -> Reshape after it restores ONNX's order.
4. Height and width must be multiples of the block (SpaceToDepth), blocksize >= 1.

Simulate: ESP-DL's index arithmetic (a NumPy gather); the DCR kernel on a shape where it leaves
output elements unwritten (C / b^2 != b, more than one channel) is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Act, Lowerer, attr
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import share
from espstream.sim import Fn, Simulator
from espstream.stream.axes import Time
from espstream.stream.rules import Ctx, generic, pass_to_outputs, unsupported

MODULE = "space_depth"


# ---- ESP-DL's kernels (runtime layout NHWC) and ONNX's definitions (NCHW), in NumPy ----------

def espdl_depth_to_space(x: np.ndarray, b: int, mode: str) -> np.ndarray:
    """ESP-DL's DepthToSpace on NHWC data (its loops as index maps)."""
    n, h, w, c = x.shape
    co = c // (b * b)
    cc = np.arange(c)
    if mode == "CRD":
        oc, dh, dw = cc // (b * b), (cc % (b * b)) // b, cc % b
    else:  # ESP-DL's DCR: the output channel is taken as c mod b
        if co != b:
            raise UserError(f"DepthToSpace DCR with {co} output channels and blocksize {b}: "
                            "ESP-DL's DCR kernel is right only when they are equal (it leaves "
                            "other outputs unwritten)")
        oc, dh, dw = cc % b, cc // (b * b), (cc % (b * b)) // b
    out = np.empty((n, h * b, w * b, co), x.dtype)
    hh = (np.arange(h) * b)[:, None, None] + dh[None, None, :]
    ww = (np.arange(w) * b)[None, :, None] + dw[None, None, :]
    out[:, hh, ww, np.broadcast_to(oc, (h, w, c))] = x
    return out


def espdl_space_to_depth(x: np.ndarray, b: int) -> np.ndarray:
    """ESP-DL's SpaceToDepth on NHWC data: output channel c * b^2 + (h mod b) * b + w mod b."""
    n, h, w, c = x.shape
    if h % b or w % b:
        raise UserError(f"SpaceToDepth: height {h} and width {w} must be multiples of the "
                        f"blocksize {b}")
    y = x.reshape(n, h // b, b, w // b, b, c)  # n, oh, bh, ow, bw, c
    return np.ascontiguousarray(y.transpose(0, 1, 3, 5, 2, 4)).reshape(n, h // b, w // b,
                                                                       c * b * b)


def onnx_depth_to_space(x: np.ndarray, b: int, mode: str) -> np.ndarray:
    """ONNX DepthToSpace on NCHW data (the operator's definition)."""
    n, c, h, w = x.shape
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def onnx_space_to_depth(x: np.ndarray, b: int) -> np.ndarray:
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


# ---- calibrate / streamify -----------------------------------------------------------------

def rule_space_depth(ctx: Ctx, node: gs.Node) -> None:
    """DepthToSpace / SpaceToDepth: 1. time on the batch axis passes; 2. anywhere else: refused
    (the block moves frames into channels or channels into frames)."""
    xt = ctx.get(node.inputs[0])
    if not isinstance(xt, Time):
        return generic(ctx, node)
    if xt.axis == 0:
        return pass_to_outputs(ctx, node, xt)
    raise unsupported(node, "moves values between the time axis and the channels")


# ---- lower ---------------------------------------------------------------------------------

def _blocksize(n: onnx.NodeProto, x: Act) -> int:
    b = int(attr(n, "blocksize", 0))
    if b < 1:
        raise UserError(f"{n.op_type} '{n.name}': blocksize {b} must be at least 1")
    if x.rank != 4:
        raise UserError(f"{n.op_type} '{n.name}': input of rank {x.rank}; ESP-DL's {n.op_type} "
                        "takes 4-D NCHW tensors")
    return b


def _swap_channel_groups(lw: Lowerer, n: onnx.NodeProto, a: Act, g0: int, g1: int,
                         out_name: str | None = None) -> str:
    """Channels (runtime, NHWC) read as [g0, g1] -> [g1, g0]: Reshape, Transpose, Reshape."""
    nn, c, h, w = a.shape
    rt = [nn, h, w, c]
    q = lw.qtype(a.dtype)
    five = Act(lw.fresh(f"{a.name}_groups"), a.exp, [nn, h, w, g0, g1], False, a.dtype)
    shp5 = lw.initializer(lw.fresh(f"{n.name}_shape5"), np.asarray(five.shape, np.int64), [0])
    lw.emit("Reshape", lw.fresh_node(f"{n.name}_Reshape5"), [a.name, shp5], [five.name],
            {"quant_type": q})
    lw.value_info(five)
    sw = Act(lw.fresh(f"{a.name}_swapped"), a.exp, [nn, h, w, g1, g0], False, a.dtype)
    lw.emit("Transpose", lw.fresh_node(f"{n.name}_Transpose"), [five.name], [sw.name],
            {"perm": [0, 1, 2, 4, 3], "quant_type": q})
    lw.value_info(sw)
    name = out_name or lw.fresh(f"{a.name}_reordered")
    shp4 = lw.initializer(lw.fresh(f"{n.name}_shape4"), np.asarray(rt, np.int64), [0])
    lw.emit("Reshape", lw.fresh_node(f"{n.name}_Reshape4"), [sw.name, shp4], [name],
            {"quant_type": q})
    if out_name is None:
        lw.value_info(Act(name, a.exp, a.shape, True, a.dtype))
    return name


def lower_depth_to_space(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.layout_as(lw.act(n.input[0], n), True)
    b = _blocksize(n, x)
    mode = attr(n, "mode", b"DCR")
    mode = (mode.decode() if isinstance(mode, bytes) else mode).upper()
    if mode not in ("DCR", "CRD"):
        raise UserError(f"DepthToSpace '{n.name}': mode {mode}; ONNX has DCR and CRD")
    co = x.shape[1] // (b * b)
    src = x.name
    if mode == "DCR" and co == 1:  # rule 2
        mode = "CRD"
    elif mode == "DCR" and co != b:
        src = _swap_channel_groups(lw, n, x, b * b, co)
        mode = "CRD"
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), True, x)
    lw.need_q(n, out)
    attrs: dict[str, Any] = {"blocksize": b, "mode": mode, "quant_type": lw.qtype(x.dtype)}
    lw.emit("DepthToSpace", n.name, [src], [name], attrs)
    lw.finish_output(out)


def lower_space_to_depth(lw: Lowerer, n: onnx.NodeProto) -> None:
    x = lw.layout_as(lw.act(n.input[0], n), True)
    b = _blocksize(n, x)
    c, h, w = x.shape[1:]
    if h % b or w % b:
        raise UserError(f"SpaceToDepth '{n.name}': height {h} and width {w} must be multiples "
                        f"of the blocksize {b}")
    oshape = lw.shape(n.output[0])
    name, out = lw.define_output(n.output[0], n, oshape, True, x)
    lw.need_q(n, out)
    q = lw.qtype(x.dtype)
    if c == 1 or b == 1:
        lw.emit("SpaceToDepth", n.name, [x.name], [name], {"blocksize": b, "quant_type": q})
    else:  # rule 3
        mid = Act(lw.fresh(f"{name}_crd"), x.exp, oshape, True, x.dtype)
        lw.emit("SpaceToDepth", n.name, [x.name], [mid.name], {"blocksize": b, "quant_type": q})
        lw.value_info(mid)
        _swap_channel_groups(lw, n, mid, c, b * b, out_name=name)
    lw.finish_output(out)


# ---- simulate ------------------------------------------------------------------------------

def _check4(node: Node, x: np.ndarray) -> None:
    if x.ndim != 4:
        raise UserError(f"node '{node.name}' ({node.op_type}): input of rank {x.ndim}; ESP-DL "
                        "takes [N, H, W, C]")


def sim_depth_to_space(sim: Simulator, node: Node) -> Fn:
    sim.same_exponent(node)
    b = int(node.attrs.get("blocksize", 2))
    mode = str(node.attrs.get("mode", "DCR") or "DCR")

    def fn(args: list) -> list:
        _check4(node, args[0])
        if args[0].shape[3] % (b * b):
            raise UserError(f"node '{node.name}': {args[0].shape[3]} channels is not a multiple "
                            f"of blocksize^2 = {b * b}")
        return [espdl_depth_to_space(args[0], b, mode)]

    return fn


def sim_space_to_depth(sim: Simulator, node: Node) -> Fn:
    sim.same_exponent(node)
    b = int(node.attrs.get("blocksize", 2))

    def fn(args: list) -> list:
        _check4(node, args[0])
        return [espdl_space_to_depth(args[0], b)]

    return fn


_STREAM = "time on the batch axis only"
register(OpSpec("DepthToSpace", MODULE, calibrate=share, calibrate_rule="input's exponent",
                stream=rule_space_depth, stream_rule=_STREAM, lower=lower_depth_to_space,
                espdl=("DepthToSpace",)))
register(OpSpec("SpaceToDepth", MODULE, calibrate=share, calibrate_rule="input's exponent",
                stream=rule_space_depth, stream_rule=_STREAM, lower=lower_space_to_depth,
                espdl=("SpaceToDepth",)))
register_sim(SimSpec("DepthToSpace", MODULE, sim_depth_to_space, ESPDL_GOLDEN))
register_sim(SimSpec("SpaceToDepth", MODULE, sim_space_to_depth, ESPDL_GOLDEN))

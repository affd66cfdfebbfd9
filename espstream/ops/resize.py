"""Resize, int8 only (ESP-DL's `Resize`: dl_module_resize.hpp, dl_base_resize.cpp / .hpp).

Calibrate: the output shares the input's exponent (nearest copies values; linear interpolates
inside the range of its inputs). Streamify: an axis resized by 1 passes the time axis; resizing
the time axis is refused (one output frame would need a fraction of an input frame's context).
Lower: ESP-DL's node, inputs [x, '', scales] (float32, ONNX order) or [x, '', '', sizes] (int64,
ONNX order) as ESP-PPQ writes them, attributes mode, coordinate_transformation_mode,
nearest_mode, cubic_coeff_a.

Rules (what ESP-DL 3.3 computes, and so what is refused):
1. int8 only: ESP-DL's int16 Resize kernel is empty (it writes nothing).
2. Rank 3 ([N, C, W]) or 4 ([N, C, H, W]); the scale of N and C must be 1; only the spatial
   axes are resized. scales / sizes must be constants; roi is ignored (as it is by ONNX for
   these modes); `axes`, antialias, cubic mode: refused.
3. nearest: ESP-DL always reads input index min(int(y * float32(1 / scale)), len - 1), i.e.
   coordinate_transformation_mode asymmetric with nearest_mode floor; other combinations are
   refused. Values are copied (rescaled only when the exponents differ).
4. linear: half_pixel (ESP-DL's default; pytorch_half_pixel agrees when every resized axis has
   more than one output) or align_corners (scale (out - 1) / (in - 1)); each resized axis of
   the input needs two or more entries (ESP-DL's clamp assumes it). In float32: q * 2^e_in,
   weights 1 - f and f from the source coordinate (clamped to the first / last entry), the
   width pass first, then the height pass, then round(v * 2^-e_out) with the target's
   rounding and saturation.
5. With sizes, the scales ESP-DL uses are float32(out / in).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Lowerer, attr, base_name
from espstream.ops.registry import ESPDL_GOLDEN, OpSpec, SimSpec, register, register_sim
from espstream.quant.plan import PlanCtx, share
from espstream.sim import Fn, Simulator, round_float, saturate
from espstream.stream.axes import Time
from espstream.stream.rules import Ctx, generic, pass_to_outputs, unsupported

MODULE = "resize"
F32 = np.float32


def _s(v: Any, default: str) -> str:
    if v is None:
        return default
    return v.decode() if isinstance(v, bytes) else str(v)


# ---- ESP-DL's arithmetic ---------------------------------------------------------------------

def _linear_coeffs(n_out: int, n_in: int, scale_inv: np.float32, align: bool):
    """ESP-DL's linear_coeffs in float32: source index and the two weights per output."""
    idx = np.empty(n_out, np.int64)
    r0 = np.empty(n_out, F32)
    r1 = np.empty(n_out, F32)
    for o in range(n_out):
        fx = F32(o) * scale_inv if align else (F32(o) + F32(0.5)) * scale_inv - F32(0.5)
        i = int(np.floor(fx))
        fx = F32(fx - F32(i))
        if i < 0:
            i, fx = 0, F32(0.0)
        if i >= n_in - 1:
            i, fx = n_in - 2, F32(1.0)
        idx[o], r0[o], r1[o] = i, F32(1.0) - fx, fx
    return idx, r0, r1


def espdl_scales(in_sp: list[int], scales: np.ndarray | None, sizes: np.ndarray | None,
                 ) -> tuple[list[np.float32], list[int]]:
    """(float32 scale, output length) per spatial axis, as ESP-DL derives them (rule 5)."""
    nsp = len(in_sp)
    if sizes is not None and np.size(sizes):
        out = [int(v) for v in np.asarray(sizes).reshape(-1)[2:2 + nsp]]
        return [F32(F32(o) / F32(i)) for o, i in zip(out, in_sp, strict=True)], out
    sc = [F32(v) for v in np.asarray(scales, F32).reshape(-1)[2:2 + nsp]]
    return sc, [int(F32(i) * s) for i, s in zip(in_sp, sc, strict=True)]


def espdl_resize(x: np.ndarray, e_in: int, e_out: int, mode: str, align: bool,
                 scales: list[np.float32], out_sp: list[int], rounding: str) -> np.ndarray:
    """ESP-DL's Resize of x in the runtime layout ([N, W, C] or [N, H, W, C])."""
    one = x.ndim == 3
    x4 = x[:, None] if one else x
    sc = [F32(1.0), *scales] if one else list(scales)
    osz = [1, *out_sp] if one else list(out_sp)
    n, h, w, c = x4.shape
    if mode == "nearest":
        inv = [F32(F32(1.0) / s) for s in sc]
        iy = np.minimum([int(F32(y) * inv[0]) for y in range(osz[0])], h - 1)
        ix = np.minimum([int(F32(v) * inv[1]) for v in range(osz[1])], w - 1)
        y = x4[:, iy][:, :, ix]
        if e_out != e_in:  # q * 2^(e_in - e_out), rounded (the C path)
            y = saturate(round_float(y.astype(F32) * F32(2.0 ** (e_in - e_out)), rounding),
                         x.dtype)
        else:
            y = y.copy()
    elif mode == "linear":
        if align:
            sc = [sc[0], sc[1]]
            sc = [F32(F32(o - 1) / F32(i - 1)) if i > 1 else s
                  for o, i, s in zip(osz, (h, w), sc, strict=True)]
            if one:
                sc[0] = F32(1.0)
        inv = [F32(F32(1.0) / s) for s in sc]
        if w < 2 or (not one and h < 2):
            raise UserError("Resize linear: every resized axis needs two or more input entries "
                            "(ESP-DL's clamp reads before the start otherwise)")
        xf = x4.astype(F32) * F32(2.0 ** e_in)
        ix, rx0, rx1 = _linear_coeffs(osz[1], w, inv[1], align)
        cols = xf[:, :, ix] * rx0[None, None, :, None] + xf[:, :, ix + 1] * rx1[None, None, :,
                                                                                 None]
        if one:
            v = cols
        else:
            iy, ry0, ry1 = _linear_coeffs(osz[0], h, inv[0], align)
            v = cols[:, iy] * ry0[None, :, None, None] + cols[:, iy + 1] * ry1[None, :, None,
                                                                               None]
        y = saturate(round_float((v.astype(F32) * F32(2.0 ** -e_out)).astype(F32), rounding),
                     x.dtype)
    else:
        raise UserError(f"Resize mode '{mode}': ESP-DL's int8 Resize has nearest and linear")
    return y[:, 0] if one else y


def onnx_resize_oracle(x: np.ndarray, mode: str, ctm: str, scales: list[float],
                       out_sp: list[int]) -> np.ndarray:
    """ONNX Resize over the spatial axes of NC(H)W float data, in float64 (the definition)."""
    y = np.asarray(x, np.float64)
    for k, (s, o) in enumerate(zip(scales, out_sp, strict=True)):
        ax = 2 + k
        n_in = y.shape[ax]
        i = np.arange(o, dtype=np.float64)
        if ctm == "align_corners":
            src = i * (n_in - 1) / (o - 1) if o > 1 else np.zeros(o)
        elif ctm == "asymmetric":
            src = i / s
        else:  # half_pixel
            src = (i + 0.5) / s - 0.5
        if mode == "nearest":  # floor
            y = np.take(y, np.clip(np.floor(src).astype(int), 0, n_in - 1), axis=ax)
            continue
        src = np.clip(src, 0, n_in - 1)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = (src - i0).reshape([-1 if a == ax else 1 for a in range(y.ndim)])
        y = np.take(y, i0, axis=ax) * (1 - f) + np.take(y, i1, axis=ax) * f
    return y


# ---- calibrate / streamify / lower -------------------------------------------------------

def _consts(get, n_inputs: list[str], where: str):
    scales = get(2) if len(n_inputs) > 2 and n_inputs[2] else None
    sizes = get(3) if len(n_inputs) > 3 and n_inputs[3] else None
    if (scales is None or not np.size(scales)) and (sizes is None or not np.size(sizes)):
        raise UserError(f"{where}: needs constant scales or sizes")
    if scales is not None and not np.size(scales):
        scales = None
    return scales, sizes


def calibrate_resize(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    for k in (2, 3):
        if len(n.input) > k and n.input[k] and n.input[k] not in pc.inits:
            raise UserError(f"node {n.name!r} (Resize): its {('scales', 'sizes')[k - 2]} must "
                            "be a constant; ESP-DL reads them from the model")
    share(pc, n, float_outs)


def rule_resize(ctx: Ctx, node: gs.Node) -> None:
    """1. Time on an axis resized by exactly 1 (or the batch axis): passes. 2. Otherwise
    refused."""
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    shape_in = ctx.shapes.get(x.name)
    shape_out = ctx.shapes.get(node.outputs[0].name)
    if xt.axis != 0 and (shape_in is None or shape_out is None
                         or shape_in[xt.axis] != shape_out[xt.axis]):
        raise unsupported(node, "resizes the time axis")
    return pass_to_outputs(ctx, node, xt)


def lower_resize(lw: Lowerer, n: onnx.NodeProto) -> None:
    where = f"Resize '{n.name}'"
    x = lw.layout_as(lw.act(n.input[0], n), True)
    if x.dtype != np.dtype(np.int8):
        raise UserError(f"{where}: {x.dtype} data; ESP-DL's Resize is int8 only (its int16 "
                        "kernel writes nothing)")
    if x.rank not in (3, 4):
        raise UserError(f"{where}: rank {x.rank}; ESP-DL resizes [N, C, W] or [N, C, H, W]")
    if attr(n, "axes") is not None or int(attr(n, "antialias", 0)):
        raise UserError(f"{where}: axes / antialias are not supported by ESP-DL")
    mode = _s(attr(n, "mode"), "nearest")
    ctm = _s(attr(n, "coordinate_transformation_mode"), "half_pixel")
    nmode = _s(attr(n, "nearest_mode"), "round_prefer_floor")
    scales, sizes = _consts(lambda k: lw.int_const(n, k, ("roi", "", "scales", "sizes")[k]),
                            list(n.input), where)
    rt_sizes = None if sizes is None else np.asarray(sizes, np.int64).reshape(-1)
    rt_scales = None if scales is None else np.asarray(scales, F32).reshape(-1)
    full = rt_sizes / np.asarray(x.shape) if rt_sizes is not None else rt_scales
    if len(full) != x.rank or full[0] != 1 or full[1] != 1:
        raise UserError(f"{where}: resizes the batch or channel axis; ESP-DL resizes only "
                        "the spatial axes")
    out_shape = lw.shape(n.output[0])
    _, out_sp = espdl_scales(list(x.shape[2:]), rt_scales, rt_sizes)
    if list(out_shape[2:]) != out_sp:
        raise UserError(f"{where}: ESP-DL's output size {out_sp} differs from ONNX's "
                        f"{list(out_shape[2:])}")
    if mode == "nearest":
        if ctm != "asymmetric" or nmode != "floor":
            raise UserError(f"{where}: nearest with {ctm} / {nmode}; ESP-DL's nearest is "
                            "asymmetric with floor only")
    elif mode == "linear":
        if ctm == "pytorch_half_pixel" and min(out_sp) > 1:
            ctm = "half_pixel"
        if ctm not in ("half_pixel", "align_corners"):
            raise UserError(f"{where}: linear with {ctm}; ESP-DL's linear is half_pixel or "
                            "align_corners")
        resized = [i for i, o in zip(x.shape[2:], out_sp, strict=True)]
        if min(resized) < 2:
            raise UserError(f"{where}: linear over an axis of length 1 (ESP-DL's kernel reads "
                            "before the start)")
    else:
        raise UserError(f"{where}: mode {mode}; ESP-DL's Resize has nearest and linear")
    name, out = lw.define_output(n.output[0], n, out_shape, True, x)
    lw.need_q(n, out)
    ins = [x.name, ""]
    if rt_sizes is not None:
        ins += ["", lw.initializer(base_name(n.input[3]), rt_sizes, [0])]
    else:
        ins.append(lw.initializer(base_name(n.input[2]), rt_scales.astype(F32), [0]))
    lw.emit("Resize", n.name, ins, [name], {
        "coordinate_transformation_mode": ctm, "cubic_coeff_a": float(attr(n, "cubic_coeff_a",
                                                                           -0.75)),
        "mode": mode, "nearest_mode": nmode, "quant_type": lw.qtype(x.dtype)})
    lw.finish_output(out)


def sim_resize(sim: Simulator, node: Node) -> Fn:
    where = f"node '{node.name}' (Resize)"
    mode = _s(node.attrs.get("mode"), "nearest")
    align = _s(node.attrs.get("coordinate_transformation_mode"), "") == "align_corners"

    def get(k: int):
        return sim.init(node, k, ("roi", "", "scales", "sizes")[k])

    scales, sizes = _consts(get, node.inputs, where)
    e_in, e_out = sim.exp(node.inputs[0]), sim.exp(node.outputs[0])

    def fn(args: list) -> list:
        x = args[0]
        if x.dtype != np.dtype(np.int8):
            raise UserError(f"{where}: {x.dtype} data; ESP-DL's Resize is int8 only")
        if x.ndim not in (3, 4):
            raise UserError(f"{where}: rank {x.ndim}; ESP-DL takes 3-D or 4-D")
        sc, out_sp = espdl_scales(list(x.shape[1:-1]), scales, sizes)
        return [espdl_resize(x, e_in, e_out, mode, align, sc, out_sp, sim.rounding)]

    return fn


register(OpSpec("Resize", MODULE, calibrate=calibrate_resize, calibrate_rule="input's exponent",
                stream=rule_resize, stream_rule="time on an axis it does not resize",
                lower=lower_resize, espdl=("Resize",), bits=(8,)))
register_sim(SimSpec("Resize", MODULE, sim_resize, ESPDL_GOLDEN))

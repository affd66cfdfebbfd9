"""Per-channel affine maps `y * scale + shift`: absorbed into a layer's weights and bias, read
off a BatchNormalization, or written as a Mul and an Add."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import attr, constant, is_absent

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm")


def out_channels(node: gs.Node) -> int | None:
    """Number of output channels of a Conv / ConvTranspose / Gemm with constant weights."""
    w = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return None
    if node.op == "Conv":
        return w.shape[0]
    if node.op == "ConvTranspose":
        return w.shape[1] * int(attr(node, "group", 1))
    if node.op == "Gemm" and w.ndim == 2:
        return w.shape[0] if attr(node, "transB", 0) else w.shape[1]
    return None


def _bias(node: gs.Node, n: int) -> np.ndarray | None:
    """The effective per-channel bias (zeros when absent), or None if it is not per channel."""
    if len(node.inputs) < 3 or is_absent(node.inputs[2]):
        return np.zeros(n, dtype=np.float64)
    b = constant(node.inputs[2])
    if b is None:
        return None
    b = b.astype(np.float64)
    if node.op == "Gemm":
        if b.size not in (1, n) or (b.ndim == 2 and b.shape[0] != 1):
            return None
        b = np.broadcast_to(b.reshape(-1), (n,)) * float(attr(node, "beta", 1.0))
    return np.array(b.reshape(n), dtype=np.float64)


def absorb_affine(node: gs.Node, scale: np.ndarray, shift: np.ndarray) -> bool:
    """Rewrite `node` so its output becomes `output * scale + shift` per channel.

    Returns False (and changes nothing) when the weights or bias are not constants of a
    per-channel form. New constant tensors are created, so weights shared with other nodes
    are not touched.
    """
    n = out_channels(node)
    bias = _bias(node, n) if n is not None else None
    if n is None or bias is None or scale.shape != (n,) or shift.shape != (n,):
        return False
    w = constant(node.inputs[1])
    dtype = w.dtype
    w = w.astype(np.float64)
    if node.op == "Conv":
        w = w * scale.reshape((n,) + (1,) * (w.ndim - 1))
    elif node.op == "ConvTranspose":
        g = int(attr(node, "group", 1))
        grouped = w.reshape((g, w.shape[0] // g) + w.shape[1:])
        grouped = grouped * scale.reshape((g, 1, n // g) + (1,) * (w.ndim - 2))
        w = grouped.reshape(w.shape)
    elif attr(node, "transB", 0):
        w = w * scale[:, None]
    else:
        w = w * scale[None, :]
    new_bias = bias * scale + shift
    base = node.name or node.outputs[0].name
    node.inputs[1] = gs.Constant(f"{base}.folded_weight", w.astype(dtype))
    bias_const = gs.Constant(f"{base}.folded_bias", new_bias.astype(dtype))
    if len(node.inputs) < 3:
        node.inputs.append(bias_const)
    else:
        node.inputs[2] = bias_const
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    return True


def channel_vector(value: np.ndarray, n: int | None, out_shape) -> np.ndarray | None:
    """`value` as n per-channel float64 numbers when, broadcast against a tensor of shape
    `out_shape` with n channels on axis 1, it acts per channel without changing the shape (a
    scalar, or 1 on every axis but axis 1); else None."""
    if n is None or not np.issubdtype(value.dtype, np.floating):
        return None
    if value.size == 1 and value.ndim <= 1:
        return np.full(n, float(value.reshape(-1)[0]))
    rank = len(out_shape) if out_shape is not None else None
    if rank is None or value.ndim > rank or value.ndim < rank - 1:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for k, d in enumerate(shape) if k != 1) or shape[1] not in (1, n):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (n,)).copy()


def batchnorm_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) in float64 with `bn(x) = x * s + t` per channel, for a BatchNormalization in
    inference form (`training_mode` 0, only its first output used) with constant scale, bias,
    mean and variance; else None."""
    if attr(bn, "training_mode", 0) or any(o.outputs for o in bn.outputs[1:]):
        return None
    params = [constant(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    s = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return s, beta - mean * s


def affine_nodes(x: gs.Variable, out: gs.Variable, scale: np.ndarray, shift: np.ndarray,
                 base: str, mul: bool = True, add: bool = True) -> list[gs.Node]:
    """`Mul(x, scale)` then `Add(., shift)` writing `out`, per channel on axis 1 of x (constants
    shaped [C, 1, ..., 1] in x's type); `mul` / `add` False leaves that node out."""
    dtype = np.dtype(x.dtype)
    shape = (-1,) + (1,) * (len(x.shape) - 2)
    nodes: list[gs.Node] = []
    cur = x
    if mul:
        y = out if not add else gs.Variable(f"{base}.scaled", dtype=x.dtype, shape=x.shape)
        nodes.append(gs.Node("Mul", f"{base}.mul", inputs=[
            cur, gs.Constant(f"{base}.scale", scale.reshape(shape).astype(dtype))], outputs=[y]))
        cur = y
    if add:
        nodes.append(gs.Node("Add", f"{base}.add", inputs=[
            cur, gs.Constant(f"{base}.shift", shift.reshape(shape).astype(dtype))],
            outputs=[out]))
    return nodes

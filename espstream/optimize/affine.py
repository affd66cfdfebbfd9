"""Absorb a per-output-channel affine map `y * scale + shift` into a layer's weights and bias."""

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

"""Fuse the decomposed layer normalization older exporters write into LayerNormalization."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import attr, constant

LAYERNORM_OPSET = 17
# operators whose meaning changed between opset 13 and 17 (raising the opset would alter them)
_CHANGED_BY_17 = ("RoiAlign",)


def _sole_reader(t: gs.Tensor, graph: gs.Graph, op: str | tuple[str, ...]) -> gs.Node | None:
    """The one node reading `t` (read once), if it has type `op` and `t` is not an output."""
    if t in graph.outputs or len(t.outputs) != 1:
        return None
    node = t.outputs[0]
    return node if node.op in ((op,) if isinstance(op, str) else op) else None


def _reduce_axes(node: gs.Node, rank: int) -> list[int] | None:
    """Sorted non-negative axes of a keepdims ReduceMean, or None."""
    if int(attr(node, "keepdims", 1)) != 1:
        return None
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant(node.inputs[1])
    if axes is None:
        return None
    axes = sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))
    return axes if len(set(axes)) == len(axes) else None


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The input of a two-input node that is not `t` (None when both are `t`)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    return b if a is t and b is not t else a if b is t and a is not t else None


def _scalar(t: gs.Tensor | None) -> float | None:
    v = constant(t)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _param(t: gs.Tensor | None, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """A constant acting only along the normalized axes, broadcast to their full shape."""
    v = constant(t)
    rank = len(shape)
    if v is None or v.ndim > rank:
        return None
    full = v.reshape((1,) * (rank - v.ndim) + v.shape)
    if any(d != 1 for d in full.shape[:axis]):
        return None
    try:
        return np.broadcast_to(full.reshape(full.shape[axis:]), shape[axis:]).copy()
    except ValueError:
        return None


def _match(mean: gs.Node, graph: gs.Graph) -> dict | None:
    """The pattern starting at the first ReduceMean, or None."""
    x = mean.inputs[0]
    if x.shape is None or x.dtype is None or np.dtype(x.dtype) != np.float32:
        return None
    shape = x.shape
    rank = len(shape)
    axes = _reduce_axes(mean, rank) if rank else None
    if not axes or axes != list(range(axes[0], rank)):
        return None
    axis = axes[0]
    if not all(isinstance(d, int) and d > 0 for d in shape[axis:]):
        return None
    sub = _sole_reader(mean.outputs[0], graph, "Sub")
    if sub is None or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return None
    d = sub.outputs[0]
    readers = list(d.outputs)
    if d in graph.outputs or len({id(r) for r in readers}) != 2:
        return None
    square = next((r for r in readers if r.op in ("Pow", "Mul")), None)
    div = next((r for r in readers if r.op == "Div"), None)
    if square is None or div is None or div.inputs[0] is not d:
        return None
    if square.op == "Pow" and (square.inputs[0] is not d or _scalar(square.inputs[1]) != 2.0):
        return None
    if square.op == "Mul" and not (square.inputs[0] is d and square.inputs[1] is d):
        return None
    var = _sole_reader(square.outputs[0], graph, "ReduceMean")
    if var is None or _reduce_axes(var, rank) != axes:
        return None
    add = _sole_reader(var.outputs[0], graph, "Add")
    eps = _scalar(_other(add, var.outputs[0])) if add is not None else None
    if eps is None or eps < 0:
        return None
    sqrt = _sole_reader(add.outputs[0], graph, "Sqrt")
    if sqrt is None or _sole_reader(sqrt.outputs[0], graph, "Div") is not div \
            or div.inputs[1] is not sqrt.outputs[0]:
        return None
    nodes = [mean, sub, square, var, add, sqrt, div]
    out, scale, bias = div.outputs[0], None, None
    mul = _sole_reader(out, graph, "Mul")
    if mul is not None and (scale := _param(_other(mul, out), shape, axis)) is not None:
        nodes.append(mul)
        out = mul.outputs[0]
    badd = _sole_reader(out, graph, "Add")
    if badd is not None and (bias := _param(_other(badd, out), shape, axis)) is not None:
        nodes.append(badd)
        out = badd.outputs[0]
    if scale is None:
        scale = np.ones(shape[axis:], dtype=np.float32)
    return {"x": x, "out": out, "axis": axis, "eps": eps, "scale": scale.astype(np.float32),
            "bias": None if bias is None else bias.astype(np.float32), "nodes": nodes}


def fuse_layernorm(graph: gs.Graph) -> bool:
    """Fuse ReduceMean / Sub / Pow / ReduceMean / Add / Sqrt / Div (/ Mul / Add) into one
    LayerNormalization.

    Rules:
    1. The pattern: m = ReduceMean(x, axes), d = Sub(x, m), s = Pow(d, 2) (or Mul(d, d)),
       v = ReduceMean(s, axes), n = Div(d, Sqrt(Add(v, eps))), then optionally Mul(n, gamma)
       and Add(., beta). x is float32 with a known rank; both ReduceMeans keep dims and reduce
       the same axes, which are the trailing axes from some `axis` on, of static sizes; eps is
       a constant of one element (either operand of the Add).
    2. Every intermediate tensor is read only inside the pattern (d by the square and the
       Div, the others by the next node) and is not a graph output.
    3. gamma / beta are constants that vary only along the normalized axes (size 1 before
       `axis`, once aligned to x's rank); they are broadcast to the normalized shape as
       LayerNormalization's Scale / B. Without the Mul the Scale is ones; without the Add
       there is no B. A Mul or Add that does not fit is left after the fused node.
    4. The nodes become one `LayerNormalization(x, Scale, B)` with that `axis` and
       `epsilon` = eps, writing the last matched node's output tensor.
    5. LayerNormalization is opset 17: a model of opset 13 to 16 is raised to 17 (no
       operator's meaning changes between them but RoiAlign's: a graph holding RoiAlign, or
       older than opset 13, is left as it is).
    """
    if graph.opset < 13 or any(n.op in _CHANGED_BY_17 for n in graph.nodes):
        return False
    changed = False
    for mean in [n for n in graph.nodes if n.op == "ReduceMean"]:
        if not mean.outputs:
            continue  # consumed by an earlier fusion
        found = _match(mean, graph)
        if found is None:
            continue
        base = mean.name or found["out"].name
        inputs = [found["x"], gs.Constant(f"{base}.ln_scale", found["scale"])]
        if found["bias"] is not None:
            inputs.append(gs.Constant(f"{base}.ln_bias", found["bias"]))
        out = found["out"]
        for node in found["nodes"]:
            node.inputs.clear()
            node.outputs.clear()
        graph.nodes.append(gs.Node("LayerNormalization", f"{base}.layernorm",
                                   attrs={"axis": found["axis"], "epsilon": found["eps"]},
                                   inputs=inputs, outputs=[out]))
        changed = True
    if changed:
        graph.opset = max(graph.opset, LAYERNORM_OPSET)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return changed

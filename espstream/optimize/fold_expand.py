"""Fold an Expand or Tile of a constant: dropped where its readers broadcast anyway, else
computed once."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import constant, replace_uses

# ONNX operators with multidirectional (numpy) broadcasting of every input
BROADCASTING = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Equal", "Greater",
                "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Where")


def expand_of_constant(node: gs.Node) -> bool:
    """An Expand or Tile whose data is a constant (`fold_constants` leaves these to us)."""
    return node.op in ("Expand", "Tile") and isinstance(node.inputs[0], gs.Constant)


def _static(shape) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return tuple(shape)


def _result(node: gs.Node) -> np.ndarray | None:
    """The node's output computed with NumPy, when its shape / repeats input is constant."""
    data, arg = constant(node.inputs[0]), constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if data is None or arg is None:
        return None
    arg = [int(v) for v in np.asarray(arg).reshape(-1)]
    try:
        if node.op == "Expand":
            return np.array(data * np.ones(arg, dtype=data.dtype), dtype=data.dtype)
        return np.tile(data, arg) if len(arg) == data.ndim else None
    except ValueError:
        return None  # not broadcastable: leave the error to onnxruntime


def _broadcasts_alike(node: gs.Node) -> bool:
    """Every reader of the node's output broadcasts its inputs, and gives the same output
    shape when it reads the node's (constant) data instead."""
    data = constant(node.inputs[0])
    out = node.outputs[0]
    if node.op == "Tile":
        reps = constant(node.inputs[1])
        if reps is None or any(r != 1 and d != 1 for r, d in
                               zip(np.asarray(reps).reshape(-1), data.shape, strict=False)):
            return False  # a Tile repeating real values is not a broadcast
    expanded = _static(out.shape)
    if expanded is None or not out.outputs:
        return False
    for reader in out.outputs:
        if reader.op not in BROADCASTING:
            return False
        shapes = [_static(t.shape) if t is not out else expanded for t in reader.inputs]
        if any(s is None for s in shapes):
            return False
        small = [data.shape if t is out else s for t, s in zip(reader.inputs, shapes, strict=True)]
        try:
            if np.broadcast_shapes(*small) != np.broadcast_shapes(*shapes):
                return False
        except ValueError:
            return False
    return True


def fold_expand(graph: gs.Graph) -> bool:
    """Fold every Expand / Tile of a constant.

    Rules:
    1. The node is an Expand, or a Tile, whose data input is a constant c; its output is not a
       graph output.
    2. When every reader broadcasts its inputs (Add, Sub, Mul, Div, Pow, Max, Min, Mod, the
       comparisons, And / Or / Xor, Where) and, all shapes being static, reading c itself gives
       the reader the same output shape, the readers read c and the node goes: the constant
       stays as small as the exporter wrote it (`x * c.expand_as(x)` stays `x * c`, so
       `merge_affine` and the quantizer see a per-channel constant). A Tile counts only when it
       repeats axes of size 1 (then it is a broadcast).
    3. Otherwise, when its shape (Expand) or repeats (Tile) input is a constant too, the
       output is computed once with NumPy (ONNX's broadcasting; numpy.tile) and replaces it.
    4. Anything else (a shape computed at run time, shapes that do not broadcast) is left.
    """
    changed = False
    for node in [n for n in graph.nodes if expand_of_constant(n)]:
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        if _broadcasts_alike(node):
            replace_uses(out, node.inputs[0])
        else:
            value = _result(node)
            if value is None:
                continue
            replace_uses(out, gs.Constant(f"{out.name}.folded", value))
        node.inputs.clear()
        node.outputs.clear()
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed

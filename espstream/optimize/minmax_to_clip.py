"""Rewrite Max / Min against a scalar constant as the Clip ESP-DL runs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import constant, is_absent, only_consumer


def _bound(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
    """(data input, scalar bound) of a two-input Max / Min with one constant of one element
    that cannot change the output's shape."""
    if node.op not in ("Max", "Min") or len(node.inputs) != 2:
        return None
    for i in (0, 1):
        x, c = node.inputs[i], node.inputs[1 - i]
        value = constant(c)
        if value is None or constant(x) is not None or value.size != 1 or x.dtype is None:
            continue
        if not np.issubdtype(np.dtype(x.dtype), np.floating) or np.dtype(x.dtype) != value.dtype:
            continue
        if x.shape is None or value.ndim > len(x.shape):
            continue  # the constant would add axes to the result
        return x, value.reshape(())
    return None


def _clip_bounds(node: gs.Node) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    if node.op != "Clip":
        return None
    lo = constant(node.inputs[1]) if len(node.inputs) > 1 and not is_absent(node.inputs[1]) \
        else None
    hi = constant(node.inputs[2]) if len(node.inputs) > 2 and not is_absent(node.inputs[2]) \
        else None
    if (len(node.inputs) > 1 and not is_absent(node.inputs[1]) and lo is None) or \
            (len(node.inputs) > 2 and not is_absent(node.inputs[2]) and hi is None):
        return None  # a bound computed at run time
    return lo, hi


def minmax_to_clip(graph: gs.Graph) -> bool:
    """Turn `Max(x, c)` into `Clip(x, c, -)` and `Min(x, c)` into `Clip(x, -, c)`.

    Rules:
    0. The model's opset is 11 or newer (Clip takes its bounds as inputs).
    1. The Max / Min has exactly two inputs: data x of a float type and a constant c of one
       element, of x's type, with no more axes than x (so it broadcasts without changing the
       output's shape). Either input order.
    2. Max(x, c) becomes Clip(x, min=c); Min(x, c) becomes Clip(x, max=c); c becomes a 0-d
       constant (Clip's bounds are scalars) and the output tensor keeps its name.
    3. A Clip with constant bounds whose input is written by another such Clip read by
       nothing else (`x.clamp_min(a).clamp_max(b)`) becomes one Clip with the tighter bounds
       (max of the mins, min of the maxes) when both intervals and their intersection are
       non-empty; otherwise (ONNX's min > max case) the pair is left as it is.
    """
    if graph.opset < 11:
        return False  # Clip's bounds were attributes before opset 11
    changed = False
    for node in [n for n in graph.nodes if n.op in ("Max", "Min")]:
        found = _bound(node)
        if found is None:
            continue
        x, c = found
        bound = gs.Constant(f"{node.name or node.outputs[0].name}.bound", np.array(c))
        inputs = [x, bound] if node.op == "Max" else [x, gs.Variable.empty(), bound]
        node.op = "Clip"
        node.inputs.clear()
        node.inputs.extend(inputs)
        node.attrs.clear()
        changed = True
    changed |= _merge_clips(graph)
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _merge_clips(graph: gs.Graph) -> bool:
    changed = False
    for outer in [n for n in graph.nodes if n.op == "Clip"]:
        if not outer.inputs or not outer.outputs:
            continue
        x = outer.inputs[0]
        inner = x.inputs[0] if len(x.inputs) == 1 else None
        if inner is None or inner.op != "Clip" or only_consumer(x, graph) is not outer:
            continue
        a, b = _clip_bounds(inner), _clip_bounds(outer)
        if a is None or b is None:
            continue
        (lo1, hi1), (lo2, hi2) = a, b
        lo = _pick(np.maximum, lo1, lo2)
        hi = _pick(np.minimum, hi1, hi2)
        if any(p is not None and q is not None and p > q
               for p, q in ((lo1, hi1), (lo2, hi2), (lo, hi))):
            continue  # an empty interval or none in common: Clip's min > max case, keep both
        name = outer.name or outer.outputs[0].name
        bounds = [
            inner.inputs[0],
            gs.Constant(f"{name}.min", lo.reshape(())) if lo is not None else gs.Variable.empty(),
            gs.Constant(f"{name}.max", hi.reshape(())) if hi is not None else gs.Variable.empty(),
        ]
        outer.inputs.clear()
        outer.inputs.extend(bounds)
        inner.inputs.clear()
        inner.outputs.clear()
        changed = True
    return changed


def _pick(fn, a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:
        return b if a is None else a
    return np.asarray(fn(a.reshape(()), b.reshape(())), dtype=a.dtype)

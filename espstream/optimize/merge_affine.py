"""Collapse a chain of per-channel constant Mul and Add nodes into one Mul and one Add."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import constant, only_consumer
from espstream.optimize.affine import affine_nodes, channel_vector


def _step(node: gs.Node) -> tuple[gs.Tensor, str, np.ndarray] | None:
    """(data input, op, per-channel constant) of a Mul / Add by a per-channel constant."""
    if node.op not in ("Mul", "Add") or len(node.inputs) != 2:
        return None
    for i in (0, 1):
        x, c = node.inputs[i], node.inputs[1 - i]
        value = constant(c)
        if value is None or constant(x) is not None or x.shape is None or len(x.shape) < 2:
            continue
        n = x.shape[1]
        vec = channel_vector(value, n if isinstance(n, int) else None, x.shape)
        if vec is not None and x.dtype is not None and np.dtype(x.dtype) == value.dtype:
            return x, node.op, vec
    return None


def merge_affine(graph: gs.Graph) -> bool:
    """Merge `x -> Mul/Add(c1) -> Mul/Add(c2) -> ...` into `Mul(x, S) -> Add(., B)`.

    Rules:
    1. Each node of the chain is a Mul or an Add of the data by a constant that acts per
       channel (axis 1): a scalar, or 1 on every axis but the channel axis, of the data's
       type; each intermediate tensor is read by the next node only and is not a graph output.
    2. A chain of two or more such nodes, other than one Mul followed by one Add, computes
       x * S + B per channel (composed in float64); it becomes `Mul(x, S)` then `Add(., B)`,
       without the Mul when S is all ones or the Add when B is all zeros, and the last node's
       output tensor keeps its name. A chain that reduces to x itself is left alone.
    """
    changed = False
    for start in list(graph.nodes):
        first = _step(start)
        if first is None:
            continue
        x = first[0]
        if len(x.inputs) == 1 and _step(x.inputs[0]) and only_consumer(x, graph) is start:
            continue  # not the head of its chain
        chain, steps = [start], [first]
        while True:
            nxt = only_consumer(chain[-1].outputs[0], graph)
            step = _step(nxt) if nxt is not None else None
            if step is None or step[0] is not chain[-1].outputs[0]:
                break
            chain.append(nxt)
            steps.append(step)
        if len(chain) < 2 or [s[1] for s in steps] == ["Mul", "Add"]:
            continue
        n = len(first[2])
        scale, shift = np.ones(n), np.zeros(n)
        for _x, op, vec in steps:
            if op == "Mul":
                scale, shift = scale * vec, shift * vec
            else:
                shift = shift + vec
        mul_needed, add_needed = not np.all(scale == 1.0), not np.all(shift == 0.0)
        if not (mul_needed or add_needed):
            continue
        out = chain[-1].outputs[0]
        nodes = affine_nodes(x, out, scale, shift, base=chain[0].name or out.name,
                             mul=mul_needed, add=add_needed)
        for node in chain:
            node.inputs.clear()
            node.outputs.clear()
        graph.nodes.extend(nodes)
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return changed

"""Remove a Cast to the type its input already has."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.graph import attr


def remove_cast(graph: gs.Graph) -> bool:
    """Turn a Cast (or CastLike) that changes nothing into an Identity.

    Rules:
    1. A Cast whose `to` type is its input's element type (known from the input's dtype:
       shape inference, a constant's values or a graph input), or a CastLike whose two
       inputs have the same element type, computes its input unchanged.
    2. It becomes an Identity with the same input and output, which `remove_identity`
       (the next pass) removes, with its rules for graph inputs and outputs.
    3. A Cast whose input type is unknown is left alone.
    """
    changed = False
    for node in [n for n in graph.nodes if n.op in ("Cast", "CastLike")]:
        src = _dtype(node.inputs[0].dtype)
        if node.op == "Cast":
            to = attr(node, "to")
            dst = _dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to))) if to is not None \
                else None
        else:
            dst = _dtype(node.inputs[1].dtype) if len(node.inputs) > 1 else None
        if src is None or dst is None or src != dst:
            continue
        node.op = "Identity"
        while len(node.inputs) > 1:
            node.inputs.pop()
        node.attrs.clear()
        changed = True
    return changed


def _dtype(value) -> np.dtype | None:
    if value is None:
        return None
    try:
        return np.dtype(value)
    except TypeError:
        return None

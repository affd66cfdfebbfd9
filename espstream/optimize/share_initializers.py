"""Share identical initializers."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import replace_uses


def share_initializers(graph: gs.Graph) -> bool:
    """Make nodes that read equal constants read one copy.

    Rules:
    1. Two constants are equal when their dtype, shape and bytes are equal (a 0-d scalar and
       a 1-element 1-D constant of the same value are not: Slice, Unsqueeze, Gather read
       them differently).
    2. Every reader of a duplicate reads the first constant of its kind (in node order)
       instead; the duplicate then has no reader and is dropped on export.
    3. Graph outputs are never replaced.
    """
    seen: dict[tuple, gs.Constant] = {}
    changed = False
    for tensor in list(graph.tensors().values()):
        if not isinstance(tensor, gs.Constant) or tensor in graph.outputs:
            continue
        values = np.asarray(tensor.values)  # not ascontiguousarray: it makes a 0-d array 1-D
        digest = hashlib.sha1(np.ascontiguousarray(values).tobytes()).hexdigest()
        key = (values.dtype.str, values.shape, digest)
        first = seen.setdefault(key, tensor)
        if first is not tensor and tensor.outputs:
            replace_uses(tensor, first)
            changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed

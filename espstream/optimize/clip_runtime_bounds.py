"""Rewrite a Clip whose bound is computed at run time as Sub / Relu / Add, which ESP-DL runs.

ESP-DL's Clip reads its min and max once, as constants; a bound computed from the input
(`x.clamp(min=x.max() - 80)`, torchaudio's `AmplitudeToDB` top_db: openWakeWord's mel front end)
has no ESP-DL form as a Clip, but max(x, m) = x + relu(m - x) and min(x, M) = x - relu(x - M)
use only operators ESP-DL has. Written around x (not m + relu(x - m)): where the bound does not
bite, the correction is 0 and x keeps its own quantization step, instead of being the
difference of two large numbers (the top_db floor sits 80 dB below the values it lets pass).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import constant, is_absent


def _runtime(node: gs.Node, k: int) -> gs.Tensor | None:
    """Clip's input k (1: min, 2: max) when present and computed at run time."""
    if len(node.inputs) <= k or is_absent(node.inputs[k]) or constant(node.inputs[k]) is not None:
        return None
    return node.inputs[k]


def _scalar(t: gs.Tensor) -> bool:
    return t.shape is not None and all(isinstance(d, int) for d in t.shape) \
        and int(np.prod(t.shape, dtype=np.int64)) == 1


def clip_runtime_bounds(graph: gs.Graph) -> bool:
    """Replace the run-time bounds of every Clip by Sub / Relu / Add.

    Rules:
    1. The Clip (opset 11 or newer: bounds as inputs) has a float data input x and a min or
       max input that is neither absent nor a constant, of one element with a static shape
       (ONNX makes Clip's bounds scalars).
    2. Clip computes min(max(x, lo), hi); a run-time lo becomes y = x + Relu(lo - x) and a
       run-time hi becomes y - Relu(y - hi), in that order; a constant bound stays a Clip
       with only that bound, applied in its place in that order (a constant lo before the
       run-time hi, a constant hi after the run-time lo).
    3. The Clip's output tensor keeps its name (it is written by the last new node); the new
       tensors are named `<Clip name>/...`.
    4. The result equals the Clip up to float rounding of one subtraction and one addition
       (the optimize check compares it); where the run-time min exceeds the max, as in Clip,
       the max wins.
    """
    if graph.opset < 11:
        return False
    changed = False
    for node in [n for n in graph.nodes if n.op == "Clip"]:
        if not node.inputs or not node.outputs:
            continue
        lo, hi = _runtime(node, 1), _runtime(node, 2)
        if lo is None and hi is None:
            continue
        x = node.inputs[0]
        if x.dtype is None or not np.issubdtype(np.dtype(x.dtype), np.floating):
            continue
        if any(b is not None and not _scalar(b) for b in (lo, hi)):
            continue
        lo_c = None if lo is not None or len(node.inputs) < 2 or is_absent(node.inputs[1]) \
            else node.inputs[1]
        hi_c = None if hi is not None or len(node.inputs) < 3 or is_absent(node.inputs[2]) \
            else node.inputs[2]
        out = node.outputs[0]
        new = _rewrite(node.name or out.name, out, x, lo, hi, lo_c, hi_c)
        node.inputs.clear()
        node.outputs.clear()
        new[-1].outputs.clear()
        new[-1].outputs.append(out)  # rule 3: the output keeps its name and its readers
        index = graph.nodes.index(node)
        graph.nodes[index:index + 1] = new
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return changed


def _rewrite(name: str, out: gs.Variable, x: gs.Tensor, lo: gs.Tensor | None,
             hi: gs.Tensor | None, lo_c: gs.Tensor | None, hi_c: gs.Tensor | None
             ) -> list[gs.Node]:
    """The nodes of rule 2, in order; the last one's output is rewired by the caller."""
    new: list[gs.Node] = []

    def emit(op: str, tag: str, inputs: list) -> gs.Variable:
        y = gs.Variable(f"{name}/{tag}", dtype=out.dtype, shape=out.shape)
        new.append(gs.Node(op, f"{name}/{tag}", inputs=inputs, outputs=[y]))
        return y

    y = x
    if lo_c is not None:
        y = emit("Clip", "const_min", [y, lo_c])
    if lo is not None:
        r = emit("Relu", "relu_min", [emit("Sub", "min_minus_x", [lo, y])])
        y = emit("Add", "at_least_min", [y, r])
    if hi is not None:
        r = emit("Relu", "relu_max", [emit("Sub", "x_minus_max", [y, hi])])
        y = emit("Sub", "at_most_max", [y, r])
    if hi_c is not None:
        emit("Clip", "const_max", [y, gs.Variable.empty(), hi_c])
    return new

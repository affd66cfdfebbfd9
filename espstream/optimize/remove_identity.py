"""Remove Identity and inference-mode Dropout."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from espstream.graph import constant, is_absent, replace_uses


def remove_identity(graph: gs.Graph) -> bool:
    """Remove nodes that pass their input through unchanged.

    Rules:
    1. Identity is removed; so is Dropout when it is in inference form: `training_mode`
       absent or a constant false, and its `mask` output unused.
    2. Consumers of the removed node's output read its input instead.
    3. When that output is a graph output, the input tensor takes over the output's name and
       place, unless the input is itself a graph input or output (then the node stays, since
       ONNX needs a node between two graph tensors).
    """
    changed = False
    for node in [n for n in graph.nodes if n.op in ("Identity", "Dropout")]:
        if node.op == "Dropout" and not _is_inference_dropout(node):
            continue
        x, y = node.inputs[0], node.outputs[0]
        if y in graph.outputs:
            if x in graph.inputs or x in graph.outputs or isinstance(x, gs.Constant):
                continue
            replace_uses(y, x)
            graph.outputs[graph.outputs.index(y)] = x
            node.outputs.clear()
            x.name, y.name = y.name, f"{y.name}.removed"
            x.dtype, x.shape = y.dtype or x.dtype, y.shape or x.shape
        else:
            replace_uses(y, x)
            node.outputs.clear()
        node.inputs.clear()
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _is_inference_dropout(node: gs.Node) -> bool:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return False
    if len(node.inputs) > 2 and not is_absent(node.inputs[2]):
        mode = constant(node.inputs[2])
        return mode is not None and not bool(mode.reshape(-1)[0])
    return True  # opset >= 11 without training_mode: always inference

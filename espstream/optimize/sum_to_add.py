"""Rewrite the variadic Sum as the binary Add ESP-DL and the quantizer know."""

from __future__ import annotations

import onnx_graphsurgeon as gs


def sum_to_add(graph: gs.Graph) -> bool:
    """Turn every Sum into Adds.

    Rules:
    1. A Sum of two inputs becomes one Add with the same inputs and output.
    2. A Sum of n > 2 inputs becomes a left-to-right chain of n - 1 Adds (the order ONNX's
       reference sums in), whose last Add writes the Sum's output.
    3. A Sum of one input is left to `remove_identity`'s kind of cleanup: it stays as it is.
    """
    changed = False
    for node in [n for n in graph.nodes if n.op == "Sum" and len(n.inputs) >= 2]:
        inputs, out = list(node.inputs), node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        acc = inputs[0]
        for k, x in enumerate(inputs[1:], start=1):
            last = k == len(inputs) - 1
            y = out if last else gs.Variable(f"{out.name}.partial{k}", dtype=out.dtype)
            graph.nodes.append(
                gs.Node("Add", name=f"{node.name or out.name}.add{k}", inputs=[acc, x],
                        outputs=[y])
            )
            acc = y
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return changed

"""Replace an `If` whose condition is a constant by the nodes of the branch it takes."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import constant


def inline_if(graph: gs.Graph) -> bool:
    """Inline the taken branch of every If with a constant condition.

    Rules:
    1. The If's condition is a constant of one element (`fold_constants` makes the usual
       exporter chains, `Equal(Size(Shape(x)), 3)`, constant first); its truth picks
       `then_branch` or `else_branch`.
    2. The branch's own tensors are renamed `<If name>/<tensor name>` so they cannot collide
       with the outer graph's; tensors the branch reads from outside stay what they are.
    3. The branch's nodes (with their own subgraphs) move into the outer graph in place of the
       If, and each If output is written by an Identity from the matching branch output;
       `remove_identity` then removes those. (onnx-graphsurgeon's own flattening, which
       `fold_constants` turns off, rebinds producers instead and leaves an output dangling
       when a branch returns a tensor it does not compute, or the same tensor twice.)
    4. An If that is not at the top level is inlined once it gets there.
    """
    changed = False
    for node in [n for n in graph.nodes if n.op == "If"]:
        cond = constant(node.inputs[0])
        if cond is None or cond.size != 1:
            continue
        branch: gs.Graph = node.attrs["then_branch" if bool(np.asarray(cond).reshape(-1)[0])
                                      else "else_branch"]
        if len(branch.outputs) != len(node.outputs):
            continue  # not a valid If: leave it for onnx.checker to name
        prefix = node.name or node.outputs[0].name
        outer = {id(t) for t in graph.tensors().values()}
        for tensor in branch._local_tensors().values():
            if tensor.name and id(tensor) not in outer:
                tensor.name = f"{prefix}/{tensor.name}"
        outs = list(node.outputs)
        node.inputs.clear()
        node.outputs.clear()
        index = graph.nodes.index(node)
        moved = list(branch.nodes)
        for k, (src, dst) in enumerate(zip(branch.outputs, outs, strict=True)):
            moved.append(gs.Node("Identity", f"{prefix}/output{k}", inputs=[src], outputs=[dst]))
        graph.nodes[index:index + 1] = moved
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return changed

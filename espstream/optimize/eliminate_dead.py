"""Remove what nothing reads: dead nodes, unused graph inputs and initializers."""

from __future__ import annotations

import onnx_graphsurgeon as gs


def eliminate_dead(graph: gs.Graph) -> bool:
    """Remove everything that does not contribute to a graph output.

    Rules:
    1. A node none of whose outputs reaches a graph output is removed.
    2. A graph input that no node reads is removed from the inputs.
    3. An initializer that no node reads is removed.
    """
    before = (len(graph.nodes), len(graph.inputs), len(graph.tensors()))
    graph.cleanup(remove_unused_graph_inputs=True, remove_unused_node_outputs=False)
    return (len(graph.nodes), len(graph.inputs), len(graph.tensors())) != before

"""Constant folding through onnx-graphsurgeon (which evaluates subgraphs with onnxruntime)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from espstream import log
from espstream.optimize.fold_expand import expand_of_constant


def fold_constants(graph: gs.Graph) -> bool:
    """Fold every subgraph whose inputs are constants into a constant.

    Rules:
    1. Nodes whose inputs are all constants (initializers, Constant nodes, or shapes known
       statically) are evaluated once and replaced by their values; this turns the
       Shape / ConstantOfShape / Concat / Reshape / Slice / Transpose / Cast chains that
       PyTorch emits for `F.pad` into a constant `pads` input.
    2. Nodes left without consumers are removed.
    3. Evaluation errors leave the graph as it was (folding is an optimisation, never a
       reason to fail).
    4. An If whose condition folds to a constant is left for `inline_if` (onnx-graphsurgeon's
       own flattening can leave an If output without a producer). Subgraphs are not folded
       until they are inlined: a folded Constant lets onnxruntime check the shapes of a branch
       that is never taken (Silero VAD's Squeeze of a time axis that is 1 only in the other
       sample rate's branch) and refuse the whole model.
    5. An Expand or Tile of a constant is left for `fold_expand`, which keeps the constant
       small where the consumers broadcast it anyway.
    """
    before = _signature(graph)
    try:
        graph.fold_constants(fold_shapes=True, error_ok=True, flatten_subgraphs=False,
                             recurse_subgraphs=False,
                             should_exclude_node=expand_of_constant)
    except Exception as e:  # onnx-graphsurgeon raises plain exceptions on exotic graphs
        log.warn(f"constant folding skipped: {type(e).__name__}: {e}")
        return False
    graph.cleanup(remove_unused_graph_inputs=False)
    return _signature(graph) != before


def _signature(graph: gs.Graph) -> tuple[int, int]:
    constant_inputs = sum(isinstance(t, gs.Constant) for n in graph.nodes for t in n.inputs)
    return len(graph.nodes), constant_inputs

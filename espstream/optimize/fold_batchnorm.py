"""Fold inference BatchNormalization into the weights and bias of the layer before it."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from espstream.graph import only_consumer
from espstream.optimize.affine import LINEAR_OPS, absorb_affine, batchnorm_scale_shift


def fold_batchnorm(graph: gs.Graph) -> bool:
    """Fold BatchNormalization into the preceding Conv, ConvTranspose or Gemm.

    Rules:
    1. The BatchNormalization is in inference form: `training_mode` 0 and only its first
       output used; scale, bias, mean and variance are constants.
    2. Its input is produced by a Conv, ConvTranspose or Gemm with constant weights (and a
       constant bias, if any), read by nothing else.
    3. With s = scale / sqrt(var + epsilon), the layer's weights are multiplied by s per output
       channel and its bias becomes (bias - mean) * s + beta, computed in float64 and stored
       in the weights' type; the BatchNormalization is removed.
    """
    changed = False
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        affine = batchnorm_scale_shift(bn)
        x = bn.inputs[0]
        if affine is None or len(x.inputs) != 1 or x.inputs[0].op not in LINEAR_OPS:
            continue
        layer = x.inputs[0]
        if only_consumer(x, graph) is not bn or not absorb_affine(layer, *affine):
            continue
        y = bn.outputs[0]
        layer.outputs[0] = y
        bn.outputs.clear()
        bn.inputs.clear()
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed

"""Turn a BatchNormalization that no layer absorbed into a per-channel Mul and Add."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.optimize.affine import affine_nodes, batchnorm_scale_shift


def batchnorm_to_affine(graph: gs.Graph) -> bool:
    """Rewrite a BatchNormalization left by `fold_batchnorm` as `Mul(x, s) -> Add(., t)`.

    Rules:
    1. The BatchNormalization is in inference form: `training_mode` 0, only its first output
       used, constant scale, bias, mean and variance. (It runs after `fold_batchnorm`, so
       what is left has no layer before it to fold into: a Concat, a pool, a graph input.)
    2. Its input has a known float type and rank >= 2; channels are on axis 1.
    3. With s = scale / sqrt(var + epsilon) and t = bias - mean * s, computed in float64 and
       stored in the input's type, shaped [C, 1, ..., 1] to broadcast over axis 1, it becomes
       `Mul(x, s)` then `Add(., t)`; the Add writes the BatchNormalization's output tensor.
    """
    changed = False
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        affine = batchnorm_scale_shift(bn)
        x = bn.inputs[0]
        if affine is None or x.shape is None or len(x.shape) < 2 or x.dtype is None:
            continue
        if not np.issubdtype(np.dtype(x.dtype), np.floating):
            continue
        nodes = affine_nodes(x, bn.outputs[0], *affine, base=bn.name or bn.outputs[0].name)
        bn.inputs.clear()
        bn.outputs.clear()
        graph.nodes.extend(nodes)
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return changed

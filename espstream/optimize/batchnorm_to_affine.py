"""Turn a BatchNormalization that no layer absorbed into a per-channel Mul and Add."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import attr, constant


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
        if attr(bn, "training_mode", 0) or any(o.outputs for o in bn.outputs[1:]):
            continue
        x = bn.inputs[0]
        params = [constant(t) for t in bn.inputs[1:5]]
        if any(p is None for p in params) or x.shape is None or len(x.shape) < 2:
            continue
        dtype = np.dtype(x.dtype) if x.dtype is not None else None
        if dtype is None or not np.issubdtype(dtype, np.floating):
            continue
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        s = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
        t = beta - mean * s
        shape = (-1,) + (1,) * (len(x.shape) - 2)
        base = bn.name or bn.outputs[0].name
        scaled = gs.Variable(f"{base}.scaled", dtype=x.dtype, shape=x.shape)
        mul = gs.Node("Mul", f"{base}.mul",
                      inputs=[x, gs.Constant(f"{base}.scale", s.reshape(shape).astype(dtype))],
                      outputs=[scaled])
        add = gs.Node("Add", f"{base}.add",
                      inputs=[scaled, gs.Constant(f"{base}.shift", t.reshape(shape).astype(dtype))],
                      outputs=[bn.outputs[0]])
        bn.inputs.clear()
        bn.outputs.clear()
        graph.nodes.extend([mul, add])
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return changed

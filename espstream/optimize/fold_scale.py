"""Fold a per-channel constant Mul or Add after a Conv into its weights or bias."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import constant, only_consumer
from espstream.optimize.affine import absorb_affine, channel_vector, out_channels


def fold_scale(graph: gs.Graph) -> bool:
    """Fold `Conv -> Mul(c)` and `Conv -> Add(c)` into the Conv.

    Rules:
    1. One input of the Mul / Add is the output of a Conv with constant weights (and bias),
       read by nothing else; the other input is a constant.
    2. The constant acts per output channel: it is a scalar, or its shape, aligned to the
       Conv output's rank from the right, is 1 on every axis but the channel axis, and it
       has no more axes than the output (so broadcasting does not change the output shape).
    3. Mul scales the weights and the bias of each channel; Add adds to the bias (created
       when absent). The Mul / Add is removed.
    """
    changed = False
    for op in [n for n in graph.nodes if n.op in ("Mul", "Add")]:
        if len(op.inputs) != 2:
            continue
        for i in (0, 1):
            x, c = op.inputs[i], op.inputs[1 - i]
            value = constant(c)
            if value is None or len(x.inputs) != 1 or x.inputs[0].op != "Conv":
                continue
            conv = x.inputs[0]
            if only_consumer(x, graph) is not op:
                continue
            per_channel = channel_vector(value, out_channels(conv), x.shape)
            if per_channel is None:
                continue
            if op.op == "Mul":
                ok = absorb_affine(conv, per_channel, np.zeros_like(per_channel))
            else:
                ok = absorb_affine(conv, np.ones_like(per_channel), per_channel)
            if not ok:
                continue
            conv.outputs[0] = op.outputs[0]
            op.outputs.clear()
            op.inputs.clear()
            changed = True
            break
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed

"""Fold an explicit zero `Pad` into the `pads` of the Conv or AveragePool that reads it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import attr, constant, is_absent


def fold_pad(graph: gs.Graph) -> bool:
    """Fold a constant zero Pad into its Conv / AveragePool consumers.

    Rules:
    1. The Pad is in `constant` mode, its value is absent or 0, and its `pads` (and `axes`,
       when given) are constants with no negative entry.
    2. Only spatial axes are padded: the batch and channel axes get no padding.
    3. Every consumer reads the Pad's output as its data input and is a Conv with explicit
       padding (no `auto_pad`), or an AveragePool with `ceil_mode` 0 whose result cannot
       change: it counts padding already (`count_include_pad` 1) or has no padding of its
       own, in which case it is switched to counting the folded padding. The output is not
       a graph output.
    4. The Pad's spatial padding is added to each consumer's `pads`, the consumers read the
       Pad's input, and the Pad is removed.
    """
    changed = False
    for pad in [n for n in graph.nodes if n.op == "Pad"]:
        spatial = _spatial_pads(pad)
        if spatial is None:
            continue
        out = pad.outputs[0]
        consumers = list(out.outputs)
        if not consumers or out in graph.outputs:
            continue
        if not all(_can_absorb(c, out) for c in consumers):
            continue
        for c in consumers:
            n = len(spatial) // 2
            own = list(attr(c, "pads", [0] * (2 * n)))
            c.attrs["pads"] = [a + b for a, b in zip(own, spatial, strict=True)]
            if c.op == "AveragePool":
                c.attrs["count_include_pad"] = 1
            c.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
        pad.inputs.clear()
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _spatial_pads(pad: gs.Node) -> list[int] | None:
    """The pads of axes 2.. in ONNX order [begin..., end...], or None if not foldable."""
    if attr(pad, "mode", "constant") not in ("constant", b"constant"):
        return None
    if len(pad.inputs) < 2:
        return None  # opset < 11 attribute form
    pads = constant(pad.inputs[1])
    if pads is None:
        return None
    if len(pad.inputs) > 2 and not is_absent(pad.inputs[2]):
        value = constant(pad.inputs[2])
        if value is None or np.any(value != 0):
            return None
    x = pad.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    pads = [int(p) for p in pads.reshape(-1)]
    if len(pad.inputs) > 3 and not is_absent(pad.inputs[3]):
        axes = constant(pad.inputs[3])
        if axes is None or rank is None:
            return None
        full = [0] * (2 * rank)
        k = len(axes)
        for i, a in enumerate(int(a) % rank for a in axes.reshape(-1)):
            full[a], full[a + rank] = pads[i], pads[i + k]
        pads = full
    if any(p < 0 for p in pads) or len(pads) % 2:
        return None
    r = len(pads) // 2
    if r < 3 or pads[0] or pads[1] or pads[r] or pads[r + 1]:
        return None
    return pads[2:r] + pads[r + 2 :]


def _can_absorb(node: gs.Node, tensor: gs.Tensor) -> bool:
    if not node.inputs or node.inputs[0] is not tensor:
        return False
    if any(t is tensor for t in node.inputs[1:]):
        return False
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return False
    if node.op == "Conv":
        return True
    if node.op == "AveragePool":
        if attr(node, "ceil_mode", 0):
            return False
        own = attr(node, "pads", None)
        return bool(attr(node, "count_include_pad", 0)) or not own or not any(own)
    return False

"""Normalizations streamify knows (BatchNormalization pointwise unless along time; instance and
group norms mix every frame). optimize folds BatchNormalization away before calibrate.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from espstream.ops.registry import (
    OpSpec,
    register,
)
from espstream.stream.rules import (
    Ctx,
    rule_mixes_all,
    rule_unary,
    unary_time,
    unsupported,
)

MODULE = "norm"


def stream_batchnorm(ctx: Ctx, node: gs.Node) -> None:
    """Pointwise over frames; a time axis on the channel axis is refused."""
    xt = unary_time(ctx, node)
    if xt is not None and xt.axis == 1:
        raise unsupported(node, "normalises along the time axis")
    return rule_unary(ctx, node)


register(OpSpec("BatchNormalization", MODULE, stream=stream_batchnorm,
                stream_rule="pointwise; along time: refused"))
for _op in ("InstanceNormalization", "GroupNormalization"):
    register(OpSpec(_op, MODULE, stream=rule_mixes_all, stream_first=True,
                    stream_rule="refused on a time axis (mixes every frame)"))

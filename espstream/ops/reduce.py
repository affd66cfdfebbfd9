"""Reductions (Reduce*, ArgMax / ArgMin, CumSum): streamed in float; not lowered yet.

Calibrate: ReduceMean gets an exponent of its own (plan rule 6). Streamify (`rule_reduce`):
over other axes the time axis passes (shifting with keepdims=0); over time: refused (CumSum
mixes every frame).
"""

from __future__ import annotations

from espstream.ops.registry import (
    OpSpec,
    register,
)
from espstream.quant.plan import (
    own,
)
from espstream.stream.rules import (
    rule_mixes_all,
    rule_reduce,
)

MODULE = "reduce"




_RED = "off the time axis; over time: refused"
register(OpSpec("ReduceMean", MODULE, calibrate=own, calibrate_rule="own exponent",
                stream=rule_reduce, stream_rule=_RED))
for _op in ("ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"):
    register(OpSpec(_op, MODULE, stream=rule_reduce, stream_rule=_RED))
register(OpSpec("CumSum", MODULE, stream=rule_mixes_all, stream_first=True,
                stream_rule="refused on a time axis (mixes every frame)"))

"""Pointwise operators streamify carries through in float: not calibrated or lowered yet.

Each states whether f(0) = 0 (pre-start zeros stay zeros), whether its output is never
negative, and whether it keeps its input's sign; `rule_unary` / `rule_broadcast` do the rest.
"""

from __future__ import annotations

from espstream.ops.registry import (
    OpSpec,
    register,
)
from espstream.stream.rules import (
    rule_broadcast,
    rule_unary,
)

MODULE = "float_pointwise"




# (op, f(0) == 0, never negative, keeps the sign)
_UNARY = [
    ("Selu", True, False, False), ("Celu", True, False, False), ("Softsign", True, False, False),
    ("Reciprocal", False, False, False), ("Abs", True, True, False),
    ("Erf", True, False, False), ("Mish", True, False, False), ("Sign", True, False, False),
    ("Floor", True, False, False), ("Ceil", True, False, False), ("Round", True, False, False),
    ("Cast", True, False, True), ("Dropout", True, False, True), ("Not", False, False, False),
    ("IsNaN", False, False, False), ("IsInf", False, False, False), ("Sin", True, False, False),
    ("Cos", False, False, False), ("ThresholdedRelu", True, False, False),
    ("Shrink", True, False, False), ("CastLike", True, False, True),
]
for _op, _zero, _nonneg, _sign in _UNARY:
    register(OpSpec(_op, MODULE, stream=rule_unary, stream_rule="pointwise", zero_keeping=_zero,
                    nonneg=_nonneg, keep_sign=_sign))
for _op in ("Where", "And", "Or", "Xor"):
    register(OpSpec(_op, MODULE, stream=rule_broadcast, stream_rule="broadcast"))

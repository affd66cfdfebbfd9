"""The `StreamingCache` operator: a model-local ONNX function, so onnxruntime runs it as it is.

Semantics (the same as ESP-DL's StreamingCache, see ESPDL.md section 5):

1. Node: domain `espstream`, op_type `StreamingCache`, INT attributes `window_size` (>= 2) and
   `axis` (the time axis in the ONNX layout of the tensor it caches).
2. Inputs `(x, state)`, outputs `(y, next_state)`. `state` holds `window_size - 1` frames.
3. `y = Concat(state, x)` along `axis`: `window_size - 1` more frames than `x`.
4. `next_state` = the last `window_size - 1` frames of `y`.
5. Every state is a graph input paired with a graph output; it is all zeros at the start of a
   stream, and the caller feeds each `next_state` back as the next call's `state`.
6. The function body imports the model's own default-domain opset (at least 13; onnx.checker
   demands the same version as the model, e.g. 21 for calibrate's 16-bit models). Its ops
   (Concat, Constant, Sub, Reshape, Slice) mean the same from opset 13 on.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

DOMAIN = "espstream"
OP = "StreamingCache"
FUNCTION_OPSET = 13  # the ONNX opset the function body is written against


def _ref_int(node: onnx.NodeProto, name: str, ref: str) -> onnx.NodeProto:
    """Make `node`'s INT attribute `name` read the function attribute `ref`."""
    node.attribute.append(
        onnx.AttributeProto(name=name, ref_attr_name=ref, type=onnx.AttributeProto.INT)
    )
    return node


def make_function(opset: int = FUNCTION_OPSET) -> onnx.FunctionProto:
    """The FunctionProto that defines `espstream.StreamingCache` (rules in the module docstring)."""
    nodes = [
        _ref_int(helper.make_node("Concat", ["state", "x"], ["y"]), "axis", "axis"),
        _ref_int(helper.make_node("Constant", [], ["w"]), "value_int", "window_size"),
        _ref_int(helper.make_node("Constant", [], ["ax"]), "value_int", "axis"),
        helper.make_node("Constant", [], ["one"], value_int=1),
        helper.make_node("Constant", [], ["end"], value_ints=[2**63 - 1]),
        helper.make_node("Constant", [], ["shape1"], value_ints=[1]),
        helper.make_node("Sub", ["one", "w"], ["neg_keep"]),  # 1 - window_size = -(frames kept)
        helper.make_node("Reshape", ["neg_keep", "shape1"], ["starts"]),
        helper.make_node("Reshape", ["ax", "shape1"], ["axes"]),
        helper.make_node("Slice", ["y", "starts", "end", "axes"], ["next_state"]),
    ]
    return helper.make_function(
        DOMAIN,
        OP,
        ["x", "state"],
        ["y", "next_state"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=["window_size", "axis"],
        doc_string=__doc__,
    )


def model_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset, at least FUNCTION_OPSET (rule 6)."""
    v = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return max(v, FUNCTION_OPSET)


def install(model: onnx.ModelProto) -> None:
    """Add the function and the `espstream` opset import to `model` (idempotent)."""
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP)]
    del model.functions[:]
    model.functions.extend(keep)
    model.functions.append(make_function(model_opset(model)))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def reference(x: np.ndarray, state: np.ndarray, window_size: int, axis: int):
    """NumPy twin of the function: returns (y, next_state)."""
    y = np.concatenate([state, x], axis=axis)
    keep = window_size - 1
    idx = [slice(None)] * y.ndim
    idx[axis] = slice(y.shape[axis] - keep, None)
    return y, y[tuple(idx)]

"""Apply one optimize pass to a model and compare it with the original in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx_builders import run
from onnx_graphsurgeon import import_onnx

from espstream.graph import export_model


def apply(pass_fn, model: onnx.ModelProto) -> tuple[bool, onnx.ModelProto]:
    """(changed, model after the pass); the result must pass onnx.checker."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = import_onnx(model)
    changed = pass_fn(graph)
    graph.toposort()
    out = export_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return changed, out


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict,
                        rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol)

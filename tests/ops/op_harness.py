"""What every operator test file shares: tiny one-operator models, and the run of one through
calibrate, export (lower) and the simulator, judged against onnxruntime on the QDQ model.

An operator test file declares `CASES` ({ONNX op: builder() -> (model, espdl op types the
export must hold)}) for the operators its module takes through every stage, and `NOT_LOWERED`
({ONNX op: the stage that refuses it}) for the rest; tests/ops/test_registry_coverage.py checks
that together they name every operator the module registers.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from espstream.errors import UserError
from espstream.export import export_model, quantize_input
from espstream.quant import calibrate_model, model_inputs, read_calibration_data
from espstream.sim import Simulator

Case = Callable[[], tuple[onnx.ModelProto, set[str]]]


def model(nodes: list[onnx.NodeProto], shape: list[int], inits: dict[str, np.ndarray] | None = None,
          opset: int = 14, out_shape: list[int] | None = None) -> onnx.ModelProto:
    """x (float, `shape`) -> nodes -> y; initializers from `inits`."""
    g = helper.make_graph(
        nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    return m


def unary(op: str, shape: list[int] | None = None, after_relu: bool = False, **attrs) -> Case:
    """x -> op -> y; `after_relu`: x -> Relu -> op -> y (an op that only moves data needs an
    operator with an exponent of its own in front of it to be calibrated)."""
    shape = shape or [1, 4, 8]
    if after_relu:
        return lambda: (model([helper.make_node("Relu", ["x"], ["r"]),
                               helper.make_node(op, ["r"], ["y"], **attrs)], shape), {op})
    return lambda: (model([helper.make_node(op, ["x"], ["y"], **attrs)], shape), {op})


def _data(m: onnx.ModelProto, n: int = 16, seed: int = 0):
    inputs = model_inputs(m)
    shape = [d if isinstance(d, int) else 1 for d in inputs[0].shape][1:]
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    path = Path(tempfile.mkdtemp()) / "calib.npy"
    np.save(path, x)
    return read_calibration_data(str(path), inputs), x


def run_case(case: Case, target: str = "esp32p4", bits: int = 8) -> None:
    """Calibrate, export and simulate one case; the simulator's output must match onnxruntime on
    the QDQ model within two steps of the output's grid (onnxruntime's QuantizeLinear rounds
    ties to even, esp32s3 and c round them up, and an operator may round twice), and the export
    must hold the expected ESP-DL operators. The exact arithmetic is pinned elsewhere (the
    ESP-PPQ fixtures, tests/test_sim.py and the behaviour pins)."""
    m, espdl_ops = case()
    data, x = _data(m)
    qdq = calibrate_model(m, data, target=target, bits=bits, report_samples=0).model
    onnx.checker.check_model(qdq)
    res = export_model(qdq)
    kinds = {n.op_type for n in res.graph.nodes}
    assert espdl_ops <= kinds, f"export holds {sorted(kinds)}, expected {sorted(espdl_ops)}"
    sess = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    g = res.graph
    sim = Simulator(g)
    for k in range(3):
        sample = x[k:k + 1]
        want = sess.run(None, {"x": sample})[0]
        got = sim.run({"x": quantize_input(g, "x", sample)})
        out = g.outputs[0]
        y = got[out.name]
        if y.dtype.kind == "f":
            assert np.allclose(y.reshape(want.shape), want, atol=2e-2), (y, want)
            continue
        real = y.astype(np.float64) * 2.0 ** out.exponents[0]
        perm = json.loads(g.metadata["espstream.layout"]).get(out.name, list(range(y.ndim)))
        real = np.transpose(real, np.argsort(perm))
        step = 2.0 ** out.exponents[0]
        err = np.abs(real - want) / step
        assert real.shape == want.shape
        assert err.max() <= 2.0 + 1e-9, err.max()


def refused(case: Case, stage: str, words: str) -> None:
    """The case stops at `stage` ('calibrate' or 'export') with one UserError naming `words`."""
    m, _ = case()
    data, _ = _data(m)
    if stage == "calibrate":
        with pytest.raises(UserError, match=words):
            calibrate_model(m, data, target="esp32p4", bits=8, report_samples=0)
        return
    qdq = calibrate_model(m, data, target="esp32p4", bits=8, report_samples=0).model
    if stage == "export":
        with pytest.raises(UserError, match=words):
            export_model(qdq)
        return
    g = export_model(qdq).graph
    with pytest.raises(UserError, match=words):
        Simulator(g)

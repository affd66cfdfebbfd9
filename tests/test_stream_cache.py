"""The StreamingCache model-local function: checker, onnxruntime, and its NumPy twin."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from espstream.stream import cache


def _model(window: int, axis: int, shape: list[int]) -> onnx.ModelProto:
    sshape = list(shape)
    sshape[axis] = window - 1
    yshape = list(shape)
    yshape[axis] += window - 1
    node = helper.make_node(cache.OP, ["x", "s"], ["y", "ns"], domain=cache.DOMAIN,
                            window_size=window, axis=axis)
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, sshape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape),
         helper.make_tensor_value_info("ns", TensorProto.FLOAT, sshape)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    cache.install(m)
    return m


def test_function_declared_and_checked():
    m = _model(3, 2, [1, 2, 4])
    onnx.checker.check_model(m, full_check=True)
    assert [(f.domain, f.name) for f in m.functions] == [("espstream", "StreamingCache")]
    assert list(m.functions[0].attribute) == ["window_size", "axis"]
    cache.install(m)  # idempotent
    assert len(m.functions) == 1
    assert sum(o.domain == "espstream" for o in m.opset_import) == 1


def test_concat_then_keep_last_frames_by_hand():
    m = _model(3, 2, [1, 1, 2])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    s = np.zeros((1, 1, 2), np.float32)
    y, s = sess.run(None, {"x": np.array([[[1, 2]]], np.float32), "s": s})
    assert y.tolist() == [[[0, 0, 1, 2]]]
    assert s.tolist() == [[[1, 2]]]
    y, s = sess.run(None, {"x": np.array([[[3, 4]]], np.float32), "s": s})
    assert y.tolist() == [[[1, 2, 3, 4]]]
    assert s.tolist() == [[[3, 4]]]


@settings(max_examples=25, deadline=None)
@given(
    window=st.integers(2, 9),
    axis=st.integers(0, 2),
    chunk=st.integers(1, 5),
    calls=st.integers(1, 4),
)
def test_function_equals_numpy_twin(window, axis, chunk, calls):
    shape = [2, 3, 2]
    shape[axis] = chunk
    m = _model(window, axis, shape)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(window * 100 + axis * 10 + chunk)
    sshape = list(shape)
    sshape[axis] = window - 1
    s_ort = s_np = np.zeros(sshape, np.float32)
    seen = []
    for _ in range(calls):
        x = rng.standard_normal(shape).astype(np.float32)
        seen.append(x)
        y, s_ort = sess.run(None, {"x": x, "s": s_ort})
        y_np, s_np = cache.reference(x, s_np, window, axis)
        np.testing.assert_array_equal(y, y_np)
        np.testing.assert_array_equal(s_ort, s_np)
    # the state is the last window-1 frames of everything seen, zero-padded in front
    allx = np.concatenate([np.zeros(sshape, np.float32), *seen], axis=axis)
    want = np.take(allx, range(allx.shape[axis] - (window - 1), allx.shape[axis]), axis=axis)
    np.testing.assert_array_equal(s_ort, want)


@pytest.mark.parametrize("window", [2, 5])
def test_reference_keeps_window_minus_one(window):
    y, s = cache.reference(np.ones((1, 1, 3)), np.zeros((1, 1, window - 1)), window, 2)
    assert y.shape[2] == 3 + window - 1 and s.shape[2] == window - 1

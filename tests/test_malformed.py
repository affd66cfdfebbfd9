"""Stages on models that onnx.checker passes but that are malformed: an unexpected error inside
streamify or lower becomes a `UserError` when (and only when) the model does not run in
onnxruntime; on a model that runs, the error is ours and surfaces as it is."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import espstream.lower as lower_mod
import espstream.stream.streamify as streamify_mod
from espstream.errors import UserError
from espstream.optimize.check import onnxruntime_failure

HERE = Path(__file__).resolve().parent / "bad_inputs"


def _qdq() -> onnx.ModelProto:
    return onnx.load(str(HERE / "tiny.qdq.onnx"))


def _malformed() -> onnx.ModelProto:
    m = _qdq()
    dq = next(n for n in m.graph.node if n.name == "conv1_w_DequantizeLinear")
    dq.input[1] = "conv2_b_scale"  # 4 scales for 8 channels
    onnx.checker.check_model(m)
    return m


def test_onnxruntime_failure_names_the_problem():
    assert onnxruntime_failure(_qdq()) is None
    why = onnxruntime_failure(_malformed())
    assert why is not None and "conv1_w_DequantizeLinear" in why and "\n" not in why


@pytest.mark.parametrize("stage", ["streamify", "lower"])
def test_unexpected_error_on_a_malformed_model_is_a_user_error(monkeypatch, stage):
    def boom(*_a, **_k):
        raise IndexError("list index out of range")

    if stage == "streamify":
        monkeypatch.setattr(streamify_mod, "_streamify", boom)
        run = lambda m: streamify_mod.streamify_model(m, 2)  # noqa: E731
    else:
        monkeypatch.setattr(lower_mod._Lowerer, "run", boom)
        run = lower_mod.lower
    with pytest.raises(UserError, match="the model is malformed: it does not run in onnxruntime"):
        run(_malformed())
    with pytest.raises(IndexError):  # the model runs: the bug is ours and is not hidden
        run(_qdq())

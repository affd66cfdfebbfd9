"""espstream/ops/softmax.py: Softmax (a float output), and the normalizations streamed only."""

from __future__ import annotations

import pytest
from onnx import helper
from op_harness import model, run_case


def _softmax():
    nodes = [helper.make_node("Tanh", ["x"], ["t"]),
             helper.make_node("Softmax", ["t"], ["y"], axis=-1)]
    return model(nodes, [1, 6]), {"Softmax"}


def _log_softmax():
    nodes = [helper.make_node("Tanh", ["x"], ["t"]),
             helper.make_node("LogSoftmax", ["t"], ["y"], axis=-1)]
    return model(nodes, [1, 6]), {"LogSoftmax"}


CASES = {"Softmax": _softmax, "LogSoftmax": _log_softmax}
NOT_LOWERED = {"Hardmax": "calibrate"}


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_softmax(target: str, bits: int) -> None:
    run_case(CASES["Softmax"], target, bits)


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 16), ("c", 8)])
def test_log_softmax(target: str, bits: int) -> None:
    run_case(CASES["LogSoftmax"], target, bits)

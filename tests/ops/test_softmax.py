"""espstream/ops/softmax.py: Softmax (a float output), and the normalizations streamed only."""

from __future__ import annotations

import pytest
from onnx import helper
from op_harness import model, refused, run_case


def _softmax():
    nodes = [helper.make_node("Tanh", ["x"], ["t"]),
             helper.make_node("Softmax", ["t"], ["y"], axis=-1)]
    return model(nodes, [1, 6]), {"Softmax"}


CASES = {"Softmax": _softmax}
NOT_LOWERED = {"LogSoftmax": "export", "Hardmax": "calibrate",
               "LayerNormalization": "calibrate", "LpNormalization": "calibrate"}


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_softmax(target: str, bits: int) -> None:
    run_case(CASES["Softmax"], target, bits)


def test_log_softmax_is_not_lowered() -> None:
    def case():
        nodes = [helper.make_node("Tanh", ["x"], ["t"]),
                 helper.make_node("LogSoftmax", ["t"], ["y"], axis=-1)]
        return model(nodes, [1, 6]), set()
    refused(case, "export", "LogSoftmax")

"""espstream/ops/relu.py: Relu, PRelu (PRelu lowered but not simulated yet)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model, refused, run_case, unary


def _prelu():
    slope = np.full((4, 1), 0.25, np.float32)
    return model([helper.make_node("PRelu", ["x", "s"], ["y"])], [1, 4, 8], {"s": slope}), {"PRelu"}


CASES = {"Relu": unary("Relu")}
NOT_LOWERED = {"PRelu": "simulate"}


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 16)])
def test_relu(target: str, bits: int) -> None:
    run_case(CASES["Relu"], target, bits)


def test_prelu_is_not_simulated_yet() -> None:
    refused(_prelu, "simulate", "PRelu")

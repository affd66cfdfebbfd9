"""espstream/ops/activation.py: lookup-table activations and SiLU."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model, refused, run_case, unary


def _silu():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    return model(nodes, [1, 4, 8]), {"Swish"}


def _clip():
    return model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [1, 4, 8],
                 {"lo": np.float32(-0.5), "hi": np.float32(0.75)}), {"Clip"}


def _after_sigmoid(op: str):
    """Log / Sqrt of a positive tensor (a Sigmoid's output), as a log-mel front end takes them."""
    return lambda: (model([helper.make_node("Sigmoid", ["x"], ["s"]),
                           helper.make_node(op, ["s"], ["y"])], [1, 4, 8]), {op})


CASES = {
    "Log": _after_sigmoid("Log"), "Sqrt": _after_sigmoid("Sqrt"),
    "Sigmoid": unary("Sigmoid"), "Tanh": unary("Tanh"), "HardSigmoid": unary("HardSigmoid"),
    "HardSwish": unary("HardSwish"), "LeakyRelu": unary("LeakyRelu", alpha=0.1),
    "Elu": unary("Elu"), "Exp": unary("Exp"), "Clip": _clip, "SiLU": _silu,
}
NOT_LOWERED = {
    "Swish": "calibrate", "Gelu": "calibrate",
    "Softplus": "export",
}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("esp32p4", 16)])
def test_through_every_stage(op: str, target: str, bits: int) -> None:
    run_case(CASES[op], target, bits)


@pytest.mark.parametrize("op", ["Log", "Sqrt"])
def test_negative_calibration_data_is_one_clear_error(op: str) -> None:
    # standard-normal data: Log / Sqrt of a negative value is NaN in the float model
    refused(unary(op), "calibrate", "produces NaN or Inf on the calibration data")


def test_softplus_is_calibrated_but_not_lowered() -> None:
    refused(unary("Softplus"), "export", "Softplus")

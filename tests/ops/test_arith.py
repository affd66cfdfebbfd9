"""espstream/ops/arith.py: Add, Sub, Mul."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model, refused, run_case


def _binary(op: str, const: bool):
    def case():
        nodes = [helper.make_node("Relu", ["x"], ["r"])]
        inits = {}
        if const:
            inits["c"] = np.linspace(0.5, 1.5, 4, dtype=np.float32).reshape(1, 4, 1)
            nodes.append(helper.make_node(op, ["r", "c"], ["y"]))
        else:
            nodes.append(helper.make_node(op, ["x", "r"], ["y"]))
        return model(nodes, [1, 4, 8], inits), {op}
    return case


CASES = {"Add": _binary("Add", False), "Sub": _binary("Sub", False), "Mul": _binary("Mul", True)}
NOT_LOWERED = {"Max": "calibrate", "Min": "calibrate", "Sum": "calibrate", "Mean": "calibrate",
               "BitShift": "calibrate"}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(op: str, target: str, bits: int) -> None:
    run_case(CASES[op], target, bits)


def test_mul_of_two_activations() -> None:
    run_case(_binary("Mul", False))


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_not_calibrated_yet(op: str) -> None:
    refused(_binary(op, False), "calibrate", f"operator {op} is not supported by calibrate")

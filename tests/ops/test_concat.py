"""espstream/ops/concat.py: Concat, Split, Pad, Slice."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model, run_case


def _i64(*v):
    return np.asarray(v, np.int64)


def _concat():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Tanh", ["x"], ["t"]),
             helper.make_node("Concat", ["r", "t"], ["y"], axis=1)]
    return model(nodes, [1, 4, 8]), {"Concat"}


def _split():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Split", ["r"], ["a", "b"], axis=1),
             helper.make_node("Add", ["a", "b"], ["y"])]
    return model(nodes, [1, 4, 8]), {"Split"}


def _pad():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Pad", ["r", "p"], ["y"], mode="constant")]
    return model(nodes, [1, 4, 8], {"p": _i64(0, 0, 2, 0, 0, 1)}), {"Pad"}


def _slice():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Slice", ["r", "s", "e", "a"], ["y"])]
    return model(nodes, [1, 4, 8], {"s": _i64(-3), "e": _i64(2**31), "a": _i64(2)}), {"Slice"}


CASES = {"Concat": _concat, "Split": _split, "Pad": _pad, "Slice": _slice}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(op: str, target: str, bits: int) -> None:
    run_case(CASES[op], target, bits)

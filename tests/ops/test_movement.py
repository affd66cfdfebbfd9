"""espstream/ops/movement.py: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Identity
(Gather lowered and simulated, not calibrated; Tile / Shape / Size streamed in float only)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model, run_case, unary


def _after_relu(op: str, shape=(1, 4, 8), inits=None, extra=(), **attrs):
    def case():
        nodes = [helper.make_node("Relu", ["x"], ["r"]),
                 helper.make_node(op, ["r", *extra], ["m"], **attrs),
                 helper.make_node("Tanh", ["m"], ["y"])]
        return model(nodes, list(shape), inits or {}), {op}
    return case


def _i64(*v):
    return np.asarray(v, np.int64)


CASES = {
    "Reshape": _after_relu("Reshape", inits={"s": _i64(1, 8, 4)}, extra=("s",)),
    "Flatten": _after_relu("Flatten"),
    "Squeeze": _after_relu("Squeeze", shape=(1, 1, 8), inits={"a": _i64(1)}, extra=("a",)),
    "Unsqueeze": _after_relu("Unsqueeze", inits={"a": _i64(1)}, extra=("a",)),
    "Transpose": _after_relu("Transpose", perm=[0, 2, 1]),
    "Gather": _after_relu("Gather", inits={"i": _i64(0, -1, 2)}, extra=("i",), axis=2),
    "Identity": lambda: (model([helper.make_node("Relu", ["x"], ["r"]),
                                helper.make_node("Identity", ["r"], ["y"])], [1, 4, 8]),
                         {"Identity"}),
}
NOT_LOWERED = {"Tile": "calibrate", "Shape": "calibrate",
               "Size": "calibrate"}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(op: str, target: str, bits: int) -> None:
    run_case(CASES[op], target, bits)


def test_gather_negative_indices_are_written_non_negative() -> None:
    """ESP-DL adds an index to the address unchecked: the export holds index + dim."""
    from op_harness import _data

    from espstream.export import export_model
    from espstream.quant import calibrate_model

    m, _ = _after_relu("Gather", inits={"i": _i64(-1, 0)}, extra=("i",), axis=2)()
    data, _ = _data(m)
    g = export_model(calibrate_model(m, data, target="esp32p4", bits=8,
                                     report_samples=0).model).graph
    node = next(n for n in g.nodes if n.op_type == "Gather")
    assert g.initializers[node.inputs[1]].data.tolist() == [7, 0]


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("c", 16)])
def test_a_model_of_data_movement_only(target: str, bits: int) -> None:
    """No operator with an exponent of its own: the input's exponent carries through (ESP-DL's
    operator suite has such models; calibrate used to refuse them as 'nothing to calibrate')."""
    run_case(unary("Transpose", perm=[0, 2, 1]), target, bits)

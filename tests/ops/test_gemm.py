"""espstream/ops/gemm.py: Gemm and MatMul."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model, run_case

RNG = np.random.default_rng(6)


def _gemm():
    w = (RNG.standard_normal((8, 5)) * 0.3).astype(np.float32)
    return model([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], [1, 8],
                 {"w": w, "b": np.zeros(5, np.float32) + 0.1}), {"Gemm"}


def _matmul():
    w = (RNG.standard_normal((8, 3)) * 0.3).astype(np.float32)
    return model([helper.make_node("MatMul", ["x", "w"], ["y"])], [1, 6, 8], {"w": w}), {"MatMul"}


CASES = {"Gemm": _gemm, "MatMul": _matmul}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(op: str, target: str, bits: int) -> None:
    run_case(CASES[op], target, bits)

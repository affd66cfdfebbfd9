"""espstream/ops/pool.py: AveragePool, MaxPool, GlobalAveragePool (GlobalMaxPool not lowered)."""

from __future__ import annotations

import pytest
from op_harness import refused, run_case, unary

CASES = {
    "AveragePool": unary("AveragePool", kernel_shape=[3], pads=[1, 1], count_include_pad=1),
    "MaxPool": unary("MaxPool", after_relu=True, kernel_shape=[2], strides=[2]),
    "GlobalAveragePool": unary("GlobalAveragePool"),
}
NOT_LOWERED = {"GlobalMaxPool": "export", "LpPool": "calibrate", "GlobalLpPool": "calibrate"}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(op: str, target: str, bits: int) -> None:
    run_case(CASES[op], target, bits)


def test_global_max_pool_is_not_lowered() -> None:
    refused(unary("GlobalMaxPool", after_relu=True), "export", "GlobalMaxPool")

"""espstream/ops/pool.py: AveragePool, MaxPool, GlobalAveragePool, GlobalMaxPool (as MaxPool)."""

from __future__ import annotations

import pytest
from op_harness import run_case, unary

CASES = {
    "AveragePool": unary("AveragePool", kernel_shape=[3], pads=[1, 1], count_include_pad=1),
    "MaxPool": unary("MaxPool", after_relu=True, kernel_shape=[2], strides=[2]),
    "GlobalAveragePool": unary("GlobalAveragePool"),
    # ESP-DL has no GlobalMaxPool: its MaxPool over the whole extent (1-D and 2-D)
    "GlobalMaxPool": lambda: (unary("GlobalMaxPool", after_relu=True)()[0], {"MaxPool"}),
}
NOT_LOWERED = {"LpPool": "calibrate", "GlobalLpPool": "calibrate"}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(op: str, target: str, bits: int) -> None:
    run_case(CASES[op], target, bits)


def test_global_max_pool_2d_is_max_pool_over_the_extent() -> None:
    from op_harness import _data

    from espstream.export import export_model
    from espstream.quant import calibrate_model

    m, _ = unary("GlobalMaxPool", shape=[1, 3, 5, 4], after_relu=True)()
    run_case(lambda: (m, {"MaxPool"}))
    qdq = calibrate_model(m, _data(m)[0], report_samples=0).model
    [pool] = [n for n in export_model(qdq).graph.nodes if n.op_type == "MaxPool"]
    assert list(pool.attrs["kernel_shape"]) == [5, 4]

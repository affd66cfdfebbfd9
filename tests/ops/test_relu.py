"""espstream/ops/relu.py: Relu, PRelu (one slope and per channel), and ESP-DL's PRelu kernel."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, refused, run_case, unary

from espstream.ops.relu import prelu


def _prelu(slope: np.ndarray):
    return lambda: (model([helper.make_node("PRelu", ["x", "s"], ["y"])], [1, 4, 8],
                          {"s": slope}), {"PRelu"})


CASES = {"Relu": unary("Relu"),
         "PRelu": _prelu(np.asarray([[0.25], [-0.5], [0.125], [0.75]], np.float32))}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 16)])
def test_relu(target: str, bits: int) -> None:
    run_case(CASES["Relu"], target, bits)


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 8),
                                              ("esp32p4", 16), ("esp32s3", 16), ("c", 16)])
def test_prelu_per_channel(target: str, bits: int) -> None:
    run_case(CASES["PRelu"], target, bits)


@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 16)])
def test_prelu_one_slope(target: str, bits: int) -> None:
    run_case(_prelu(np.asarray([0.2], np.float32)), target, bits)


def test_prelu_one_slope_int8_writes_a_table() -> None:
    from op_harness import _data

    from espstream.export import export_model
    from espstream.quant import calibrate_model

    m, _ = _prelu(np.asarray([0.2], np.float32))()
    data, _ = _data(m)
    g = export_model(calibrate_model(m, data, target="c", bits=8, report_samples=0).model).graph
    (node,) = [n for n in g.nodes if n.op_type == "PRelu"]
    assert g.initializers[node.attrs["lut"]].data.shape == (256,)
    assert g.initializers[node.inputs[1]].data.shape == (4, 1, 1)


def test_prelu_slope_along_time_is_refused() -> None:
    refused(_prelu(np.full((1, 1, 8), 0.25, np.float32)), "export", "one per channel")


@given(st.lists(st.integers(-32768, 32767), min_size=1, max_size=40),
       st.integers(-32768, 32767), st.integers(-3, 20), st.sampled_from([8, 16]),
       st.sampled_from(["floor", "half_up", "half_even"]))
def test_prelu_kernel_against_the_c_loop(xs: list[int], a: int, shift: int, bits: int,
                                         path: str) -> None:
    dtype = np.int8 if bits == 8 else np.int16
    lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
    x = np.clip(np.asarray(xs), lo, hi).astype(dtype).reshape(1, -1)
    alpha = np.asarray([min(max(a, lo), hi)] * x.shape[1], dtype)
    got = prelu(x, alpha, shift, 0, path).reshape(-1).tolist()
    for xi, ai, g in zip(x.reshape(-1).tolist(), alpha.tolist(), got, strict=True):
        if xi >= 0:
            assert g == xi
            continue
        p = xi * ai
        if shift <= 0:
            v = p * 2 ** -shift
        elif path == "floor":
            v = p // 2 ** shift  # DL_RIGHT_SHIFT: an arithmetic shift
        else:
            f = p / 2 ** shift
            v = int(np.floor(f + 0.5)) if path == "half_up" else int(round(f))
        assert g == min(max(v, lo), hi)

"""The bundled models and the ESP-PPQ fixtures stream with no overrides and verify equal:
as exported (explicit Pad chains), after optimize, and after calibrate (fake-quant)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from espstream.optimize import optimize_model
from espstream.stream.streamify import streamify_model
from espstream.verify import verify_chunks, verify_models

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    ("models/tutorial_tcn.onnx", 3, "summary"),
    ("models/stream_tcn.onnx", 4, "time"),
    ("models/kws2d.onnx", 1, "time"),
    ("tests/data/esp-ppq/tutorial_tcn/model.onnx", 3, "summary"),
    ("tests/data/esp-ppq/stream_tcn/model.onnx", 4, "time"),
]


def _load(path: str) -> onnx.ModelProto:
    p = ROOT / path
    if not p.exists():
        pytest.fail(f"{path} is missing")
    return onnx.load(str(p))


@pytest.mark.parametrize("path,chunk,kind", CASES)
@pytest.mark.parametrize("optimized", [False, True])
def test_model_streams_and_verifies(path, chunk, kind, optimized):
    m = _load(path)
    if optimized:
        m = optimize_model(m).model
    r = streamify_model(m, chunk)
    (out,) = r.outputs.values()
    assert out["kind"] == kind
    if kind == "time":
        assert out["delay"] == 0 and out["warmup"] == 0
    else:
        assert out["equal_after_last_chunk"]
    assert r.state_bytes_float32 == 4 * r.state_bytes_int8 > 0
    v = verify_models(m, r.model, random=3)
    assert v.ok, v.failure()
    (o,) = v.outputs
    if kind == "time":
        T = m.graph.input[0].type.tensor_type.shape.dim[2].dim_value
        assert o.frames == f"0..{T - 1}"  # causal: every frame, from the first
    assert o.compared >= 1


def test_tutorial_state_memory_by_hand():
    # caches: 3 depthwise blocks (kernel 3, dilations 1, 2, 1: 2 + 4 + 2 frames of 32 ch),
    # the pool (2 frames of 32 ch) and, at chunk 1, the last-3-frames head (2 frames of 16 ch)
    r = streamify_model(_load("models/tutorial_tcn.onnx"), 1)
    assert r.state_bytes_int8 == (2 + 4 + 2 + 2) * 32 + 2 * 16
    r3 = streamify_model(_load("models/tutorial_tcn.onnx"), 3)
    assert r3.state_bytes_int8 == (2 + 4 + 2 + 2) * 32  # the chunk holds the 3 frames


def test_stream_tcn_chunks_in_one_run():
    results = verify_chunks(_load("models/stream_tcn.onnx"), [1, 2, 4, 8], random=2)
    assert [r.chunk for r in results] == [1, 2, 4, 8]
    assert all(r.ok for r in results), [r.failure() for r in results if not r.ok]


def test_model_sample_input_verifies():
    m = _load("models/kws2d.onnx")
    x = np.load(ROOT / "models/kws2d.input.npy")
    v = verify_models(m, streamify_model(m, 1).model, data=x)
    assert v.ok, v.failure()
    assert v.samples == (x.shape[0] if x.ndim == 4 else 1)


@pytest.mark.parametrize("path,chunk,kind", CASES[:3])
def test_calibrated_models_stream_exactly(path, chunk, kind):
    from espstream import quant

    m = optimize_model(_load(path)).model
    q = quant.calibrate_model(m, quant.random_data(quant.model_inputs(m), 8)).model
    r = streamify_model(q, chunk)
    v = verify_models(q, r.model, random=2, engine="fakequant")
    assert v.ok, v.failure()
    assert v.outputs[0].max_abs == 0.0  # the same integer grid, chunk by chunk

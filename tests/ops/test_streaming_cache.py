"""espstream/ops/streaming_cache.py: the cache streamify writes, calibrated, lowered to ESP-DL's
StreamingCache and simulated chunk by chunk; the chunked run equals the offline one."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import _data, model

from espstream.export import export_model
from espstream.quant import calibrate_model, scheme
from espstream.sim import Simulator, run_chunks
from espstream.stream.streamify import streamify_model

W = (np.random.default_rng(1).standard_normal((4, 4, 3)) * 0.4).astype(np.float32)


def _causal_conv():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3], pads=[2, 0])]
    return model(nodes, [1, 4, 12], {"w": W}), {"Conv"}


CASES = {"StreamingCache": _causal_conv}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize("target", ["esp32p4", "esp32s3", "c"])
def test_chunked_equals_offline(target: str) -> None:
    m, _ = _causal_conv()
    data, x = _data(m)
    qdq = calibrate_model(m, data, target=target, bits=8, report_samples=0).model
    off = export_model(qdq).graph
    st = export_model(streamify_model(qdq, 3).model).graph
    assert "StreamingCache" in {n.op_type for n in st.nodes}
    vi = off.inputs[0]
    q = scheme.quantize(x[:1].astype(np.float64), vi.exponents[0], 8,
                        scheme.get_target(target).rounding).transpose(0, 2, 1).copy()
    want = Simulator(off).run({"x": q})[off.outputs[0].name]
    calls = run_chunks(Simulator(st), {"x": q}, axis=1)
    got = np.concatenate([c[st.outputs[0].name] for c in calls], axis=1)
    assert np.array_equal(got, want)

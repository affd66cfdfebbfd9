"""Property: any temporal graph from the generator below, streamified with any valid chunk size,
computes what the offline graph computes (onnxruntime on both, compared by verify).

The generator draws kernels 1-7, dilations 1-8, strides 1 or 2, full / grouped / depthwise
convs, Max/Average pools (inclusive and exclusive), residual Adds, forks merged by Add or Concat,
causal or lookahead padding, ConvTranspose upsampling, a GRU, and the last-frames head.
"""

from __future__ import annotations

import os

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stream_graphs import G, add_qdq

from espstream.stream.streamify import analyze, streamify_model
from espstream.verify import verify_models


@st.composite
def temporal_graphs(draw):
    ch = draw(st.integers(1, 4))
    g = G(channels=ch, frames="T", seed=draw(st.integers(0, 2**16)))
    x = "x"
    flags = {"lookahead": False, "warm": False, "stride": 1, "up": False, "span": 0}

    def window(max_k=7):
        k = draw(st.integers(1, max_k))
        d = draw(st.integers(1, 8)) if k > 1 else 1
        K = (k - 1) * d + 1
        flags["span"] += K * flags["stride"]
        if draw(st.booleans()):
            left = K - 1
        else:
            left = draw(st.integers(0, K - 1))
            flags["lookahead"] |= left < K - 1
        return k, d, left, K - 1 - left

    def stride():
        if flags["stride"] < 4 and draw(st.integers(0, 3)) == 0:
            flags["stride"] *= 2
            return 2
        return 1

    def conv(t, cout=None, allow_stride=True):
        k, d, left, right = window()
        cin = g.ch[t]
        kind = draw(st.sampled_from(["full", "depthwise", "grouped"]))
        group = 1
        if kind == "depthwise":
            group = -1
        elif kind == "grouped" and cin % 2 == 0 and (cout or cin) % 2 == 0:
            group = 2
        s = stride() if allow_stride else 1
        y = g.conv(t, cout, k=k, d=d, s=s, group=group, left=left, right=right)
        act = draw(st.sampled_from(["", "Relu", "Sigmoid", "Tanh"]))
        return g.act(y, act) if act else y

    for _ in range(draw(st.integers(1, 4))):
        layer = draw(st.sampled_from(
            ["conv", "conv", "pool", "residual", "fork", "gru", "convT", "pad"]))
        if layer == "conv":
            x = conv(x, draw(st.integers(1, 4)))
        elif layer == "pool":
            kind = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            k = draw(st.integers(1, 4))
            left = draw(st.integers(0, k - 1))
            flags["lookahead"] |= left < k - 1
            incl = draw(st.integers(0, 1))
            flags["span"] += k * flags["stride"]
            if left and (kind == "MaxPool" or not incl):
                flags["warm"] = True  # may start differently: verify skips declared warm-up
            x = g.pool(x, kind, k=k, s=stride(), left=left, right=k - 1 - left, include_pad=incl)
        elif layer == "residual":
            x = g.add(x, conv(x, g.ch[x], allow_stride=False))
        elif layer == "fork":
            a = conv(x, g.ch[x], allow_stride=False)
            b = conv(x, g.ch[x], allow_stride=False)
            x = g.add(a, b) if draw(st.booleans()) else g.concat(a, b)
        elif layer == "gru":
            # a recurrence cannot start on lagging or warm-up frames (refused / all-warm)
            if not flags["lookahead"] and not flags["warm"] and not flags["up"]:
                x = g.gru(x, hidden=draw(st.integers(1, 5)))
        elif layer == "convT" and not flags["up"]:
            k = draw(st.integers(1, 4))
            p = draw(st.integers(0, (k - 1) // 2))
            flags["up"] = True
            flags["lookahead"] |= p > 0
            x = g.conv_transpose(x, k=k, s=2, left=p, right=p)
        elif layer == "pad":
            x = g.pad(x, draw(st.integers(0, 3)), draw(st.integers(0, 2)))
    outs = [x]
    if draw(st.booleans()):
        outs.append(g.last_frames_head(x, draw(st.integers(1, 3))))
    # long enough that the receptive field leaves frames to compare, short enough to be quick
    T = flags["span"] + 8 * flags["stride"] + draw(st.integers(4, 24))
    return g.model(*outs), T, flags


def _check(model, T, flags, chunk_factor, engine=None, qdq=False):
    if qdq:
        model = add_qdq(model)
    mult = analyze(model, axes={"x": 2}).chunk_multiple
    chunk = mult * chunk_factor
    r = streamify_model(model, chunk, axes={"x": 2})
    T = max(T, 2 * chunk)
    v = verify_models(model, r.model, random=1, engine=engine, frames=T)
    if not v.ok and os.environ.get("ESPSTREAM_KEEP_FAILURES"):
        onnx.save(model, f"/tmp/fail_{chunk}_{abs(hash(model.SerializeToString()))}.onnx")
    assert v.ok, v.failure()
    time_outs = [o for o in v.outputs if o.kind == "time"]
    assert time_outs and all(o.compared > 0 for o in time_outs)
    if not (flags["lookahead"] or flags["warm"] or flags["up"] or flags["stride"] > 1):
        # causal, frame-rate preserving: every frame the stream produced is compared
        assert time_outs[0].compared == (T // chunk) * chunk, time_outs[0].frames


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=temporal_graphs(), factor=st.integers(1, 3))
def test_streamify_equals_offline_float(case, factor):
    model, T, flags = case
    _check(model, T, flags, factor)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=temporal_graphs(), factor=st.integers(1, 2))
def test_streamify_equals_offline_fakequant(case, factor):
    model, T, flags = case
    _check(model, T, flags, factor, engine="fakequant", qdq=True)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=temporal_graphs(), factor=st.integers(1, 4))
def test_streamify_equals_offline_float_many(case, factor):
    model, T, flags = case
    _check(model, T, flags, factor)

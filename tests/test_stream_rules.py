"""One test (or a few) per streaming rule, with expectations worked out by hand.

Equality with the offline model is judged by onnxruntime running the offline graph (verify);
cache sizes, delays and warm-up counts below follow from the rules' arithmetic, not from the code.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from stream_graphs import G, add_qdq

from espstream.errors import UserError
from espstream.stream.streamify import analyze, streamify_model
from espstream.verify import verify_models


def stream(m: onnx.ModelProto, c: int, **kw):
    r = streamify_model(m, c, **kw)
    onnx.checker.check_model(r.model)
    return r


def equal(m: onnx.ModelProto, r, n: int = 2):
    v = verify_models(m, r.model, random=n)
    assert v.ok, v.failure()
    return {o.name: o for o in v.outputs}


def meta(r) -> dict:
    return {p.key: json.loads(p.value) for p in r.model.metadata_props}


def caches(r) -> dict[str, dict]:
    return {c["tensor"]: c for c in r.caches}


# ---- contract ---------------------------------------------------------------------------------


def test_output_model_contract():
    g = G(channels=2, frames=12)
    y = g.conv(g.relu(g.conv("x", 4, k=3)), 4, k=3, d=2)
    r = stream(g.model(y), 3)
    md = meta(r)
    assert md["espstream.chunk"] == 3
    assert md["espstream.time_axes"] == {"x": 2, y: 2}
    assert md["espstream.delay"] == {y: 0}
    gi = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in r.model.graph.input}
    go = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in r.model.graph.output}
    assert gi["x"] == [1, 2, 3] and go[y] == [1, 4, 3]
    assert len(md["espstream.states"]) == 2
    for sin, sout in md["espstream.states"]:
        assert gi[sin] == go[sout]
    # window 3 (kernel 3) on x: 2 frames; dilation 2 kernel 3: 4 frames
    assert sorted(gi[s][2] for s, _ in md["espstream.states"]) == [2, 4]
    nodes = [n for n in r.model.graph.node if n.op_type == "StreamingCache"]
    assert {n.domain for n in nodes} == {"espstream"}
    assert sorted(helper.get_attribute_value(a) for n in nodes for a in n.attribute
                  if a.name == "window_size") == [3, 5]
    assert any(o.domain == "espstream" for o in r.model.opset_import)
    equal(g.model(y), r)


def test_already_streamed_is_refused():
    g = G()
    m = g.model(g.conv("x", k=3))
    r = stream(m, 2)
    with pytest.raises(UserError, match="already a streaming model"):
        streamify_model(r.model, 2)


# ---- rule 1: windows, past padding, lookahead ---------------------------------------------


def test_causal_conv_cache_is_receptive_field_no_delay():
    g = G(channels=3)
    y = g.conv("x", 4, k=4, d=3)  # window (4-1)*3+1 = 10
    r = stream(g.model(y), 2)
    (c,) = r.caches
    assert c["window"] == 10 and c["frames"] == 9 and c["bytes_float32"] == 9 * 3 * 4
    assert c["bytes_int8"] == 9 * 3
    assert r.outputs[y]["delay"] == 0
    assert equal(g.model(y), r)[y].frames == "0..23"


def test_lookahead_becomes_delay_and_pre_start_frames_are_masked():
    g = G(channels=2)
    a = g.conv("x", 3, k=3, left=1, right=1)  # 'same': delay 1
    y = g.conv(g.act(a, "Sigmoid"), 3, k=3, left=1, right=1)  # another 1
    m = g.model(y)
    r = stream(m, 2)
    assert r.outputs[y]["delay"] == 2
    kinds = sorted(c["kind"] for c in r.caches)
    assert "mask" in kinds  # sigmoid(pre-start) != 0 must not leak into frame 0 as padding
    chk = equal(m, r)[y]
    assert chk.frames == "0..21"  # the last 2 frames used right padding offline


def test_without_the_mask_frame_zero_differs(monkeypatch):
    from espstream.stream import rewrite

    g = G(channels=2)
    a = g.conv("x", 3, k=3, left=1, right=1)
    y = g.conv(g.act(a, "Sigmoid"), 3, k=3, left=1, right=1)
    m = g.model(y)
    real_run = rewrite.Rewriter.run

    def no_masks(self):
        self.ctx.masks.clear()
        return real_run(self)

    monkeypatch.setattr(rewrite.Rewriter, "run", no_masks)
    v = verify_models(m, streamify_model(m, 2).model, random=1)
    assert not v.ok and v.outputs[0].first_diff == 0


def test_symmetric_pad_then_chomp_is_causal():
    g = G(channels=2)
    c = g.conv("x", 2, k=3, left=2, right=2)  # T + 2 frames
    y = g.op("Slice", [c, g.init("s", np.array([0], np.int64)),
                       g.init("e", np.array([-2], np.int64)), g.init("a", np.array([2], np.int64))])
    r = stream(g.model(y), 3)
    assert r.outputs[y]["delay"] == 0
    assert equal(g.model(y), r)[y].frames == "0..23"


def test_explicit_pad_folds_into_conv_cache():
    g = G(channels=2)
    y = g.conv(g.pad("x", 4), 2, k=3, d=2, left=0)
    r = stream(g.model(y), 1)
    (c,) = r.caches
    assert c["frames"] == 4  # one cache, not a delay of 4 plus a window of 4
    assert not any(n.op_type == "Pad" for n in r.model.graph.node)
    equal(g.model(y), r)


# ---- rule 2: stride and phase ---------------------------------------------------------------


def test_stride_needs_multiple_and_error_lists_valid_chunks():
    g = G(channels=2, frames=24)
    y = g.conv(g.conv("x", k=3, s=2), k=3, s=2)
    m = g.model(y)
    assert analyze(m).chunk_multiple == 4
    with pytest.raises(UserError, match=r"multiples of 4: 4, 8, 12"):
        streamify_model(m, 2)
    r = stream(m, 4)
    assert r.outputs[y]["frames_per_chunk"] == 1
    equal(m, r)


@pytest.mark.parametrize("left,right", [(0, 2), (1, 1), (2, 0), (0, 0)])
def test_strided_phase_matches_offline(left, right):
    g = G(channels=2, frames=25)
    y = g.conv("x", 3, k=3, s=2, left=left, right=right)
    m = g.model(y)
    r = stream(m, 2)
    # offline frame t reads x[2t - left .. 2t - left + 2]; it is complete after frame
    # 2t - left + 2, i.e. at stream frame t + delay with delay = ceil((2 - left) / 2)
    assert r.outputs[y]["delay"] == max(0, -(-(2 - left) // 2))
    equal(m, r)


# ---- rule 3: one tensor, several windows -----------------------------------------------------


def test_shared_tensor_one_cache_for_the_widest_window():
    g = G(channels=2)
    a = g.conv("x", 4, k=1)
    b1, b2, b3 = (g.conv(a, k=3, d=d) for d in (1, 2, 4))
    y = g.add(g.add(b1, b2), b3)
    m = g.model(y)
    r = stream(m, 1)
    c = caches(r)[a]
    assert c["frames"] == 8  # dilation 4, kernel 3
    assert sorted(u["frames"] for u in c["consumers"]) == [2, 4, 8]
    assert c["bytes_float32"] == 8 * 4 * 4
    assert c["bytes_float32_one_cache_per_consumer"] == (2 + 4 + 8) * 4 * 4
    assert len(r.caches) == 1
    equal(m, r)


# ---- rule 4: delay alignment ---------------------------------------------------------------------


@pytest.mark.parametrize("merge", ["Add", "Sub", "Mul", "Concat"])
def test_branches_with_different_delays_are_aligned(merge):
    g = G(channels=2)
    a = g.conv("x", 2, k=1)
    b = g.conv(a, 2, k=5, left=2, right=2)  # delay 2
    y = g.concat(a, b) if merge == "Concat" else g.op(merge, [a, b])
    m = g.model(y)
    r = stream(m, 3)
    assert r.outputs[y]["delay"] == 2
    delays = [u for c in r.caches for u in c["consumers"] if u.get("kind") == "delay"]
    assert [u["frames"] for u in delays] == [2]
    equal(m, r)


# ---- rule 5: the tutorial head -------------------------------------------------------------------


@pytest.mark.parametrize("chunk,frames", [(1, 2), (2, 1), (3, 0), (4, 0)])
def test_last_frames_head_is_a_window(chunk, frames):
    g = G(channels=2)
    y = g.last_frames_head(g.conv("x", 3, k=1), 3)
    m = g.model(y)
    r = stream(m, chunk)
    last = [c for c in r.caches if c["kind"] == "last"]
    assert [c["frames"] for c in last] == ([frames] if frames else [])
    assert r.outputs[y]["kind"] == "summary" and r.outputs[y]["equal_after_last_chunk"]
    if 24 % chunk == 0:
        assert equal(m, r)[y].compared == 1


def test_gather_last_frame_is_a_summary():
    g = G(channels=2)
    c = g.conv("x", 3, k=3)
    y = g.op("Gather", [c, g.init("i", np.array(23, np.int64))], axis=2)
    r = stream(g.model(y), 2)
    assert r.outputs[y]["kind"] == "summary"
    equal(g.model(y), r)


# ---- rule 6: recurrent state --------------------------------------------------------------------


@pytest.mark.parametrize("lstm", [False, True])
def test_recurrent_state_becomes_state_io(lstm):
    g = G(channels=3)
    y = g.gru(g.conv("x", 4, k=3), hidden=5, lstm=lstm)
    m = g.model(y)
    r = stream(m, 2)
    rec = [c for c in r.caches if c["kind"] == "recurrent"]
    assert len(rec) == (2 if lstm else 1)
    assert all(c["frame_elements"] == 5 for c in rec)
    equal(m, r)


def test_recurrent_after_lookahead_is_refused():
    g = G(channels=2)
    y = g.gru(g.conv("x", 3, k=3, left=1, right=1))
    with pytest.raises(UserError, match="lags 1 frame"):
        streamify_model(g.model(y), 1)


# ---- rule 7: pass-through, axis tracking, refusals ---------------------------------------------


def test_axis_followed_through_transpose_reshape_unsqueeze_flatten():
    g = G(channels=2)
    a = g.conv("x", 4, k=3)
    t = g.op("Transpose", [a], perm=[0, 2, 1])  # [1, T, 4], time at 1
    u = g.op("Unsqueeze", [t, g.init("ax", np.array([0], np.int64))])  # [1, 1, T, 4]
    rs = g.op("Reshape", [u, g.init("sh", np.array([24, 2, 2], np.int64))])  # time at 0
    f = g.op("Flatten", [rs], axis=1)  # [24, 4], time at 0
    m = g.model(f)
    r = stream(m, 3)
    assert r.outputs[f]["time_axis"] == 0 and r.outputs[f]["frames_per_chunk"] == 3
    equal(m, r)


@pytest.mark.parametrize(
    "op,attrs,match",
    [
        ("ReduceMean", {"axes": [2]}, "reduces over the time axis"),
        ("Softmax", {"axis": 2}, "normalises over the time axis"),
        ("Flatten", {"axis": 1}, "flattens the time axis"),
    ],
)
def test_frame_mixing_ops_are_refused_with_overrides_hint(op, attrs, match):
    g = G(channels=2)
    y = g.op(op, [g.conv("x", k=3)], **attrs)
    with pytest.raises(UserError, match=match) as e:
        streamify_model(g.model(y), 1)
    assert "--overrides" in str(e.value) and f"({op})" in str(e.value)


def test_conv_whose_kernel_does_not_fit_its_input_is_refused():
    """A Conv with a scalar weight passes onnx.checker; streamify names it instead of failing
    on an index (found by fuzzing)."""
    g = G(channels=2)
    m = g.model(g.conv(g.conv("x", k=3), k=3))
    w = m.graph.initializer[[i.name for i in m.graph.initializer].index(m.graph.node[-1].input[1])]
    w.CopyFrom(onnx.numpy_helper.from_array(np.ones((), np.float32), w.name))
    attrs = m.graph.node[-1].attribute
    del attrs[[a.name for a in attrs].index("kernel_shape")]  # so taken from the weight
    onnx.checker.check_model(m)
    with pytest.raises(UserError, match=r"\(Conv\): its kernel \(0-D\), dilations, strides or "
                                        "pads do not fit its rank-3 input"):
        streamify_model(m, 1)


def test_gather_along_time_is_refused():
    g = G(channels=2)
    y = g.op("Gather", [g.conv("x", k=3), g.init("i", np.array([0, 5], np.int64))], axis=2)
    with pytest.raises(UserError, match="picks frames along time"):
        streamify_model(g.model(y), 1)


def test_constant_varying_along_time_is_refused():
    g = G(channels=2)
    y = g.add(g.conv("x", k=3), g.init("pos", np.zeros((1, 2, 24), np.float32)))
    with pytest.raises(UserError, match="varies along time"):
        streamify_model(g.model(y), 1)


def test_window_override_makes_a_global_pool_stream():
    g = G(channels=2)
    c = g.conv("x", k=3)
    y = g.op("ReduceMean", [c], axes=[2], keepdims=0)
    m = g.model(y)
    r = stream(m, 4, overrides={"tensors": {c: {"window": 24}}})
    assert r.outputs[y]["kind"] == "summary"
    assert caches(r)[c]["frames"] == 20
    equal(m, r)


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"tensors": {"nope": {"window": 3}}}, "no tensor named 'nope'"),
        ({"tensors": {"x": {"size": 3}}}, "unknown key"),
        ({"tensors": {"x": {"delay": 0}}}, "must be positive"),
        ({"layers": {}}, "expected"),
    ],
)
def test_bad_overrides(spec, match):
    g = G()
    with pytest.raises(UserError, match=match):
        streamify_model(g.model(g.conv("x", k=3)), 1, overrides=spec)


def test_delay_override_adds_frames():
    g = G(channels=2)
    c = g.conv("x", k=3)
    y = g.relu(c)
    m = g.model(y)
    r = stream(m, 2, overrides={"tensors": {c: {"delay": 3}}})
    assert r.outputs[y]["delay"] == 3
    equal(m, r)


# ---- rule 8: MaxPool / exclusive AveragePool first frames -------------------------------------


def test_maxpool_on_signed_data_reports_warmup():
    g = G(channels=2)
    y = g.pool("x", "MaxPool", k=3)
    m = g.model(y)
    r = stream(m, 2)
    assert r.outputs[y]["warmup"] == 2  # frames 0 and 1 see -inf padding offline, zeros here
    assert meta(r)["espstream.warmup"][y] == 2
    assert any("may differ" in n for n in r.notes)
    assert equal(m, r)[y].frames == "2..23"


def test_maxpool_after_relu_is_exact_from_frame_zero():
    g = G(channels=2)
    y = g.pool(g.relu("x"), "MaxPool", k=3, s=1)
    r = stream(g.model(y), 2)
    assert r.outputs[y]["warmup"] == 0
    assert equal(g.model(y), r)[y].frames == "0..23"


def test_exclusive_average_pool_warmup_and_inclusive_exact():
    g = G(channels=2)
    y = g.pool("x", "AveragePool", k=4, include_pad=0)
    assert stream(g.model(y), 1).outputs[y]["warmup"] == 3
    g = G(channels=2)
    y = g.pool("x", "AveragePool", k=4, include_pad=1)
    r = stream(g.model(y), 1)
    assert r.outputs[y]["warmup"] == 0
    equal(g.model(y), r)


# ---- ConvTranspose -------------------------------------------------------------------------------


@pytest.mark.parametrize("k,s,left", [(4, 2, 1), (3, 2, 0), (1, 2, 0), (5, 3, 2)])
def test_conv_transpose_upsamples(k, s, left):
    g = G(channels=2, frames=12)
    y = g.conv_transpose("x", k=k, s=s, left=left, right=left)
    m = g.model(y)
    r = stream(m, 2)
    assert r.outputs[y]["frames_per_chunk"] == 2 * s
    assert r.outputs[y]["delay"] == left
    equal(m, r)


# ---- time-axis detection -------------------------------------------------------------------------


def test_detect_2d_causal_axis_and_ambiguous_error():
    g = G(channels=1, frames=16, features=6)
    y = g.conv("x", 4, k=3, fk=3, fpad=1)  # causal on T (axis 2), symmetric on F
    assert analyze(g.model(y)).input_axes == {"x": 2}
    r = stream(g.model(y), 1)
    equal(g.model(y), r)
    g = G(channels=1, frames=16, features=6)
    y = g.conv("x", 4, k=3, left=1, right=1, fk=3, fpad=1)
    with pytest.raises(UserError, match="--axis x:AXIS"):
        analyze(g.model(y))
    assert analyze(g.model(y), axes={"x": 2}).input_axes == {"x": 2}


def test_detect_dynamic_dimension_and_stream_it():
    g = G(channels=2, frames="T")
    y = g.conv("x", k=3)
    an = analyze(g.model(y))
    assert an.input_axes == {"x": 2} and "dynamic" in an.axes_why["x"]
    r = stream(g.model(y), 4)
    v = verify_models(g.model(y), r.model, random=1, frames=40)
    assert v.ok and v.frames == 40


def test_bad_axis_option():
    g = G()
    m = g.model(g.conv("x", k=3))
    with pytest.raises(UserError, match="no input 'y'"):
        streamify_model(m, 1, axes={"y": 2})
    with pytest.raises(UserError, match="rank 3"):
        streamify_model(m, 1, axes={"x": 5})


# ---- quantized (QDQ) models ----------------------------------------------------------------------


def test_qdq_cache_sits_on_dequantized_tensor_and_is_requantized():
    g = G(channels=2)
    a = g.conv("x", 3, k=3, left=1, right=1)
    y = g.add(a, g.conv(g.relu(a), 3, k=3, d=2))
    m = add_qdq(g.model(y))
    r = stream(m, 2)
    prod = {o: n for n in r.model.graph.node for o in n.output}
    for n in r.model.graph.node:
        if n.op_type == "StreamingCache":
            assert prod[n.input[0]].op_type in ("DequantizeLinear",), n.input[0]
    # every consumer of cached frames (through Slice or directly) reads a DequantizeLinear
    cache_outs = {n.output[0] for n in r.model.graph.node if n.op_type == "StreamingCache"}
    for n in r.model.graph.node:
        if n.op_type in ("Conv", "Add"):
            for i in n.input[:1] if n.op_type == "Conv" else n.input:
                assert prod[i].op_type == "DequantizeLinear", (n.name, i)
                assert i not in cache_outs
    assert all(q.op_type != "QuantizeLinear" or prod.get(q.input[0]) is None
               or prod[q.input[0]].op_type != "QuantizeLinear" for q in r.model.graph.node)
    chk = verify_models(m, r.model, random=2, engine="fakequant")
    assert chk.ok and chk.outputs[0].max_abs == 0.0


def test_float_model_is_refused_by_fakequant_engine():
    g = G()
    m = g.model(g.conv("x", k=3))
    with pytest.raises(UserError, match="needs a QDQ model"):
        verify_models(m, stream(m, 1).model, engine="fakequant")


def test_graph_without_time_input_asks_for_axis():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                            [y]), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UserError, match="--axis INPUT:AXIS"):
        streamify_model(m, 1)

"""Calibrating streaming models (streamify's and hand-written ones) and exporting hand-written
sliding-window states as ESP-DL StreamingCache nodes (issue 8, first half)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from cli_util import assert_user_error, espstream
from onnx import helper
from onnx_builders import make_model, run

from espstream import espdl, verify, verify_int8
from espstream.errors import UserError
from espstream.export import export_model
from espstream.lower import lower
from espstream.optimize import optimize_model
from espstream.quant import calibrate_model, read_calibration_data
from espstream.quant.data import model_inputs
from espstream.quant.observers import HistogramObserver
from espstream.quant.stream_calib import (
    merge_observers,
    sequence_inputs,
    stream_spec,
)
from espstream.stream.manual import describe, sliding_window_caches
from espstream.stream.streamify import streamify_model

verify_int8.register()
PTQ_OFF = {"equalize": False, "bias_correction": False, "adaround": False,
           "exponent_search": False}

C, K, CHUNK, T = 8, 3, 4, 32


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal([C, 1, K]) / np.sqrt(K)).astype(np.float32),
        "b": (0.1 * rng.standard_normal(C)).astype(np.float32),
        "w2": (rng.standard_normal([C, C, 1]) / np.sqrt(C)).astype(np.float32),
    }


def hand_written(slice_start: int = -(K - 1), slice_end: int = 2**62) -> onnx.ModelProto:
    """ESP-DL's manual path: Concat(cache, x) -> depthwise Conv -> ..., cache = last frames."""
    inits = {**weights(), "st": np.array([slice_start], np.int64),
             "en": np.array([slice_end], np.int64), "ax": np.array([2], np.int64)}
    return make_model([
        helper.make_node("Concat", ["cache", "x"], ["win"], axis=2, name="cat"),
        helper.make_node("Conv", ["win", "w", "b"], ["h"], group=C, kernel_shape=[K], name="dw"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1], name="pw"),
        helper.make_node("Slice", ["win", "st", "en", "ax"], ["new_cache"], name="keep"),
    ], {"x": [1, C, CHUNK], "cache": [1, C, K - 1]},
        {"y": [1, C, CHUNK], "new_cache": [1, C, K - 1]}, inits)


def offline() -> onnx.ModelProto:
    return make_model([
        helper.make_node("Conv", ["x", "w", "b"], ["h"], group=C, kernel_shape=[K],
                         pads=[K - 1, 0], name="dw"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1], name="pw"),
    ], {"x": [1, C, T]}, {"y": [1, C, T]}, weights())


def recurrent() -> onnx.ModelProto:
    """A state that is not a sliding window: y = x + 0.5 * cache, cache = last frame of y."""
    inits = {"half": np.array(0.5, np.float32), "st": np.array([-1], np.int64),
             "en": np.array([2**62], np.int64), "ax": np.array([2], np.int64),
             **{k: v for k, v in weights().items() if k == "w2"}}
    return make_model([
        helper.make_node("Mul", ["cache", "half"], ["decayed"], name="decay"),
        helper.make_node("Add", ["x", "decayed"], ["acc"], name="acc"),
        helper.make_node("Conv", ["acc", "w2"], ["y"], kernel_shape=[1], name="pw"),
        helper.make_node("Slice", ["acc", "st", "en", "ax"], ["new_cache"], name="keep"),
    ], {"x": [1, C, CHUNK], "cache": [1, C, 1]}, {"y": [1, C, CHUNK], "new_cache": [1, C, 1]},
        inits)


@pytest.fixture(scope="module")
def seqs(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("seq") / "calib.npy"
    np.save(path, np.random.default_rng(1).standard_normal([16, C, T]).astype(np.float32))
    return str(path)


def calibrate_hand(model, path, states=("cache:new_cache",), **kw):
    spec = stream_spec(model, states, data_path=path)
    data = read_calibration_data(path, sequence_inputs(model, spec))
    return calibrate_model(model, data, stream=spec, **kw)


def calibrate_offline(model, path, **kw):
    # a streaming calibration runs none of espstream.quant.ptq (its rule 4): the offline one
    # it is compared with has them off too
    return calibrate_model(model, read_calibration_data(path, model_inputs(model)),
                           **{**PTQ_OFF, **kw})


# ---- recognising the streaming model --------------------------------------------------------


def test_spec_of_hand_written_model_from_options_and_data(seqs):
    spec = stream_spec(hand_written(), ["cache:new_cache"], data_path=seqs)
    assert (spec.chunk, spec.input_axes, spec.output_axes) == (4, {"x": 2}, {"y": 2})
    assert spec.states == [("cache", "new_cache")] and spec.source == "options"


def test_spec_of_streamify_output_from_metadata():
    sm = streamify_model(offline(), 4).model
    spec = stream_spec(sm)
    assert spec.source == "metadata" and spec.chunk == 4 and spec.input_axes == {"x": 2}
    assert len(spec.states) == 1


@pytest.mark.parametrize("kw, fragment", [
    ({"states": ["cache:nope"]}, "no output 'nope'"),
    ({"states": ["nope:new_cache"]}, "no input 'nope'"),
    ({"states": ["cache"]}, "expected STATE_INPUT:STATE_OUTPUT"),
    ({"states": ["cache:y"]}, "needs the state's shape"),
    ({"states": ["cache:new_cache"], "chunk": 8}, "takes 4 frames per call"),
    ({"chunk": 4}, "name its states with --state"),
    ({"states": ["cache:new_cache"], "axes": {"cache": 2}}, "is a state"),
])
def test_spec_refusals(kw, fragment, seqs):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        stream_spec(hand_written(), data_path=seqs, **kw)


def test_ambiguous_time_axis_asks_for_axis(tmp_path):
    path = tmp_path / "one_chunk.npy"
    np.save(path, np.zeros([2, C, CHUNK], np.float32))  # data no longer than one chunk
    m = hand_written()
    with pytest.raises(UserError, match="pass --axis x:AXIS"):
        stream_spec(m, ["cache:new_cache"], data_path=str(path))
    assert stream_spec(m, ["cache:new_cache"], axes={"x": 2},
                       data_path=str(path)).input_axes == {"x": 2}


# ---- calibration on chunks with the state fed back -----------------------------------------


def test_merge_observers_equals_observing_everything():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(1000) * 0.1
    b = rng.standard_normal(500) * 7.0
    oa, ob, both = HistogramObserver(256), HistogramObserver(256), HistogramObserver(256)
    oa.update(a)
    ob.update(b)
    both.update(np.concatenate([a, b]))
    m = merge_observers([oa, ob])
    assert m.top == both.top and np.array_equal(m.hist, both.hist)
    assert (m.min, m.max, m.count) == (both.min, both.max, both.count)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_hand_written_calibration_ties_the_loop_and_matches_offline(seqs, method):
    rh = calibrate_hand(hand_written(), seqs, method=method)
    ro = calibrate_offline(offline(), seqs, method=method)
    e = rh.exponents
    assert e["cache"] == e["new_cache"] == e["win"] == e["x"]
    assert rh.plan.ties == [("cache", "new_cache")]
    for name in ("x", "r", "y"):
        assert e[name] == ro.exponents[name], name
    # every chunk of every sequence was run: 16 sequences of 32 frames in chunks of 4
    assert rh.chunks == 16 * T // CHUNK
    meta = {p.key: p.value for p in rh.model.metadata_props}
    assert json.loads(meta["espstream.states"]) == [["cache", "new_cache"]]
    assert json.loads(meta["espstream.chunk"]) == CHUNK
    assert json.loads(meta["espstream.time_axes"]) == {"x": 2, "y": 2}
    # the streaming output SQNR (own states) equals the offline model's on the same data
    assert rh.report.outputs["y"] == pytest.approx(ro.report.outputs["y"], abs=1e-6)


def test_state_loop_with_differing_exponents_gets_one(seqs):
    """Mul(cache) -> Add: the state input is a layer of its own, so without the tie its
    exponent would come from its own observer; with it, one exponent covers the loop."""
    m = recurrent()
    spec = stream_spec(m, ["cache:new_cache"], data_path=seqs)
    data = read_calibration_data(seqs, sequence_inputs(m, spec))
    r = calibrate_model(m, data, stream=spec, method="minmax")
    alone = {t: r.observers[t].exponent("minmax", 8) for t in ("cache", "acc")}
    assert alone["cache"] != alone["acc"]  # the case the tie is for
    assert r.exponents["cache"] == r.exponents["new_cache"] == r.exponents["acc"]
    assert r.exponents["acc"] == max(alone.values())  # the merged range covers both
    scales = {n.input[0]: onnx.numpy_helper.to_array(
        next(i for i in r.model.graph.initializer if i.name == n.input[1]))
        for n in r.model.graph.node if n.op_type == "QuantizeLinear"}
    assert scales["cache"] == scales["new_cache_float"]


def test_streamify_output_calibrates_like_the_offline_model():
    """The automatic path: streamify a float model, then calibrate the streaming model on
    whole sequences; the exponents equal those of calibrating the offline model."""
    m = optimize_model(onnx.load("models/stream_tcn.onnx")).model
    sm = streamify_model(m, 4).model
    spec = stream_spec(sm)
    rs = calibrate_model(sm, read_calibration_data("models/stream_tcn.calib.npy",
                                                   sequence_inputs(sm, spec)),
                         stream=spec, report_samples=0)
    ro = calibrate_model(m, read_calibration_data("models/stream_tcn.calib.npy",
                                                  model_inputs(m)), report_samples=0,
                         **PTQ_OFF)  # ptq rule 4: the streaming calibration has none
    shared = set(rs.exponents) & set(ro.exponents)
    assert len(shared) > 10
    assert {t: rs.exponents[t] for t in shared} == {t: ro.exponents[t] for t in shared}
    x = np.load("models/stream_tcn.input.npy")
    res = verify.verify_models(ro.model, rs.model, data=x, engine="int8")
    assert res.ok and all(o.exact == 1.0 for o in res.outputs)


# ---- export: sliding windows become StreamingCache -------------------------------------------


def test_sliding_window_rewrite_is_exact_in_float():
    m = hand_written()
    meta = m.metadata_props.add(key="espstream.states", value='[["cache", "new_cache"]]')
    assert meta.value
    out = sliding_window_caches(m)
    caches = [n for n in out.graph.node if n.op_type == "StreamingCache"]
    assert len(caches) == 1 and "Concat" not in [n.op_type for n in out.graph.node]
    attrs = {a.name: a.i for a in caches[0].attribute}
    assert attrs == {"window_size": K, "axis": 2}
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal([1, C, CHUNK]).astype(np.float32), rng.standard_normal(
        [1, C, K - 1]).astype(np.float32)
    a = run(m, {"x": x, "cache": c})
    b = dict(zip([o.name for o in out.graph.output], run(out, {"x": x, "cache": c}),
                 strict=True))
    assert np.array_equal(a[0], b["y"]) and np.array_equal(a[1], b["new_cache"])


def test_hand_written_exports_and_equals_offline_and_streamify_in_the_simulator(seqs):
    rh = calibrate_hand(hand_written(), seqs, method="minmax", report_samples=0)
    ro = calibrate_offline(offline(), seqs, method="minmax", report_samples=0)
    g = lower(rh.model)
    cache = [n for n in g.nodes if n.op_type == "StreamingCache"]
    assert [(n.attrs["window_size"], n.attrs["frame_axis"]) for n in cache] == [(K, 1)]
    assert [v.name for v in g.inputs] == ["x"]  # the state left the graph
    hand_file = espdl.read(export_model(rh.model, test_random=True).data)
    off_file = espdl.read(export_model(ro.model).data)
    auto_file = espdl.read(export_model(streamify_model(ro.model, CHUNK).model).data)
    assert all(c.ok for c in verify_int8.check_test_values(hand_file))
    for stream_file in (hand_file, auto_file):
        res = verify_int8.verify_espdl_pair(off_file, stream_file, random=3)
        assert res.ok and all(o.exact == 1.0 and o.compared == T for o in res.outputs)
    # and the ONNX engines agree frame by frame
    for engine in ("fakequant", "int8"):
        res = verify.verify_models(ro.model, rh.model, random=2, engine=engine)
        assert res.ok and res.outputs[0].max_abs == 0.0


def test_state_that_is_not_a_window_is_named_at_export(seqs):
    m = recurrent()
    r = calibrate_hand(m, seqs, report_samples=0)
    with pytest.raises(UserError, match=r"state 'cache' -> 'new_cache' is not a StreamingCache "
                                        r"state.*read by Mul 'decay'"):
        export_model(r.model)
    assert describe(r.model)[0]["sliding_window"] is False


def test_slice_of_the_wrong_frames_is_not_a_window(seqs):
    m = hand_written(slice_start=0, slice_end=K - 1)  # keeps the first frames, not the last
    r = calibrate_hand(m, seqs, report_samples=0)
    with pytest.raises(UserError, match="does not keep the last 2 frames"):
        lower(r.model)


# ---- the command line -----------------------------------------------------------------------


def test_cli_calibrate_hand_written_then_export(tmp_path, seqs):
    src = tmp_path / "hand.onnx"
    onnx.save(hand_written(), src)
    q = tmp_path / "hand.qdq.onnx"
    p = espstream("calibrate", src, "-d", seqs, "--state", "cache:new_cache", "-o", q,
                  "--json", tmp_path / "c.json", "-q")
    assert p.returncode == 0, p.stderr.decode()
    rep = json.loads((tmp_path / "c.json").read_text())
    assert rep["streaming"]["chunk"] == CHUNK and rep["streaming"]["tied_states"] == [
        ["cache", "new_cache"]]
    p = espstream("export", q, "-o", tmp_path / "hand.espdl", "--test-random", "-q")
    assert p.returncode == 0, p.stderr.decode()
    p = espstream("verify", tmp_path / "hand.espdl", "-q")
    assert p.returncode == 0, p.stderr.decode()


def test_cli_bad_state_pair_and_non_window_export(tmp_path, seqs):
    src = tmp_path / "hand.onnx"
    onnx.save(hand_written(), src)
    assert_user_error(espstream("calibrate", src, "-d", seqs, "--state", "cache:missing"),
                      "--state cache:missing", "no output 'missing'")
    rec = tmp_path / "rec.onnx"
    onnx.save(recurrent(), rec)
    q = tmp_path / "rec.qdq.onnx"
    p = espstream("calibrate", rec, "-d", seqs, "--state", "cache:new_cache", "-o", q, "-q")
    assert p.returncode == 0, p.stderr.decode()
    assert_user_error(espstream("export", q, "-o", tmp_path / "rec.espdl"),
                      "state 'cache' -> 'new_cache'", "read by Mul 'decay'")

"""espstream.quant.engine: which onnxruntime sessions a calibration makes, and the batching
trial's comparison (`_allclose`, a fast path of np.allclose)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import helper
from onnx_builders import make_model, rand

from espstream.errors import UserError
from espstream.quant import engine, model_inputs, random_data
from espstream.quant.engine import Runner, _allclose, observe


def _conv_model():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, {"x": [1, 3, 10]}, {"y": [1, 4, 10]},
                      {"w": rand(4, 3, 3), "b": rand(4)})


def _fixed_reshape_model():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"], name="rs"),
             helper.make_node("Relu", ["r"], ["y"], name="relu")]
    return make_model(nodes, {"x": [1, 2, 3]}, {"y": [1, 6]}, {"s": np.array([1, 6], np.int64)})


@pytest.fixture
def sessions(monkeypatch):
    """Every session the engine makes: (symbolic batch?, intra-op threads)."""
    made: list[tuple[bool, int]] = []
    real = engine.new_session

    def counting(model, opts):
        dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        made.append((dim.HasField("dim_param"), opts.intra_op_num_threads))
        return real(model, opts)

    monkeypatch.setattr(engine, "new_session", counting)
    return made


def _hists(observers):
    return {k: (o.top, o.count, o.min, o.max, o.hist.tolist()) for k, o in observers.items()}


def test_batched_calibration_makes_one_session_single_threaded_when_one_run(sessions):
    m = _conv_model()
    obs, batched = observe(m, ["x", "y"], random_data(model_inputs(m), 16), batch=16)
    assert batched
    assert sessions == [(True, 1)]  # the trial's session serves every run, on one thread
    assert obs["y"].count == 16 * 4 * 10


def test_more_data_than_one_batch_keeps_default_threads(sessions):
    m = _conv_model()
    _, batched = observe(m, ["y"], random_data(model_inputs(m), 20), batch=8)
    assert batched
    assert sessions == [(True, 0)]


def test_batched_values_match_one_sample_runs():
    m = _conv_model()
    a, batched = observe(m, ["x", "c", "y"], random_data(model_inputs(m), 12), batch=4)
    b, single = observe(m, ["x", "c", "y"], random_data(model_inputs(m), 12), batch=1)
    assert batched and not single
    for t in a:
        assert a[t].count == b[t].count
        assert a[t].min == pytest.approx(b[t].min, rel=1e-5)
        assert a[t].max == pytest.approx(b[t].max, rel=1e-5)
    assert _hists(a)["x"] == _hists(b)["x"]  # an input goes through untouched


def test_batch_one_makes_only_the_one_sample_session(sessions):
    m = _conv_model()
    _, batched = observe(m, ["y"], random_data(model_inputs(m), 5), batch=1)
    assert not batched
    assert sessions == [(False, 1)]


def test_a_single_sample_runs_on_the_model_as_given(sessions):
    m = _conv_model()
    a, batched = observe(m, ["c", "y"], random_data(model_inputs(m), 1), batch=8)
    b, _ = observe(m, ["c", "y"], random_data(model_inputs(m), 1), batch=1)
    assert not batched
    assert sessions[0] == (True, 1) and sessions[1] == (False, 1)  # trial unused, then lazy
    assert _hists(a) == _hists(b)


def test_failed_trial_falls_back_to_one_sample_runs(sessions):
    m = _fixed_reshape_model()
    a, batched = observe(m, ["r", "y"], random_data(model_inputs(m), 6), batch=8)
    b, _ = observe(m, ["r", "y"], random_data(model_inputs(m), 6), batch=1)
    assert not batched
    assert sessions[:2] == [(True, 1), (False, 1)]
    assert _hists(a) == _hists(b)
    assert a["y"].count == 6 * 6


def test_a_model_onnxruntime_cannot_load_fails_before_any_data_is_read():
    # Declared float but the Relu gets an int64 initializer: onnx accepts the file,
    # onnxruntime refuses to build the session.
    m = make_model([helper.make_node("Add", ["x", "k"], ["y"], name="add")],
                   {"x": [1, 4]}, {"y": [1, 4]}, {"k": np.ones((1, 4), np.int64)})

    def data():
        raise AssertionError("data read before the model was loaded")
        yield  # pragma: no cover

    with pytest.raises(UserError, match="onnxruntime cannot load the model"):
        r = Runner(m, ["y"], batch=8)
        list(r.run(data()))


def test_allclose_edge_cases_match_numpy():
    f = np.float32
    cases = [
        (np.array([5.0], f), np.array([np.inf], f)),  # |t - a| <= inf would pass naively
        (np.array([np.inf], f), np.array([np.inf], f)),
        (np.array([-np.inf], f), np.array([np.inf], f)),
        (np.array([np.nan], f), np.array([1.0], f)),
        (np.array([3e38], f), np.array([-3e38], f)),  # the difference overflows
        (np.array([1.0, 2.0], f), np.array([1.0, 2.0001], f)),
        (np.array([1.0, 2.0], f), np.array([1.0, 2.1], f)),
    ]
    with np.errstate(over="ignore"):  # both sides see the overflowing difference
        for t, a in cases:
            for atol in (1e-7, 1e-3):
                assert _allclose(t, a, 1e-4, atol) == np.allclose(t, a, rtol=1e-4, atol=atol)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 8),
               elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    st.data(),
    st.sampled_from([0.0, 1e-7, 1e-3, 1.0]),
)
def test_allclose_is_numpy_allclose(t, data, atol):
    noise = data.draw(hnp.arrays(np.float32, t.shape, elements=st.sampled_from(
        [0.0, 1e-7, -1e-6, 1e-3, np.inf, np.nan, 1e30])))
    with np.errstate(all="ignore"):
        a = (t + noise).astype(np.float32)
        assert _allclose(t, a, 1e-4, atol) == np.allclose(t, a, rtol=1e-4, atol=atol)


def _one_sample_bytes(m, names):
    s = next(iter(random_data(model_inputs(m), 1)))
    r = Runner(m, names, batch=1)
    _, vals = next(r.run([s]))
    return sum(v.nbytes for v in vals) + sum(v.nbytes for v in s.values())


def test_byte_budget_sets_the_samples_per_run():
    m = _conv_model()
    names = ["x", "c", "y"]
    one = _one_sample_bytes(m, names)
    r = Runner(m, names, batch=64, samples=12, max_bytes=5 * one)
    counts = [k for k, _ in r.run(random_data(model_inputs(m), 12))]
    assert r.batched is not None and r.per_run == 5
    assert counts == [5, 5, 2]
    r = Runner(m, names, batch=4, samples=12, max_bytes=5 * one)  # --batch still caps it
    assert [k for k, _ in r.run(random_data(model_inputs(m), 12))] == [4, 4, 4]


def test_budget_below_the_trial_runs_one_by_one_with_the_same_exponents(sessions):
    m = _conv_model()
    names = ["x", "c", "y"]
    one = _one_sample_bytes(m, names)
    sessions.clear()
    a, batched = observe(m, names, random_data(model_inputs(m), 12), batch=64,
                         max_bytes=3 * one - 1)
    assert not batched
    assert sessions == [(True, 1)]  # the trial's session (batch 1) serves every run
    b, _ = observe(m, names, random_data(model_inputs(m), 12), batch=64)
    c, _ = observe(m, names, random_data(model_inputs(m), 12), batch=1)
    for t in names:
        for method in ("minmax", "mse", "kl", "percentile"):
            assert a[t].exponent(method, 8) == b[t].exponent(method, 8) == c[t].exponent(method, 8)
    assert _hists(a) == _hists(c)  # one by one through either session: the same values

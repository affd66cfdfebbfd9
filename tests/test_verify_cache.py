"""What convert's checks share (VerifyCache, kept runner outputs, export's graph in the
simulator) gives the same verdicts and numbers as computing everything afresh, and the sharing
really happens (lower, analyze and the offline runs are done once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import espstream.lower
import espstream.verify as v
from espstream import verify_int8
from espstream.convert import convert_model
from espstream.optimize import optimize_model
from espstream.quant import calibrate_model, model_inputs, read_calibration_data
from espstream.stream.streamify import streamify_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "data" / "esp-ppq" / "stream_tcn" / "model.onnx"  # fixed T = 64
CALIB = ROOT / "tests" / "data" / "esp-ppq" / "stream_tcn" / "calib.npy"


@pytest.fixture(scope="module")
def models():
    """(float offline, float streaming, QDQ offline, QDQ streaming, 3 verification samples)."""
    opt = optimize_model(onnx.load(MODEL)).model
    data = read_calibration_data(str(CALIB), model_inputs(opt))
    cal = calibrate_model(opt, data, target="esp32s3", bits=8).model  # rounds half up
    fs = streamify_model(opt, 4)
    qs = streamify_model(cal, 4)
    x = np.load(CALIB)[:3]
    return opt, fs, cal, qs, x


class Counting:
    """Wraps a runner and counts its runs."""

    def __init__(self, runner):
        self.runner, self.runs = runner, 0

    def reset(self):
        self.runner.reset()

    def run(self, feeds):
        self.runs += 1
        return self.runner.run(feeds)


@pytest.mark.parametrize("engine", ["float", "fakequant", "int8"])
def test_verify_with_a_cache_reports_what_verify_without_one_does(models, engine):
    verify_int8.register()
    opt, fs, cal, qs, x = models
    off, st = (opt, fs.model) if engine == "float" else (cal, qs.model)
    plain = v.verify_models(off, st, data=x, engine=engine)
    cache = v.VerifyCache()
    cache.add_streamify_analysis(off, fs if engine == "float" else qs, None)
    first = v.verify_models(off, st, data=x, engine=engine, cache=cache)
    again = v.verify_models(off, st, data=x, engine=engine, cache=cache)  # kept outputs
    assert plain.ok and plain.to_json() == first.to_json() == again.to_json()


def test_offline_runs_and_analyses_happen_once(models, monkeypatch):
    opt, fs, cal, qs, x = models
    calls = []
    real = v.offline_analysis
    monkeypatch.setattr(v, "offline_analysis", lambda *a: calls.append(a) or real(*a))
    cache = v.VerifyCache()
    runner = cache.runner(v.FakeQuantEngine(), cal, "calibrated model")
    sess, runs = runner.sess, []

    class Session:  # counts what reaches onnxruntime
        def run(self, names, feeds):
            runs.append(1)
            return sess.run(names, feeds)

    runner.sess = Session()
    for _ in range(3):
        res = v.verify_models(cal, qs.model, data=x, engine="fakequant", cache=cache)
        assert res.ok
    assert len(calls) == 1  # one analysis of the offline model at 64 frames
    assert len(runs) == len(x)  # three verifications, each sample run once


def test_streamify_analysis_is_what_verify_would_compute(models):
    opt, fs, cal, qs, x = models
    for model, res in ((opt, fs), (cal, qs)):
        axes = {n: i["axis"] for n, i in res.input_axes.items()}
        assert res.offline_frames == {"x": 64}
        infos, note = v.offline_analysis(model, axes, None, 64)
        assert note is None and infos == res.offline_outputs


def test_kept_outputs_are_read_only_and_equal(models):
    opt, fs, cal, qs, x = models
    r = v.OrtRunner(cal, "m")
    fresh = r.run({"x": x[:1]})
    r.keep_outputs()
    a = r.run({"x": x[:1]})
    b = r.run({"x": x[:1].copy()})  # equal bytes: the same outputs, not run again
    assert len(r._kept) == 1
    for name in fresh:
        np.testing.assert_array_equal(a[name], fresh[name])
        assert a[name] is b[name] and not a[name].flags.writeable
    r.run({"x": x[1:2]})
    assert len(r._kept) == 2


def test_engines_without_keep_outputs_are_wrapped(models):
    opt, fs, cal, qs, x = models

    class Plain:
        name = "plain"

        def load(self, model, label):
            return Counting(v.OrtRunner(model, label))

        def tolerance(self, model, output):
            return 0.0, 0.0

    cache = v.VerifyCache()
    r = cache.runner(Plain(), opt, "optimized model")
    assert isinstance(r, v.KeptOutputs)
    for _ in range(3):
        r.run({"x": x[:1]})
    assert r.runner.runs == 1


def test_int8_runner_on_a_given_graph_and_its_kept_outputs(models, monkeypatch):
    opt, fs, cal, qs, x = models
    graph = espstream.lower.lower(qs.model)
    monkeypatch.setattr(espstream.lower, "lower", lambda *a, **k: pytest.fail("lowered again"))
    st = verify_int8.Int8Runner(qs.model, "streaming model", graph=graph)
    assert st.graph is graph
    with pytest.raises(ValueError, match="streaming"):
        st.keep_outputs()  # its outputs depend on the chunks before


def test_int8_vs_fakequant_with_given_runners_is_the_same(models):
    opt, fs, cal, qs, x = models
    samples = [{"x": x[k : k + 1]} for k in range(len(x))]
    plain = verify_int8.int8_vs_fakequant(cal, samples)
    cache = v.VerifyCache()
    sim = cache.runner(verify_int8.Int8Engine(), cal, "m")
    ort = cache.runner(v.FakeQuantEngine(), cal, "m")
    for s in samples:  # as convert's SQNR check runs them first
        sim.run(s)
        ort.run(s)
    shared = verify_int8.int8_vs_fakequant(cal, samples, sim=sim, ort=ort)
    assert shared.to_json() == plain.to_json()
    assert len(sim._kept) == len(ort._kept) == len(samples)


@pytest.mark.parametrize("chunk,lowers", [(4, 2), (None, 1)])
def test_convert_lowers_and_analyses_once_per_model(monkeypatch, chunk, lowers):
    """Streaming: export lowers the QDQ streaming model (the int8 check runs that graph) and the
    int8 check lowers the QDQ offline model; offline: export's graph serves SQNR and agreement.
    The fixture has a fixed length, so verify takes streamify's analyses."""
    counts = {"lower": 0, "analysis": 0}
    real_lower, real_analysis = espstream.lower.lower, v.offline_analysis

    def lower(*a, **k):
        counts["lower"] += 1
        return real_lower(*a, **k)

    def analysis(*a):
        counts["analysis"] += 1
        return real_analysis(*a)

    monkeypatch.setattr(espstream.lower, "lower", lower)
    monkeypatch.setattr("espstream.export.lower", lower)
    monkeypatch.setattr(v, "offline_analysis", analysis)
    r = convert_model(onnx.load(MODEL), CALIB, chunk=chunk)
    assert r.ok, r.failure()
    assert counts == {"lower": lowers, "analysis": 0}


def test_kept_outputs_stay_within_their_byte_budget(models):
    """OutputMemo: outputs are kept while they fit in max_bytes; one that does not fit is kept
    only until the next input, so a repeat right after it is not run again."""
    opt, fs, cal, qs, x = models
    x = np.load(CALIB)[:4]
    one = sum(int(a.nbytes) for a in v.OrtRunner(opt, "m").run({"x": x[:1]}).values())
    r = v.KeptOutputs(v.OrtRunner(opt, "m"))
    r._kept = v.OutputMemo(max_bytes=2 * one + one // 2)
    counted = r.runner = Counting(r.runner)
    for k in range(4):
        r.run({"x": x[k : k + 1]})
    assert counted.runs == 4 and len(r._kept) == 2 and r._kept.bytes == 2 * one
    r.run({"x": x[3:4]})  # the last one, over the budget: still answered from memory
    r.run({"x": x[0:1]})  # within the budget
    assert counted.runs == 4
    again = r.run({"x": x[2:3]})  # neither: run again, the same values
    assert counted.runs == 5
    fresh = v.OrtRunner(opt, "m").run({"x": x[2:3]})
    for name, a in fresh.items():
        np.testing.assert_array_equal(again[name], a)


def test_feeds_key_tells_inputs_apart_by_type_shape_and_bytes():
    a = np.arange(6, dtype=np.float32).reshape(1, 6)
    assert v.feeds_key({"x": a}) == v.feeds_key({"x": a.copy()})
    assert v.feeds_key({"x": a.T}) == v.feeds_key({"x": np.ascontiguousarray(a.T)})
    b = a.copy()
    b[0, 5] = np.nextafter(b[0, 5], np.float32(9))
    for other in (b, a.reshape(1, 2, 3), a.astype(np.float64)):
        assert v.feeds_key({"x": a}) != v.feeds_key({"x": other})
    assert v.feeds_key({"x": a}) != v.feeds_key({"y": a})


def test_sqnr_check_sums_one_sample_at_a_time(models, monkeypatch):
    """convert's check 5 adds each sample to float64 sums: the SQNRs are those of all samples
    concatenated (numpy here), each sample runs once per engine even when nothing fits in the
    kept outputs' budget, and the agreement counts are int8_vs_fakequant's."""
    from espstream import convert

    opt, fs, cal, qs, x = models
    samples = [{"x": x[k : k + 1]} for k in range(len(x))]
    monkeypatch.setattr(v, "KEEP_BYTES", 0)
    sims: list = []

    class Sim(verify_int8.Int8Runner):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.runs = 0
            sims.append(self)
            simulate = self.sim.run

            def counted(q):
                self.runs += 1
                return simulate(q)

            self.sim.run = counted

    monkeypatch.setattr(verify_int8, "Int8Runner", Sim)
    sqnr, check = convert._sqnr_check(opt, cal, samples)
    assert check.ok, check.detail
    (sim,) = sims
    monkeypatch.undo()
    assert sim.runs == len(samples) and len(sim._kept) == 0
    ref = v.OrtRunner(opt, "f")
    fq = v.OrtRunner(cal, "q")
    i8 = verify_int8.Int8Runner(cal, "i")
    (name,) = sqnr
    r = np.concatenate([ref.run(s)[name] for s in samples]).astype(np.float64)
    for engine, runner in (("fakequant", fq), ("int8", i8)):
        got = np.concatenate([runner.run(s)[name] for s in samples]).astype(np.float64)
        want = 10 * np.log10(np.sum(r**2) / np.sum((r - got) ** 2))
        assert sqnr[name][engine] == pytest.approx(want, rel=1e-12)
    agree = verify_int8.int8_vs_fakequant(cal, samples)
    assert check.report["agreement"] == agree.to_json()

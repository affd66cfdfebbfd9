"""espstream.quant.ptq: every technique keeps a QDQ model the simulator computes exactly; the
options, defaults, metadata and the streaming rule."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from cli_util import espstream
from onnx import helper
from ptq_util import OFF, arrays, data, ds_block, graph, only

from espstream.quant import calibrate_model
from espstream.quant.calibrate import PTQ_NAMES
from espstream.verify_int8 import int8_vs_fakequant


def _head() -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Relu -> Gemm."""
    rng = np.random.default_rng(7)
    inits = {"w1": rng.standard_normal((8, 4, 3)) * 0.3, "b1": rng.standard_normal(8) * 0.1,
             "w2": rng.standard_normal((6, 8)) * 0.3, "b2": rng.standard_normal(6) * 0.1,
             "w3": rng.standard_normal((3, 6)) * 0.3, "b3": rng.standard_normal(3) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", kernel_shape=[3]),
             helper.make_node("Relu", ["c"], ["r"], name="r"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["g"], name="g1", transB=1),
             helper.make_node("Relu", ["g"], ["gr"], name="gr"),
             helper.make_node("Gemm", ["gr", "w3", "b3"], ["y"], name="g2", transB=1)]
    return graph(nodes, inits, [1, 4, 12])


CASES = [*[only(k) for k in PTQ_NAMES], {k: True for k in PTQ_NAMES}]


@pytest.mark.parametrize("opts", CASES, ids=["+".join(k for k, v in c.items() if v)
                                              for c in CASES])
@pytest.mark.parametrize("build", [ds_block, _head], ids=["ds_block", "head"])
def test_simulator_equals_fake_quant_exactly_on_esp32p4(opts, build):
    m = build()
    d = data(m, 8, 0, offset=0.5)
    cal = calibrate_model(m, d, target="esp32p4", report_samples=0, **opts)
    onnx.checker.check_model(cal.model)
    x = arrays(data(m, 3, 5))
    agree = int8_vs_fakequant(cal.model, [{"x": x[i:i + 1]} for i in range(3)])
    for c in agree.checks:
        assert c.max_lsb == 0 and c.identical == c.size > 0, c
    meta = {p.key: p.value for p in cal.model.metadata_props}
    assert meta["espstream.ptq"] == ",".join(k for k in PTQ_NAMES if opts[k])
    assert cal.ptq == [k for k in PTQ_NAMES if opts[k]]


def test_each_technique_changes_something():
    m = ds_block(0, spread=30.0)
    d = data(m, 8, 0, offset=0.5)
    off = calibrate_model(m, d, target="esp32s3", report_samples=0, **OFF)

    def inits(r):
        return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in r.model.graph.initializer}

    for k in ("equalize", "bias_correction", "adaround"):
        on = calibrate_model(m, d, target="esp32s3", report_samples=0, **only(k))
        assert inits(on) != inits(off), k


def test_defaults_int8_on_int16_off():
    m = ds_block(1)
    d = data(m, 4, 0)
    r8 = calibrate_model(m, d, report_samples=0)
    assert r8.ptq == ["equalize", "bias_correction"]
    assert r8.options.exponent_search is False and r8.options.adaround is False
    r16 = calibrate_model(m, d, bits=16, report_samples=0)
    assert r16.ptq == [] and "espstream.ptq" not in {p.key for p in r16.model.metadata_props}
    r8n = calibrate_model(m, d, report_samples=0, adaround=True, equalize=False)
    assert r8n.ptq == ["bias_correction", "adaround"]


def test_cli_flags(tmp_path):
    m = ds_block(2)
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    p = espstream("calibrate", src, "--random", "4", "--no-equalize", "--no-adaround",
                  "--exponent-search", "--report-samples", "0", "-o", out, "--json", rep)
    assert p.returncode == 0, p.stderr.decode()
    meta = {x.key: x.value for x in onnx.load(str(out)).metadata_props}
    assert meta["espstream.ptq"] == "bias_correction,exponent_search"
    js = json.loads(rep.read_text())
    assert js["ptq"] == ["bias_correction", "exponent_search"]
    assert any("exponent search" in n for n in js["notes"])
    assert "exponent search" in p.stderr.decode()
    e = tmp_path / "m.espdl"
    p = espstream("convert", src, "--random", "4", "--no-bias-correction", "--adaround",
                  "-o", e, "--json", tmp_path / "c.json")
    assert p.returncode == 0, p.stderr.decode()
    assert e.stat().st_size > 0


def test_streaming_calibration_skips_the_data_techniques_with_a_note(tmp_path):
    from espstream.stream.streamify import streamify_model

    m = ds_block(3)
    s = streamify_model(m, 4).model
    src = tmp_path / "s.onnx"
    onnx.save(s, str(src))
    rep = tmp_path / "s.json"
    p = espstream("calibrate", src, "--random", "2", "--report-samples", "0",
                  "-o", tmp_path / "q.onnx", "--json", rep)
    assert p.returncode == 0, p.stderr.decode()
    js = json.loads(rep.read_text())
    assert js["ptq"] == []
    assert any("not run on a streaming calibration" in n for n in js["notes"])


def test_moments_take_the_first_samples_only():
    from espstream.quant.ptq import MOMENT_SAMPLES, _first

    class Many:
        def __len__(self):
            return MOMENT_SAMPLES + 10

        def __iter__(self):
            return iter(range(MOMENT_SAMPLES + 10))

    f = _first(Many(), MOMENT_SAMPLES)
    assert len(f) == MOMENT_SAMPLES
    assert list(f) == list(f) == list(range(MOMENT_SAMPLES))  # re-iterable


def test_moment_runs_are_sized_by_bytes(monkeypatch):
    """Rule 2: the moments pass stacks at most MOMENT_RUN_BYTES // (one sample's bytes)
    samples per run, and the moments do not depend on the grouping (to float rounding)."""
    from espstream.quant import engine, ptq, scheme
    from espstream.quant.calibrate import (
        CalibrateOptions,
        choose_exponents,
        make_plan,
        observe,
        prepare_float_model,
    )

    fm = prepare_float_model(ds_block(0), 8)  # input [1, 8, 24]: inner inputs 16 x 24 each
    plan = make_plan(fm)
    d = data(fm, 12, 0)
    obs, _ = observe(fm, plan.observed(), d)
    exps = choose_exponents(plan, obs, CalibrateOptions(**OFF))
    target = scheme.get_target("esp32p4")
    made: list[engine.Runner] = []

    class Recorded(engine.Runner):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(ptq, "Runner", Recorded)
    whole = ptq.collect_moments(fm, plan, d, exps, target, 8, 64)
    assert made[-1].max_bytes == ptq.MOMENT_RUN_BYTES == engine.MAX_BATCH_BYTES // 4
    assert made[-1].per_run == 64  # the batch: everything fits in one run
    inner = len(made[-1].names)
    one = (inner * 16 * 24 + 8 * 24) * 4  # float32 outputs of one sample and its input
    monkeypatch.setattr(ptq, "MOMENT_RUN_BYTES", 4 * one)
    split = ptq.collect_moments(fm, plan, d, exps, target, 8, 64)
    assert made[-1].per_run == 4 and made[-1].batched is not None
    monkeypatch.setattr(ptq, "MOMENT_RUN_BYTES", 2 * one)  # the 3-sample trial cannot fit
    alone = ptq.collect_moments(fm, plan, d, exps, target, 8, 64)
    assert made[-1].batched is None
    assert whole.keys() == split.keys() == alone.keys() and whole
    for k, m in whole.items():
        for other in (split[k], alone[k]):
            assert other.count == m.count
            np.testing.assert_allclose(other.sum, m.sum, rtol=1e-12, atol=1e-9)
            np.testing.assert_allclose(other.outer, m.outer, rtol=1e-12, atol=1e-9)

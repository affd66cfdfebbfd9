"""`calibrate` on the bundled models and the ESP-PPQ fixtures, through Python and the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_util import ROOT, assert_user_error, espstream
from onnx_builders import run

from espstream.optimize import optimize_model
from espstream.quant import calibrate_model, model_inputs, read_calibration_data

MODELS = ROOT / "models"
FIXTURES = ROOT / "tests" / "data" / "esp-ppq"


def _optimized(path: Path) -> onnx.ModelProto:
    return optimize_model(onnx.load(str(path))).model


def _output_sqnr(fm: onnx.ModelProto, qm: onnx.ModelProto, xs: np.ndarray) -> float:
    sig = err = 0.0
    for x in xs:
        f = run(fm, {"x": x[None]})[0].astype(np.float64)
        q = run(qm, {"x": x[None]})[0]
        sig += float(np.sum(f**2))
        err += float(np.sum((f - q) ** 2))
    return 10 * math.log10(sig / err)


@pytest.fixture(scope="module")
def tutorial():
    fm = _optimized(MODELS / "tutorial_tcn.onnx")
    data = read_calibration_data(str(MODELS / "tutorial_tcn.calib.npy"), model_inputs(fm))
    return fm, calibrate_model(fm, data, report_samples=8)


def test_tutorial_output_sqnr_on_held_out_data(tutorial):
    fm, r = tutorial
    onnx.checker.check_model(r.model, full_check=True)
    xs = np.random.default_rng(1).standard_normal((64, 16, 24)).astype(np.float32)
    sqnr = _output_sqnr(fm, r.model, xs)
    assert sqnr > 20.0, sqnr
    # the report's estimate on calibration data agrees with the held-out figure within a few dB
    assert abs(r.report.outputs["y"] - sqnr) < 5.0


def test_tutorial_structure(tutorial):
    _, r = tutorial
    ops = [n.op_type for n in r.model.graph.node]
    assert ops.count("Sigmoid") == 3 and ops.count("Relu") == 6
    # the three SiLU, six Conv+Relu pairs, Add, AveragePool, two plain Conv/Gemm and the input
    kinds = sorted(layer.op for layer in r.plan.layers)
    assert kinds.count("SiLU") == 3 and kinds.count("Conv+Relu") == 6
    assert r.exponents["/Flatten_output_0"] == r.exponents["/Slice_1_output_0"]
    assert r.batched


@pytest.mark.parametrize("name", ["tutorial_tcn", "stream_tcn"])
def test_fixture_exponents_near_esp_ppq(name):
    """Sanity reference: on ESP-PPQ's own calibration data, every activation exponent we pick
    is within one of ESP-PPQ's choice (read from its .info dump), on esp32p4."""
    fm = _optimized(FIXTURES / name / "model.onnx")
    data = read_calibration_data(str(FIXTURES / name / "calib.npy"), model_inputs(fm))
    r = calibrate_model(fm, data, report_samples=0)
    info = (FIXTURES / name / "esp32p4" / "offline.info").read_text()
    pattern = r"^%(\S+)\[INT8, [^\]]*\], exponents: \[(-?\d+)\]"
    theirs = {m[1]: int(m[2]) for m in re.finditer(pattern, info, re.M)}
    common = sorted(set(theirs) & set(r.exponents))
    assert len(common) >= 10, common
    diffs = {t: r.exponents[t] - theirs[t] for t in common}
    assert all(abs(d) <= 1 for d in diffs.values()), diffs


def test_cli_end_to_end(tmp_path):
    opt = tmp_path / "m.opt.onnx"
    out = tmp_path / "m.q.onnx"
    rep = tmp_path / "q.json"
    p = espstream("optimize", MODELS / "stream_tcn.onnx", "-q", "-o", opt)
    assert p.returncode == 0, p.stderr.decode()
    p = espstream("calibrate", opt, "-d", MODELS / "stream_tcn.calib.npy", "--target", "esp32s3",
                  "--method", "percentile", "-o", out, "--json", rep, "--report-samples", "4")
    assert p.returncode == 0, p.stderr.decode()
    err = p.stderr.decode()
    assert "worst local first" in err and "output y: SQNR" in err
    m = onnx.load(str(out))
    meta = {x.key: x.value for x in m.metadata_props}
    assert meta["espstream.target"] == "esp32s3" and meta["espstream.method"] == "percentile"
    js = json.loads(rep.read_text())
    assert js["samples"] == 32 and js["report_samples"] == 4
    assert js["outputs"]["y"] > 15
    # -q silences the report; stdout carries the model when -o is '-'
    p = espstream("calibrate", opt, "--random", "4", "-q", "--report-samples", "0")
    assert p.returncode == 0 and p.stderr == b""
    assert onnx.load_from_string(p.stdout).graph.node


def test_cli_errors(tmp_path):
    opt = tmp_path / "m.opt.onnx"
    espstream("optimize", MODELS / "tutorial_tcn.onnx", "-q", "-o", opt)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 16, 20), np.float32))
    assert_user_error(espstream("calibrate", opt, "-d", bad, "-o", tmp_path / "o.onnx"),
                      "bad.npy", "'x'", "[3, 16, 20]", "[1, 16, 24]")
    assert_user_error(espstream("calibrate", opt, "-o", tmp_path / "o.onnx"), "--random")
    q = tmp_path / "q.onnx"
    assert espstream("calibrate", opt, "--random", "2", "-q", "--report-samples", "0",
                     "-o", q).returncode == 0
    assert_user_error(espstream("calibrate", q, "--random", "2", "-o", tmp_path / "o2.onnx"),
                      "already quantized")

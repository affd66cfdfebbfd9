"""Mixed precision (espstream.quant.mixed): --int16, --mixed auto, and ESP-DL's boundaries.

The judge of the boundary arithmetic is ESP-PPQ's own mixed export (tests/data/mixed-ppq,
made by tools/mixed_fixture/make.py): the simulator must reproduce its test outputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from espstream.errors import UserError
from espstream.espdl.open import load_graph
from espstream.lower import lower
from espstream.quant import calibrate_model, mixed, model_inputs, read_calibration_data
from espstream.verify_int8 import check_test_values, int8_vs_fakequant
from tests.cli_util import assert_user_error, espstream

DATA = Path(__file__).parent / "data" / "mixed-ppq"
MODEL = DATA / "model.onnx"
CALIB = DATA / "calib.npy"


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(MODEL))


@pytest.fixture(scope="module")
def data(model):
    return read_calibration_data(str(CALIB), model_inputs(model))


def samples(n: int = 4) -> list[dict[str, np.ndarray]]:
    x = np.load(CALIB)
    return [{"x": x[i : i + 1]} for i in range(n)]


# ---- ESP-PPQ's mixed exports: the simulator reproduces ESP-DL's boundaries -------------------


@pytest.mark.parametrize("case", ["mid16", "first16", "last16"])
@pytest.mark.parametrize("target", ["esp32p4", "esp32s3"])
def test_simulator_reproduces_ppq_mixed_exports(case, target):
    graph = load_graph(str(DATA / case / f"{target}.espdl"))
    ops = [n.op_type for n in graph.nodes]
    assert "RequantizeLinear" in ops
    qtypes = {n.attrs.get("quant_type") for n in graph.nodes}
    assert {"S8", "S16"} <= qtypes  # really mixed
    checks = check_test_values(graph, target=target)
    for c in checks:
        if c.dtype == "int8":
            assert c.identical == c.size, c  # int8 exact
        else:
            assert c.ok and c.max_lsb <= 1, c  # Model::test()'s int16 tolerance
    if case != "last16" or target == "esp32p4":
        assert all(c.identical == c.size for c in checks), checks


# ---- --int16: the QDQ model, export and simulator ------------------------------------------


@pytest.mark.parametrize("sel", [("conv2",), ("conv1",), ("conv3",), ("relu1", "conv3")])
def test_int16_qdq_runs_and_sim_is_exact_on_p4(model, data, sel):
    r = calibrate_model(model, data, target="esp32p4", int16=sel, report_samples=0)
    onnx.checker.check_model(r.model)
    sess = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, samples(1)[0])[0]
    assert np.isfinite(y).all()
    agree = int8_vs_fakequant(r.model, samples(4))
    assert all(c.identical == c.size for c in agree.checks), agree.checks
    meta = {p.key: p.value for p in r.model.metadata_props}
    assert meta["espstream.bits"] == "8"
    layers = {la.name for la in r.plan.layers for n in la.nodes if n in sel}
    assert set(json.loads(meta["espstream.int16"])) == layers


def test_int16_lowering_matches_ppq_structure(model, data):
    """conv2 in int16: as in ESP-PPQ's mid16 export, int8 -> int16 RequantizeLinear (S16, the
    int8 exponent - 8), an S16 Conv with int16 weights and int64 bias, int16 -> int8 back."""
    r = calibrate_model(model, data, target="esp32p4", int16=("conv2",), report_samples=0)
    g = lower(r.model)
    conv2 = next(n for n in g.nodes if n.op_type == "Conv" and n.outputs[0] == "r2")
    assert conv2.attrs["quant_type"] == "S16"
    assert g.initializers[conv2.inputs[1]].data.dtype == np.int16
    assert g.initializers[conv2.inputs[2]].data.dtype == np.int64
    others = [n for n in g.nodes if n.op_type == "Conv" and n is not conv2]
    assert {n.attrs["quant_type"] for n in others} == {"S8"}
    src = next(n for n in g.nodes if n.outputs[0] == conv2.inputs[0])
    assert src.op_type == "RequantizeLinear" and src.attrs["quant_type"] == "S16"
    e_in = g.value_infos[src.inputs[0]].exponents[0]
    assert g.value_infos[src.outputs[0]].exponents[0] == e_in - 8
    back = [n for n in g.nodes if n.op_type == "RequantizeLinear" and n.inputs[0] == "r2"]
    assert back and all(n.attrs["quant_type"] == "S8" for n in back)
    ref = load_graph(str(DATA / "mid16" / "esp32p4.espdl"))
    assert sorted(n.op_type for n in ref.nodes if n.op_type != "RequantizeLinear") == sorted(
        n.op_type for n in g.nodes if n.op_type != "RequantizeLinear")


def test_int16_raises_sqnr_of_the_chosen_layer(model, data):
    r8 = calibrate_model(model, data, target="esp32p4")
    r16 = calibrate_model(model, data, target="esp32p4", int16=("conv2",))
    local8 = {s.layer: s for s in r8.report.layers}
    local16 = {s.layer: s for s in r16.report.layers}
    assert local16["relu2"].bits == 16 and local8["relu2"].bits == 8
    assert local16["relu2"].local_db > local8["relu2"].local_db + 20
    j = r16.report.to_json()["mixed_precision"]
    assert j["int16_layers"] == ["relu2"]
    assert 0 < j["int16_mac_share"] < 1 and j["extra_parameter_bytes"] > 0


def test_unknown_and_wrong_names(model, data):
    with pytest.raises(UserError, match="did you mean 'conv2'"):
        calibrate_model(model, data, int16=("conv22",), report_samples=0)
    with pytest.raises(UserError, match="--bits 8"):
        calibrate_model(model, data, int16=("conv2",), bits=16, report_samples=0)


# ---- --mixed auto ---------------------------------------------------------------------------


def test_auto_budget_zero_and_full(model, data):
    r0 = calibrate_model(model, data, mixed=(0.0, None), report_samples=0)
    assert r0.mixed.layers16 == [] and r0.precision is None
    r1 = calibrate_model(model, data, mixed=(100.0, None), report_samples=0)
    assert r1.mixed.layers16 == [la.name for la in r1.plan.layers if la.kind != "input"]
    assert r1.mixed.sqnr_db == pytest.approx(r1.mixed.sqnr_int16_all_db)


def test_auto_macs_budget_is_respected(model, data):
    r = calibrate_model(model, data, mixed=(50.0, None), report_samples=0)
    ch = r.mixed
    assert ch.int16_macs <= 0.5 * ch.total_macs
    # rule 9: layers go back to int8 by loss per MAC, only until the budget holds: putting
    # back the last one returned would break it
    back = [c for c in ch.macs if c not in ch.layers16]
    assert back
    last = min(back, key=lambda c: -ch.loss_db[c] / ch.macs[c])
    assert ch.int16_macs + ch.macs[last] > 0.5 * ch.total_macs
    ev = mixed.Evaluator(r.float_model, r.plan, r.observers, r.options, data, 32)
    assert ev.sqnr(ch.layers16) == pytest.approx(ch.sqnr_db)


def test_auto_target_sqnr_is_measured_and_minimal(model, data):
    r8 = calibrate_model(model, data, mixed=(0.0, None), report_samples=0)
    # rule 10: a set holds at the target plus the margin; the target is set just below what
    # all-int16 keeps with its least needed layer back in int8, less the margin: a real mix
    margin = mixed.TARGET_MARGIN_DB
    target = r8.mixed.sqnr_int16_all_db - min(r8.mixed.loss_db.values()) - 0.5 - margin
    assert target > r8.mixed.sqnr_int8_db
    r = calibrate_model(model, data, mixed=(None, target), report_samples=0)
    ch = r.mixed
    assert ch.reached and ch.sqnr_db >= target + margin
    assert ch.to_json()["margin_db"] == margin
    assert 0 < len(ch.layers16) < len(ch.loss_db)  # a real mix on this model
    ev = mixed.Evaluator(r.float_model, r.plan, r.observers, r.options, data, 32)
    assert ev.sqnr(ch.layers16) == pytest.approx(ch.sqnr_db)  # the measured set, not a sum
    for c in ch.layers16:  # no single layer more could go back to int8
        rest = [d for d in ch.layers16 if d != c]
        assert (ev.sqnr(rest) if rest else ch.sqnr_int8_db) < target + margin
    # without the margin the same target keeps fewer (or as many) layers in int16
    bare = mixed.choose_auto(r.float_model, r.plan, r.observers, r.options, data,
                             target_sqnr=target, margin_db=0.0)
    assert bare.sqnr_db >= target and len(bare.layers16) <= len(ch.layers16)
    unreachable = calibrate_model(model, data, mixed=(None, 200.0), report_samples=0).mixed
    assert not unreachable.reached
    assert len(unreachable.layers16) == len([la for la in r.plan.layers if la.kind != "input"])


def test_rules_in_docstring():
    doc = mixed.__doc__
    for k in range(1, 11):
        assert f"\n{k}. " in doc


# ---- the command line ------------------------------------------------------------------------


def test_cli_mixed_streaming_verify_int8(tmp_path):
    q = tmp_path / "q.onnx"
    s = tmp_path / "s.onnx"
    p = espstream("calibrate", MODEL, "-d", CALIB, "--int16", "conv2", "-o", q)
    assert p.returncode == 0, p.stderr.decode()
    assert "(int16)" in p.stderr.decode() and "of parameter bytes in int16" in p.stderr.decode()
    p = espstream("streamify", q, "--chunk", "4", "-o", s)
    assert p.returncode == 0, p.stderr.decode()
    p = espstream("verify", q, s, "--engine", "int8", "-d", CALIB)
    assert p.returncode == 0, p.stderr.decode()
    out = tmp_path / "m.espdl"
    p = espstream("export", s, "-o", out)
    assert p.returncode == 0, p.stderr.decode()
    g = load_graph(str(out))
    assert {"S8", "S16"} <= {n.attrs.get("quant_type") for n in g.nodes}


def test_cli_convert_mixed_auto(tmp_path):
    out = tmp_path / "m.espdl"
    p = espstream("convert", MODEL, "-d", CALIB, "--chunk", "4", "--mixed", "auto",
                  "--max-int16-macs", "60", "-o", out)
    assert p.returncode == 0, p.stderr.decode()
    assert out.exists()


@pytest.mark.parametrize("args,fragment", [
    (["--int16", "nope"], "no node named 'nope'"),
    (["--int16", "conv1,,conv2"], "--int16"),
    (["--int16", "add_missing"], "no node named"),
    (["--mixed", "manual", "--target-sqnr", "30"], "the only mode is 'auto'"),
    (["--mixed", "auto"], "exactly one budget"),
    (["--mixed", "auto", "--max-int16-macs", "10", "--target-sqnr", "30"], "exactly one budget"),
    (["--mixed", "auto", "--max-int16-macs", "-1"], "percentage in [0, 100]"),
    (["--mixed", "auto", "--target-sqnr", "nan"], "finite"),
    (["--max-int16-macs", "10"], "need --mixed auto"),
    (["--int16", "conv2", "--bits", "16"], "--bits 8"),
])
def test_cli_bad_flags(tmp_path, args, fragment):
    out = tmp_path / "q.onnx"
    p = espstream("calibrate", MODEL, "-d", CALIB, *args, "-o", out)
    assert_user_error(p, fragment)
    assert not out.exists()


def test_macs_of_layers(model, data):
    r = calibrate_model(model, data, report_samples=0)
    macs = mixed.layer_macs(r.float_model, r.plan)
    # conv1: 16 out ch x 16 frames x (8 x 3); conv2: 16 x 16 x 48; conv3: 8 x 16 x 16
    assert macs == {"relu1": 16 * 16 * 24, "relu2": 16 * 16 * 48, "conv3": 8 * 16 * 16}
    assert math.isclose(sum(macs.values()), 6144 + 12288 + 2048)


# ---- GRU / LSTM as int16 candidates ------------------------------------------------------------


def conv_gru_model(T: int = 24, cin: int = 6, ch: int = 8, hidden: int = 8,
                   kind: str = "GRU") -> onnx.ModelProto:
    """A causal Conv (pads k-1 in front only), Relu, Transpose to [T, 1, ch], a GRU (or LSTM)
    and a Gemm head over its Y: streamable, both precisions on either side of the GRU."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    f32 = np.float32
    G = 3 if kind == "GRU" else 4
    extra = {"linear_before_reset": 1} if kind == "GRU" else {}
    inits = [
        numpy_helper.from_array((rng.standard_normal((ch, cin, 3)) / 3).astype(f32), "w1"),
        numpy_helper.from_array((0.1 * rng.standard_normal(ch)).astype(f32), "b1"),
        numpy_helper.from_array((rng.standard_normal((1, G * hidden, ch)) / 3).astype(f32), "W"),
        numpy_helper.from_array((rng.standard_normal((1, G * hidden, hidden)) / 3).astype(f32),
                                "R"),
        numpy_helper.from_array((0.1 * rng.standard_normal((1, 2 * G * hidden))).astype(f32),
                                "B"),
        numpy_helper.from_array(np.array([T, hidden], np.int64), "shape2"),
        numpy_helper.from_array((rng.standard_normal((4, hidden)) / 3).astype(f32), "wg"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3],
                         pads=[2, 0]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Transpose", ["r1"], ["t1"], name="tr1", perm=[2, 0, 1]),
        helper.make_node(kind, ["t1", "W", "R", "B"], ["y"], name="gru", hidden_size=hidden,
                         **extra),
        helper.make_node("Reshape", ["y", "shape2"], ["y2"], name="flat"),
        helper.make_node("Gemm", ["y2", "wg"], ["out"], name="head", transB=1),
    ]
    g = helper.make_graph(nodes, "conv_gru",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, T])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


@pytest.fixture(scope="module", params=["GRU", "LSTM"])
def gru_case(request, tmp_path_factory):
    m = conv_gru_model(kind=request.param)
    x = np.random.default_rng(3).standard_normal((16, 6, 24)).astype(np.float32)
    p = tmp_path_factory.mktemp("gru") / "x.npy"
    np.save(p, x)
    return m, read_calibration_data(str(p), model_inputs(m)), x, p


def _sim_sqnr(qdq, fm, x) -> float:
    from espstream.verify_int8 import Int8Runner

    sim = Int8Runner(qdq, "model")
    f = ort.InferenceSession(fm.SerializeToString(), providers=["CPUExecutionProvider"])
    sig = err = 0.0
    for k in range(len(x)):
        ref = f.run(None, {"x": x[k : k + 1]})[0].astype(np.float64)
        got = np.asarray(sim.run({"x": x[k : k + 1]})["out"], np.float64).reshape(ref.shape)
        sig += float(np.sum(ref * ref))
        err += float(np.sum((ref - got) ** 2))
    return 10 * math.log10(sig / err)


@pytest.mark.parametrize("sel", [("gru",), ("conv1", "head"), ("gru", "head")])
def test_gru_in_a_mixed_model_lowers_as_espdl_s16(gru_case, sel):
    """An int16 GRU is ESP-DL's S16 GRU (int16 X, W, R, Y; int16 bias at its gate exponent, the
    one --bits 16 gives it); an int8 one between int16 neighbours is S8; the crossings are
    RequantizeLinear nodes of the reader's type (int8 -> int16 at e - 8)."""
    m, data, _, _ = gru_case
    r = calibrate_model(m, data, int16=sel, report_samples=0)
    r16 = calibrate_model(m, data, bits=16, report_samples=0)
    r8 = calibrate_model(m, data, bits=8, report_samples=0)
    meta = {p.key: p.value for p in r.model.metadata_props}
    ge = json.loads(meta["espstream.gate_exponents"])["gru"]
    want = r16 if "gru" in sel else r8
    assert ge == json.loads({p.key: p.value for p in want.model.metadata_props}[
        "espstream.gate_exponents"])["gru"]
    g = lower(r.model)
    gru = next(n for n in g.nodes if n.op_type in ("GRU", "LSTM"))
    qt = "S16" if "gru" in sel else "S8"
    wdt = np.int16 if "gru" in sel else np.int8
    assert gru.attrs["quant_type"] == qt and gru.attrs["gate_exponent"] == ge
    assert g.initializers[gru.inputs[1]].data.dtype == wdt
    assert g.initializers[gru.inputs[2]].data.dtype == wdt
    assert g.initializers[gru.inputs[3]].data.dtype == np.int16
    src = next(n for n in g.nodes if gru.inputs[0] in n.outputs)
    conv1_16 = "conv1" in sel
    if conv1_16 == ("gru" in sel):
        assert src.op_type != "RequantizeLinear"
    else:
        assert src.op_type == "RequantizeLinear" and src.attrs["quant_type"] == qt
        if qt == "S16":  # int8 -> int16, lossless
            e_in = g.value_infos[src.inputs[0]].exponents[0]
            assert g.value_infos[src.outputs[0]].exponents[0] == e_in - 8


def test_int16_gru_gains_in_the_simulator_and_streams_exactly(gru_case, tmp_path):
    m, data, x, p = gru_case
    r8 = calibrate_model(m, data, report_samples=0)
    rg = calibrate_model(m, data, int16=("gru",), report_samples=0)
    r16 = calibrate_model(m, data, int16=("conv1", "gru", "head"), report_samples=0)
    rn = calibrate_model(m, data, int16=("conv1", "head"), report_samples=0)
    s8, sg, s16, sn = (_sim_sqnr(r.model, r.float_model, x) for r in (r8, rg, r16, rn))
    # a lone int16 layer gains little (its output is read back in int8); the GRU's width
    # matters once its neighbours are int16 too
    assert sg > s8 and s16 > sn + 10, (s8, sg, s16, sn)
    q = tmp_path / "q.onnx"
    st = tmp_path / "s.onnx"
    onnx.save(rg.model, q)
    out = espstream("streamify", q, "--chunk", "4", "-o", st)
    assert out.returncode == 0, out.stderr.decode()
    out = espstream("verify", q, st, "--engine", "int8", "-d", p)
    assert out.returncode == 0, out.stderr.decode()
    out = espstream("export", st, "-o", tmp_path / "m.espdl")
    assert out.returncode == 0, out.stderr.decode()
    got = load_graph(str(tmp_path / "m.espdl"))
    assert {n.attrs.get("quant_type") for n in got.nodes
            if n.op_type in ("GRU", "LSTM")} == {"S16"}


def test_gru_is_an_auto_candidate_with_its_macs_and_bytes(gru_case):
    m, data, _, _ = gru_case
    r = calibrate_model(m, data, mixed=(100.0, None), report_samples=0)
    ch = r.mixed
    assert "gru" in ch.layers16
    G = 3 if m.graph.node[3].op_type == "GRU" else 4
    # 24 steps x G gates x 8 hidden x (8 inputs + 8 hidden)
    assert ch.macs["gru"] == 24 * G * 8 * 16
    # W, R G*8 x 8 each: 1 -> 2 bytes; the bias int16 (2 G 8 values) at either width
    w, b = 2 * G * 8 * 8, 2 * (2 * G * 8)
    assert mixed.layer_weight_bytes(r.float_model, r.plan)["gru"] == (w + b, 2 * w + b)
    j = ch.to_json()
    assert j["int16_mac_share"] == 1.0 and j["int16_byte_share"] == 1.0


def test_auto_measures_a_recurrent_model_in_the_simulator(gru_case):
    """Rule 7: with a GRU the measured SQNR is the simulator's (ESP-DL's gate tables), not the
    fake-quant model's float gates."""
    m, data, x, _ = gru_case
    r = calibrate_model(m, data, mixed=(100.0, None), report_samples=0)
    assert r.mixed.sqnr_db == pytest.approx(_sim_sqnr(r.model, r.float_model, x), abs=1e-6)


def test_bias_correction_of_an_int8_layer_reading_int16(model, data):
    """PTQ rule 6: conv2 (int8) reads relu1 (int16) at its reader exponent; its corrected bias
    stays as small a change as in the all-int8 model (it once read the int16 exponent at 8 bits
    and saturated, and the correction ate the output)."""
    r8 = calibrate_model(model, data, target="esp32p4", report_samples=0)
    rm = calibrate_model(model, data, target="esp32p4", int16=("conv1",), report_samples=0)
    assert "bias_correction" in rm.ptq
    off = calibrate_model(model, data, target="esp32p4", int16=("conv1",), report_samples=0,
                          bias_correction=False)
    feeds = samples(8)

    def sq(qm) -> float:
        f = ort.InferenceSession(rm.float_model.SerializeToString(),
                                 providers=["CPUExecutionProvider"])
        q = ort.InferenceSession(qm.SerializeToString(), providers=["CPUExecutionProvider"])
        sig = err = 0.0
        for s in feeds:
            a = f.run(None, s)[0].astype(np.float64)
            b = q.run(None, s)[0]
            sig += float(np.sum(a * a))
            err += float(np.sum((a - b) ** 2))
        return 10 * math.log10(sig / err)

    assert sq(rm.model) > sq(off.model) - 0.5
    assert sq(rm.model) > sq(r8.model)

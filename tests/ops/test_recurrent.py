"""espstream/ops/recurrent.py: GRU and LSTM through calibrate, export and the simulator; ESP-DL's
arithmetic (the vectorized kernel against the element-by-element oracle); the refusals; the
streaming state pair. ESP-DL's own values (ESP-PPQ exports of op_cfg.toml's GRU / LSTM
configurations) judge the simulator in tests/test_ops_suite.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from op_harness import _data, model, refused, run_case

from espstream.errors import UserError
from espstream.export import export_model, quantize_input
from espstream.ops import recurrent as rec
from espstream.quant import calibrate_model
from espstream.sim import Simulator
from espstream.stream.streamify import streamify_model

TARGETS = ("esp32p4", "esp32s3", "c")


def _rnn(kind: str = "GRU", H: int = 8, inp: int = 6, seq: int = 5, bias: bool = True,
         dirs: int = 1, seed: int = 0, scale: float = 0.4, **attrs):
    """x [1, seq, I] -> Transpose -> GRU / LSTM -> Squeeze(axis 2) -> y [seq, dirs, H]."""
    G = 3 if kind == "GRU" else 4

    def build():
        rng = np.random.default_rng(seed)
        inits = {"w": (rng.standard_normal((dirs, G * H, inp)) * scale).astype(np.float32),
                 "r": (rng.standard_normal((dirs, G * H, H)) * scale).astype(np.float32),
                 "ax": np.asarray([2], np.int64)}
        ins = ["xt", "w", "r"]
        if bias:
            inits["b"] = (rng.standard_normal((dirs, 2 * G * H)) * 0.3).astype(np.float32)
            ins.append("b")
        a = dict(attrs)
        if kind == "GRU":
            a.setdefault("linear_before_reset", 1)
        if dirs == 2:
            a["direction"] = "bidirectional"
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
                 helper.make_node(kind, ins, ["y4"], hidden_size=H, **a),
                 helper.make_node("Squeeze", ["y4", "ax"], ["y"])]
        return model(nodes, [1, seq, inp], inits, opset=14), {kind}
    return build


CASES = {"GRU": _rnn("GRU"), "LSTM": _rnn("LSTM")}
NOT_LOWERED = {"RNN": "calibrate"}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dirs", [1, 2])
def test_int8_through_every_stage(op: str, target: str, dirs: int) -> None:
    run_case(_rnn(op, dirs=dirs), target, 8)


@pytest.mark.parametrize(("op", "dirs", "acts"), [
    ("LSTM", 1, ["Sigmoid", "Tanh", "Tanh"]),  # as Keras' exporters write them (DTLN)
    ("GRU", 2, ["Sigmoid", "Tanh"] * 2),
])
def test_default_activations_written_out_are_accepted(op: str, dirs: int, acts) -> None:
    run_case(_rnn(op, dirs=dirs, activations=acts), "esp32p4", 8)


def _qdq_and_sim(case, target: str, bits: int):
    m, _ = case()
    data, x = _data(m)
    res = calibrate_model(m, data, target=target, bits=bits, report_samples=0)
    g = export_model(res.model).graph
    return res, g, x


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("target", TARGETS)
def test_int16_within_the_gate_resolution(op: str, target: str) -> None:
    """int16: the simulator against onnxruntime on the QDQ model (float gates). ESP-DL's gates
    read tables at step 2^gate_exp and the dot products are int16 at that exponent, so the
    difference is bounded by a few gate steps per time step, not by the output grid."""
    res, g, x = _qdq_and_sim(_rnn(op), target, 16)
    ge = json.loads(dict((p.key, p.value) for p in res.model.metadata_props)[
        "espstream.gate_exponents"])
    (e_gate,) = ge.values()
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    sim = Simulator(g)
    out = g.outputs[0]
    for k in range(3):
        want = sess.run(None, {"x": x[k:k + 1]})[0]
        y = sim.run({"x": quantize_input(g, "x", x[k:k + 1])})[out.name]
        real = y.astype(np.float64) * 2.0 ** out.exponents[0]
        err = np.abs(real.reshape(want.shape) - want)
        assert err.max() <= 5 * want.shape[0] * 2.0 ** e_gate, err.max()


def test_export_is_what_esp_ppq_writes() -> None:
    """The node ESP-DL reads: inputs [X, W, R, B], int16 bias at the gate exponent, W / R per
    tensor at the input's width, Y [seq, dirs, 1, H], Y_h at Y's exponent, LSTM Y_c int16 at
    the gate exponent."""
    m, _ = _rnn("LSTM", H=4, inp=3, seq=2)()
    lstm = next(n for n in m.graph.node if n.op_type == "LSTM")
    lstm.output.extend(["yh", "yc"])
    m.graph.output.extend([helper.make_tensor_value_info("yh", TensorProto.FLOAT, [1, 1, 4]),
                           helper.make_tensor_value_info("yc", TensorProto.FLOAT, [1, 1, 4])])
    data, _ = _data(m)
    res = calibrate_model(m, data, target="esp32s3", bits=8, report_samples=0)
    g = export_model(res.model).graph
    node = next(n for n in g.nodes if n.op_type == "LSTM")
    ge = node.attrs["gate_exponent"]
    assert node.attrs["hidden_size"] == 4 and node.attrs["quant_type"] == "S8"
    assert len(node.inputs) == 4
    w, r, b = (g.initializers[node.inputs[k]] for k in (1, 2, 3))
    assert w.data.dtype == np.int8 and w.data.shape == (1, 16, 3) and len(w.exponents) == 1
    assert r.data.dtype == np.int8 and r.data.shape == (1, 16, 4)
    assert b.data.dtype == np.int16 and b.data.shape == (1, 32) and b.exponents == [ge]
    vi = {n: g.value_info(n) for n in node.outputs}
    assert vi[node.outputs[0]].shape == [2, 1, 1, 4]
    assert vi[node.outputs[0]].exponents == vi[node.outputs[1]].exponents
    assert vi[node.outputs[2]].dtype == np.int16 and vi[node.outputs[2]].exponents == [ge]
    outs = Simulator(g).run({"x": quantize_input(g, "x", _data(m)[1][:1])})
    assert outs["yc"].dtype == np.int16


def _with_initial_state(kind: str, h0_input: bool):
    """GRU / LSTM whose initial_h is a graph input (h0) or a zero constant (PyTorch's default
    state, folded), its Y_h a graph output."""
    def build():
        m, ops = _rnn(kind, H=4, inp=3, seq=4)()
        n = next(n for n in m.graph.node if n.op_type == kind)
        ins = list(n.input) + [""] * (6 - len(n.input))
        ins[5] = "h0"
        if kind == "LSTM":
            ins.append("c0")
            m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 1, 4), np.float32),
                                                               "c0"))
        del n.input[:]
        n.input.extend(ins)
        n.output.append("yh")
        m.graph.output.append(helper.make_tensor_value_info("yh", TensorProto.FLOAT, [1, 1, 4]))
        if h0_input:
            m.graph.input.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT,
                                                               [1, 1, 4]))
        else:
            m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 1, 4), np.float32),
                                                               "h0"))
        onnx.checker.check_model(m)
        return m, ops
    return build


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_constant_initial_state_is_stored_at_its_exponents(kind: str) -> None:
    res, g, x = _qdq_and_sim(_with_initial_state(kind, False), "esp32p4", 8)
    node = next(n for n in g.nodes if n.op_type == kind)
    h0 = g.initializers[node.inputs[5]]
    assert h0.exponents == g.value_info(node.outputs[0]).exponents and not h0.data.any()
    if kind == "LSTM":
        c0 = g.initializers[node.inputs[6]]
        assert c0.data.dtype == np.int16 and c0.exponents == [node.attrs["gate_exponent"]]
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(["yh"], {"x": x[:1]})[0]
    got = Simulator(g).run({"x": quantize_input(g, "x", x[:1])})["yh"]
    step = 2.0 ** g.value_info("yh").exponents[0]
    assert np.abs(got * step - want).max() <= 2 * step


def test_initial_h_graph_input_shares_the_output_exponent() -> None:
    """ESP-DL copies initial_h into its state without rescaling: calibrate gives the graph
    input h0 the exponent of Y / Y_h."""
    m, _ = _with_initial_state("GRU", True)()
    rng = np.random.default_rng(1)
    import tempfile
    from pathlib import Path

    from espstream.quant import model_inputs, read_calibration_data
    d = Path(tempfile.mkdtemp()) / "c.npz"
    np.savez(d, x=rng.standard_normal((8, 1, 4, 3)).astype(np.float32),
             h0=(rng.uniform(-0.9, 0.9, (8, 1, 1, 4))).astype(np.float32))
    data = read_calibration_data(str(d), model_inputs(m))
    res = calibrate_model(m, data, target="c", bits=8, report_samples=0)
    g = export_model(res.model).graph
    e = {v.name: v.exponents for v in (*g.inputs, *g.outputs)}
    assert e["h0"] == e["yh"] == e["y"]
    h = rng.uniform(-0.9, 0.9, (1, 1, 4)).astype(np.float32)
    x = rng.standard_normal((1, 4, 3)).astype(np.float32)
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(["yh"], {"x": x, "h0": h})[0]
    got = Simulator(g).run({"x": quantize_input(g, "x", x), "h0": quantize_input(g, "h0", h)})
    step = 2.0 ** e["yh"][0]
    assert np.abs(got["yh"] * step - want).max() <= 2 * step


def test_gate_exponent_follows_the_data() -> None:
    """Small weights: the finest gate exponent (GATE_EXP_MIN[8]); large ones: coarse enough that
    no observed pre-activation wraps int16."""
    fine, _, _ = _qdq_and_sim(_rnn("GRU", scale=0.05), "c", 8)
    coarse, _, _ = _qdq_and_sim(_rnn("GRU", scale=400.0), "c", 8)
    ge = [next(iter(json.loads(dict((p.key, p.value) for p in r.model.metadata_props)[
        "espstream.gate_exponents"]).values())) for r in (fine, coarse)]
    assert ge[0] == rec.GATE_EXP_MIN[8]
    assert ge[1] > rec.GATE_EXP_MIN[8] + 2


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "words"), [
    (_rnn("GRU", linear_before_reset=0), "linear_before_reset=0"),
    (_rnn("LSTM", input_forget=1), "input_forget=1"),
    (_rnn("GRU", direction="reverse"), "reverse"),
    (_rnn("GRU", clip=1.0), "'clip'"),
    (_rnn("GRU", layout=1), "layout=1"),
    (_rnn("LSTM", activations=["Sigmoid", "Tanh", "Relu"]), "'activations'"),
    (_rnn("GRU", dirs=2, activations=["Sigmoid", "Tanh"]), "'activations'"),  # one direction
])
def test_refused_at_calibrate(case, words: str) -> None:
    refused(case, "calibrate", words)


def test_rnn_is_refused() -> None:
    def build():
        rng = np.random.default_rng(0)
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
                 helper.make_node("RNN", ["xt", "w", "r"], ["y4"], hidden_size=3),
                 helper.make_node("Squeeze", ["y4", "ax"], ["y"])]
        return model(nodes, [1, 4, 2], {"w": rng.standard_normal((1, 3, 2)).astype(np.float32),
                                        "r": rng.standard_normal((1, 3, 3)).astype(np.float32),
                                        "ax": np.asarray([2], np.int64)}, opset=14), set()
    refused(build, "calibrate", "RNN")


def test_batch_two_is_refused_at_export() -> None:
    def build():  # x [1, 3, 6] read as [seq 1, batch 3, 6]
        rng = np.random.default_rng(0)
        nodes = [helper.make_node("GRU", ["x", "w", "r"], ["y"], hidden_size=2,
                                  linear_before_reset=1)]
        return model(nodes, [1, 3, 6], {"w": rng.standard_normal((1, 6, 6)).astype(np.float32),
                                        "r": rng.standard_normal((1, 6, 2)).astype(np.float32)},
                     opset=14), {"GRU"}
    refused(build, "export", "batch 3")


def test_sim_refuses_what_esp_dl_does_not_create() -> None:
    _, g, _ = _qdq_and_sim(_rnn("GRU"), "c", 8)
    node = next(n for n in g.nodes if n.op_type == "GRU")
    node.attrs["linear_before_reset"] = 0
    with pytest.raises(UserError, match="linear_before_reset=0"):
        Simulator(g)


# ---- ESP-DL's arithmetic ----------------------------------------------------------------------


@st.composite
def _params(draw, hmax: int = 6):
    kind = draw(st.sampled_from(["GRU", "LSTM"]))
    bits = draw(st.sampled_from([8, 16]))
    target = draw(st.sampled_from(TARGETS))
    H = draw(st.integers(1, hmax))
    inp = draw(st.sampled_from([1, 3, 8, 16]))  # 8 / 16: the PIE paths
    seq = draw(st.integers(1, 4))
    dirs = draw(st.integers(1, 2))
    G = 3 if kind == "GRU" else 4
    dt = np.int8 if bits == 8 else np.int16
    lo, hi = (-128, 127) if bits == 8 else (-32768, 32767)
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    ge = draw(st.integers(-12, -6))
    e_x = draw(st.integers(-9, -3)) if bits == 8 else draw(st.integers(-16, -10))
    e_y = (-7 if bits == 8 else -15) + draw(st.integers(-1, 1))
    e_w = (-8 if bits == 8 else -16) + draw(st.integers(-2, 2))
    e_r = e_w + draw(st.integers(-1, 1))

    def ints(shape, a=lo, b=hi):
        return rng.integers(a, b + 1, shape).astype(dt)
    bias = draw(st.booleans())
    wb = [rng.integers(-3000, 3000, G * H) if bias else None for _ in range(dirs)]
    rb = [rng.integers(-3000, 3000, G * H) if bias else None for _ in range(dirs)]
    p = rec.RnnParams(kind, H, [ints((G * H, inp)) for _ in range(dirs)],
                      [ints((G * H, H)) for _ in range(dirs)], wb, rb, ge,
                      ge - (e_x + e_w), ge - (e_y + e_r), e_y, np.dtype(dt), target)
    x = ints((seq, inp))
    h0 = ints((dirs, H)) if draw(st.booleans()) else None
    c0 = rng.integers(-20000, 20000, (dirs, H)).astype(np.int16) \
        if kind == "LSTM" and draw(st.booleans()) else None
    return p, x, h0, c0


@settings(max_examples=60, deadline=None)
@given(_params())
def test_kernel_equals_the_element_by_element_oracle(case) -> None:
    p, x, h0, c0 = case
    got = rec.rnn_forward(p, x, h0, c0)
    want = rec.rnn_oracle(p, x, h0, c0)
    for a, b in zip(got, want, strict=True):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@settings(max_examples=150, deadline=None)
@given(_params(hmax=20), st.integers(1, 40), st.booleans())
def test_c_loop_equals_numpy_and_oracle(case, seq, plain) -> None:
    """`rnn_kernel`'s C loop against `rnn_forward` (and the element-by-element oracle on the
    short sequences): every target, 8 / 16 bits, GRU / LSTM, biases or none, both directions,
    given or zero states, sequences long enough for the states to saturate and wrap; hidden
    sizes past 8 and 16 with the AVX2 unit loop (eight units at a time, the rest one by one)
    and the VNNI matrix-vector loop, or with the plain units and the AVX2 / SSE2 broadcast one
    (set_plain_rnn, set_no_vnni)."""
    from espstream.kernels import _int8

    p, x, h0, c0 = case
    rng = np.random.default_rng(seq)
    info = np.iinfo(x.dtype)
    x = rng.integers(info.min, info.max + 1, (seq, x.shape[1])).astype(x.dtype)
    _int8.set_plain_rnn(plain)
    _int8.set_no_vnni(plain)
    try:
        loop = rec.rnn_kernel(p)
    finally:
        _int8.set_plain_rnn(False)
        _int8.set_no_vnni(False)
    assert loop is not None
    got = loop(x, h0, c0)
    want = rec.rnn_forward(p, x, h0, c0)
    for a, b in zip(got, want, strict=True):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    if seq <= 4:
        for a, b in zip(got, rec.rnn_oracle(p, x, h0, c0), strict=True):
            if a is not None:
                np.testing.assert_array_equal(a, b)


@settings(max_examples=10, deadline=None)
@given(_params())
def test_c_loop_declines_outside_its_ranges(case) -> None:
    """Shifts the C loop's float conversions could overflow on: None (rnn_forward runs)."""
    from dataclasses import replace

    p = case[0]

    assert rec.rnn_kernel(replace(p, w_shift=-21)) is None
    assert rec.rnn_kernel(replace(p, r_shift=63)) is None
    assert rec.rnn_kernel(p) is not None


@pytest.mark.parametrize("e", [-12, -10, -9, -6])
def test_gate_tables_as_esp_dl_builds_them(e: int) -> None:
    """Entries f(i * 2^e) for i in 0..qmax with qmax = int(bound / 2^e) + 1, the negative half
    mirrored, indices beyond the table clamped; the values are the float functions' within
    float32 rounding."""
    for kind, f, bound in (("sigmoid", lambda v: 1 / (1 + np.exp(-v)), 6.3),
                           ("tanh", np.tanh, 3.5)):
        t = rec.gate_table(kind, e)
        assert t.qmax == int(np.float32(bound) / np.float32(2.0**e)) + 1 and t.qmin == -t.qmax
        idx = np.arange(-t.qmax - 5, t.qmax + 6)
        got = t.get(idx)
        want = f(np.clip(idx, -t.qmax, t.qmax) * 2.0**e)
        assert np.abs(got - want).max() < 3e-7
        assert got[0] == got[5] and got[-1] == got[-6]


def test_dot_product_paths() -> None:
    """The C path converts the accumulator to float before rounding: past 2^24 that moves a
    value below a half onto it (then rounded up); the PIE path (esp32s3 / esp32p4, length a
    multiple of 8, shift >= 0) rounds the exact integer."""
    shift, x = 12, 1500
    y = (2047 - 32767 * x) % 4096  # acc = 32767 x + y = k * 4096 + 2047, in [2^25, 2^26)
    m = np.zeros((1, 8), np.int16)
    m[0, :2] = (32767, 1)
    v = np.zeros(8, np.int16)
    v[:2] = (x, y)
    acc = 32767 * x + y
    assert acc % 4096 == 2047 and 2**25 < acc < 2**26
    k = acc >> shift
    assert rec.mat_vec(m, v, shift, "esp32s3")[0] == k  # exact: 2047 / 4096 rounds down
    assert rec.mat_vec(m, v, shift, "c")[0] == k + 1  # float32(acc) = k * 4096 + 2048, half up
    assert rec.mat_vec(m[:, :7], v[:7], shift, "esp32s3")[0] == k + 1  # length 7: C path


# ---- streaming ---------------------------------------------------------------------------------


def test_gru_state_becomes_a_state_pair() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["xt", "w", "r"], ["y4"], hidden_size=3,
                              linear_before_reset=1),
             helper.make_node("Squeeze", ["y4", "ax"], ["y"])]
    m = model(nodes, [1, 8, 4], {"w": rng.standard_normal((1, 9, 4)).astype(np.float32),
                                 "r": rng.standard_normal((1, 9, 3)).astype(np.float32),
                                 "ax": np.asarray([1], np.int64)}, opset=13)
    res = streamify_model(m, 2, axes={"x": 1})
    meta = {p.key: p.value for p in res.model.metadata_props}
    assert len(json.loads(meta["espstream.states"])) == 1


@pytest.mark.parametrize(("kind", "target", "bits"), [("GRU", "esp32p4", 8), ("GRU", "c", 16),
                                                       ("LSTM", "esp32s3", 8),
                                                       ("LSTM", "esp32p4", 16)])
def test_convert_streams_with_the_state_fed_back(kind: str, target: str, bits: int) -> None:
    """convert --chunk: the state is a model input / output pair of the .espdl (ESP-DL keeps
    none between calls), recorded in its metadata and shown by inspect; the int8 check runs
    the exported model chunk by chunk with the state fed back and matches offline exactly."""
    from espstream.convert import convert_model
    from espstream.inspect import inspect_espdl

    m, _ = _rnn(kind, seq=12)()
    res = convert_model(m, random=8, chunk=4, axes={"x": 1}, target=target, bits=bits)
    assert all(c.ok for c in res.checks), [(c.name, c.detail) for c in res.checks]
    names = [c.name for c in res.checks]
    exact = next(c for c in res.checks if "streaming == offline" in c.name and "int8" in c.name)
    assert "max |err| 0 " in exact.detail, exact.detail
    assert any("test values" in n for n in names)
    info = inspect_espdl(res.data)
    rec_states = info["recurrent_states"]
    assert len(rec_states) == (2 if kind == "LSTM" else 1)
    ins = {v["name"]: v for v in info["inputs"]}
    outs = {v["name"]: v for v in info["outputs"]}
    for r in rec_states:
        assert ins[r["input"]]["exponents"] == outs[r["output"]]["exponents"] == [r["exponent"]]
        assert r["input"] in {t["name"] for t in info["test_inputs"]}
    if kind == "LSTM":
        c = next(r for r in rec_states if ".c." in r["input"])
        assert c["dtype"] == "int16"


def _torch_style(kind: str, dynamic_time: bool):
    """What PyTorch's exporter writes for nn.GRU / nn.LSTM(batch_first=True) called without a
    state: a zero initial state Expand(0, Concat([1], Unsqueeze(Gather(Shape(x), 1)), [H]))
    read from the (transposed) input's batch dimension."""
    G, H, inp = (3 if kind == "GRU" else 4), 8, 6
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w": (rng.standard_normal((1, G * H, inp)) * 0.4).astype(np.float32),
        "r": (rng.standard_normal((1, G * H, H)) * 0.4).astype(np.float32),
        "b": (rng.standard_normal((1, 2 * G * H)) * 0.3).astype(np.float32),
        "zero": np.zeros(1, np.float32), "one": np.asarray([1], np.int64),
        "hid": np.asarray([H], np.int64), "i1": np.asarray(1, np.int64),
        "ax0": np.asarray([0], np.int64), "ax2": np.asarray([1], np.int64)}.items()]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("Shape", ["xt"], ["s"]),
             helper.make_node("Gather", ["s", "i1"], ["b1"], axis=0),
             helper.make_node("Unsqueeze", ["b1", "ax0"], ["b1u"]),
             helper.make_node("Concat", ["one", "b1u", "hid"], ["hs"], axis=0),
             helper.make_node("Expand", ["zero", "hs"], ["h0"])]
    ins = ["xt", "w", "r", "b", "", "h0"] + (["h0"] if kind == "LSTM" else [])
    a = {"linear_before_reset": 1} if kind == "GRU" else {}
    nodes += [helper.make_node(kind, ins, ["y4"], hidden_size=H, **a),
              helper.make_node("Squeeze", ["y4", "ax2"], ["ys"]),
              helper.make_node("Transpose", ["ys"], ["y"], perm=[1, 0, 2])]
    t = "T" if dynamic_time else 10
    g = helper.make_graph(nodes, "torch", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, t, inp])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, t, H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("dynamic_time", [False, True])
def test_pytorch_zero_state_is_folded_and_streams(kind: str, dynamic_time: bool) -> None:
    """optimize folds PyTorch's zero-state chain (the batch dimension it reads is fixed, also
    when the time axis is not) into a zero constant; calibrate stores it; streamify makes it
    the state pair; convert's checks pass."""
    from espstream.convert import convert_model
    from espstream.optimize.runner import optimize_model

    m = _torch_style(kind, dynamic_time)
    opt = optimize_model(m).model
    assert [n.op_type for n in opt.graph.node] == ["Transpose", kind, "Squeeze", "Transpose"]
    node = next(n for n in opt.graph.node if n.op_type == kind)
    h0 = {t.name: t for t in opt.graph.initializer}[node.input[5]]
    assert not numpy_helper.to_array(h0).any()
    if dynamic_time:
        return  # convert needs fixed shapes for --random; the fold is what this case checks
    res = convert_model(m, random=8, chunk=2, axes={"x": 1})
    assert all(c.ok for c in res.checks), [(c.name, c.detail) for c in res.checks]


def test_hand_written_state_pair_is_kept_as_model_io() -> None:
    """A VAD-like model with explicit h input / Y_h output, calibrated with --state h:hn on
    whole sequences: h adopts Y's exponent, export keeps (h, hn) as a graph input / output pair
    in the same layout and records it; the simulator, fed back by hand, equals one offline run
    of the same integer layer over the whole sequence."""
    from espstream.quant import stream_calib

    H, inp = 8, 6
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w": (rng.standard_normal((1, 3 * H, inp)) * 0.4).astype(np.float32),
        "r": (rng.standard_normal((1, 3 * H, H)) * 0.4).astype(np.float32),
        "b": (rng.standard_normal((1, 6 * H)) * 0.3).astype(np.float32)}.items()]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["xt", "w", "r", "b", "", "h"], ["y", "hn"], hidden_size=H,
                              linear_before_reset=1)]
    g = helper.make_graph(nodes, "vad", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, inp]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, H])], [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1, 1, H]),
        helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 1, H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    spec = stream_calib.stream_spec(m, ["h:hn"], None, {"x": 1})
    data = stream_calib.random_sequences(m, spec, 8, 0)
    res = calibrate_model(m, data, target="esp32s3", bits=8, report_samples=0, stream=spec)
    gr = export_model(res.model).graph
    e = {v.name: (v.exponents, v.shape) for v in (*gr.inputs, *gr.outputs)}
    assert e["h"] == e["hn"]
    (pair,) = json.loads(gr.metadata["espstream.recurrent_states"])
    assert (pair["input"], pair["output"]) == ("h", "hn")
    sim = Simulator(gr)
    x = rng.standard_normal((1, 12, inp)).astype(np.float32)
    perm = json.loads(gr.metadata["espstream.layout"])["x"]  # ONNX -> runtime order
    state = np.zeros(e["h"][1], np.int8)
    ys = []
    for k in range(3):
        out = sim.run({"x": quantize_input(gr, "x", x[:, 4 * k:4 * k + 4]), "h": state})
        state = out["hn"]
        ys.append(out["y"])
    node = next(n for n in gr.nodes if n.op_type == "GRU")
    whole = Simulator(gr, check_shapes=False)
    xt = np.concatenate([quantize_input(gr, "x", x[:, 4 * k:4 * k + 4]) for k in range(3)],
                        axis=perm.index(1))
    full = whole.trace({"x": xt, "h": np.zeros(e["h"][1], np.int8)})
    np.testing.assert_array_equal(np.concatenate(ys).reshape(-1),
                                  full[node.outputs[0]].reshape(-1))


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_verify_espdl_pair_feeds_the_state_back(kind: str) -> None:
    """`espstream verify offline.espdl streaming.espdl`: the streaming file's state inputs are
    not the offline file's inputs; run chunk by chunk with the state fed back, every output
    equals the offline file's exactly."""
    from espstream.espdl import read, write
    from espstream.verify_int8 import verify_espdl_pair

    m, _ = _rnn(kind, seq=12)()
    data, _ = _data(m)
    q = calibrate_model(m, data, target="esp32p4", bits=8, report_samples=0).model
    st = streamify_model(q, 4, axes={"x": 1}).model
    off_g = read(write(export_model(q).graph))
    st_g = read(write(export_model(st).graph))
    res = verify_espdl_pair(off_g, st_g, random=3)
    assert res.outputs and all(o.ok and o.compared for o in res.outputs), res.failure()
    assert {o.kind for o in res.outputs} == {"time"}


def _explicit_lstm(read_elsewhere: bool = False):
    """x [1, 6, 10] -> Transpose -> LSTM(initial_h=h, initial_c=c) -> y, hn, cn (a VAD's I/O)."""
    H, inp = 4, 6
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w": (rng.standard_normal((1, 4 * H, inp)) * 0.4).astype(np.float32),
        "r": (rng.standard_normal((1, 4 * H, H)) * 0.4).astype(np.float32)}.items()]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[2, 0, 1]),
             helper.make_node("LSTM", ["xt", "w", "r", "", "", "h", "c"], ["y", "hn", "cn"],
                              hidden_size=H)]
    outs = [("y", [10, 1, 1, H]), ("hn", [1, 1, H]), ("cn", [1, 1, H])]
    if read_elsewhere:
        nodes.append(helper.make_node("Relu", ["h"], ["hr"]))
        outs.append(("hr", [1, 1, H]))
    g = helper.make_graph(nodes, "vad", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inp, 10]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, H]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1, H])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_explicit_state_graph_io_becomes_the_state_pair() -> None:
    """streamify: an LSTM whose initial_h / initial_c are graph inputs read only there and whose
    Y_h / Y_c are graph outputs keeps them as its state pairs (their own names, chunk-free
    shapes); the float streaming model, fed back, equals the offline model run from zeros."""
    m = _explicit_lstm()
    res = streamify_model(m, 2, axes={"x": 2})
    meta = {p.key: p.value for p in res.model.metadata_props}
    assert json.loads(meta["espstream.states"]) == [["h", "hn"], ["c", "cn"]]
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    off = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((1, 6, 10)).astype(np.float32)
    z = np.zeros((1, 1, 4), np.float32)
    y_off, hn_off, cn_off = off.run(None, {"x": x, "h": z, "c": z})
    h, c, ys = z, z, []
    for k in range(5):
        out = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"x": x[..., 2 * k:2 * k + 2], "h": h, "c": c}), strict=True))
        h, c = out["hn"], out["cn"]
        ys.append(out["y"])
    np.testing.assert_allclose(np.concatenate(ys, axis=0), y_off, atol=1e-6)
    np.testing.assert_allclose(h, hn_off, atol=1e-6)
    np.testing.assert_allclose(c, cn_off, atol=1e-6)


def test_explicit_state_read_elsewhere_is_refused() -> None:
    with pytest.raises(UserError, match="explicit state must be a graph input read only here"):
        streamify_model(_explicit_lstm(read_elsewhere=True), 2, axes={"x": 2})


# ---- a time axis at axis 0 (a [sequence, features] input): refused in every stage ----------


def _seq_first():
    """x [8, 6] (sequence, features) -> Unsqueeze(1) -> LSTM -> Squeeze -> y [8, 1, 4]."""
    H, inp = 4, 6
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w": (rng.standard_normal((1, 4 * H, inp)) * 0.4).astype(np.float32),
        "r": (rng.standard_normal((1, 4 * H, H)) * 0.4).astype(np.float32),
        "ax": np.asarray([1], np.int64)}.items()]
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["xu"]),
             helper.make_node("LSTM", ["xu", "w", "r"], ["y4"], hidden_size=H),
             helper.make_node("Squeeze", ["y4", "ax"], ["y"])]
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [8, inp])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [8, 1, H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


SEQ_FIRST = "its time axis is axis 0, which espstream reads as the batch"


def test_time_axis_zero_refused_by_streamify_and_convert(tmp_path) -> None:
    """One rule: axis 0 of an input is the batch. streamify --axis x:0 (and convert) refuse it
    in one line saying how to reshape; nothing is written."""
    import subprocess
    import sys

    def espstream(*args):
        return subprocess.run([sys.executable, "-m", "espstream", *map(str, args)],
                              capture_output=True, timeout=300)

    with pytest.raises(UserError, match=SEQ_FIRST):
        streamify_model(_seq_first(), 2, axes={"x": 0})
    src = tmp_path / "seq.onnx"
    onnx.save(_seq_first(), src)
    for args in (["streamify", src, "--chunk", "2", "--axis", "x:0", "-o", tmp_path / "s.onnx"],
                 ["convert", src, "--random", "4", "--chunk", "2", "--axis", "x:0", "-o",
                  tmp_path / "c.espdl"]):
        proc = espstream(*args)
        err = proc.stderr.decode().strip().splitlines()
        assert proc.returncode == 2 and SEQ_FIRST in err[-1] and "x [1, 8, 6]" in err[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.onnx"]


def test_time_axis_zero_refused_by_calibrate_state(tmp_path) -> None:
    """calibrate of a hand-written streaming model (--state, --axis x:0): the same refusal."""
    from espstream.quant import stream_calib

    H = 4
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w": (rng.standard_normal((1, 3 * H, 6)) * 0.4).astype(np.float32),
        "r": (rng.standard_normal((1, 3 * H, H)) * 0.4).astype(np.float32),
        "ax": np.asarray([1], np.int64)}.items()]
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["xu"]),
             helper.make_node("GRU", ["xu", "w", "r", "", "", "h"], ["y", "hn"], hidden_size=H,
                              linear_before_reset=1)]
    g = helper.make_graph(nodes, "vad", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, H])], [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1, 1, H]),
        helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 1, H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    with pytest.raises(UserError, match=SEQ_FIRST):
        stream_calib.stream_spec(m, ["h:hn"], None, {"x": 0})


def test_time_axis_zero_refused_by_verify() -> None:
    """verify of a streaming model whose metadata puts an input's time axis at 0 (streamify
    writes none; a hand-edited file): the same refusal, not a shape error per sample."""
    from espstream.verify import read_meta

    m = _seq_first()
    for k, v in {"espstream.chunk": "2", "espstream.time_axes": '{"x": 0, "y": 0}'}.items():
        m.metadata_props.add(key=k, value=v)
    with pytest.raises(UserError, match=SEQ_FIRST):
        read_meta(m)


# ---- gate inputs beyond ESP-DL's tables ------------------------------------------------------


def _float_gru_beyond(m: onnx.ModelProto, x: np.ndarray) -> tuple[float, float]:
    """Shares of sigmoid / tanh inputs of a one-direction GRU (linear_before_reset=1, ONNX gate
    order z, r, h) beyond +-6.3 / +-3.5 over the samples x [n, seq, I], in plain float64."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    W, R, B = w["w"][0], w["r"][0], w["b"][0]
    H = R.shape[1]
    sig = tanh = 0
    n_sig = n_tanh = 0
    for seq in x.astype(np.float64):
        h = np.zeros(H)
        for xt in seq:
            ic, hc = W @ xt + B[:3 * H], R @ h + B[3 * H:]
            zr = ic[:2 * H] + hc[:2 * H]
            g = 1.0 / (1.0 + np.exp(-zr))
            a = ic[2 * H:] + g[H:] * hc[2 * H:]
            sig += int(np.sum(np.abs(zr) > 6.3))
            tanh += int(np.sum(np.abs(a) > 3.5))
            n_sig, n_tanh = n_sig + zr.size, n_tanh + a.size
            h = (1 - g[:H]) * np.tanh(a) + g[:H] * h
    return sig / n_sig, tanh / n_tanh


def test_gate_saturation_is_measured_and_recorded() -> None:
    """calibrate counts the gate inputs beyond ESP-DL's table range on its data (a float GRU
    written out here gives the same shares) and records them only past GATE_SATURATED_SHARE."""
    big, _ = _rnn("GRU", H=16, inp=8, seq=24, scale=1.0)()
    data, x = _data(big)
    res = calibrate_model(big, data, target="esp32p4", bits=16, report_samples=0)
    meta = {p.key: p.value for p in res.model.metadata_props}
    (shares,) = json.loads(meta["espstream.gate_saturation"]).values()
    want = _float_gru_beyond(big, x)
    assert want[0] > 0.05 and want[1] > 0.05  # the case saturates
    n = x.shape[0] * x.shape[1] * 16
    assert abs(shares["sigmoid"] - want[0]) <= 1 / (2 * n)
    assert abs(shares["tanh"] - want[1]) <= 1 / n
    note = rec.saturation_note(res.model)
    assert note.startswith("GRU 'GRU_1': ") and "beyond ESP-DL's table range +-6.3 / +-3.5" in note
    small, _ = _rnn("GRU", H=16, inp=8, seq=24, scale=0.05)()
    data, x = _data(small)
    assert max(_float_gru_beyond(small, x)) == 0
    res = calibrate_model(small, data, target="esp32p4", bits=16, report_samples=0)
    assert "espstream.gate_saturation" not in {p.key for p in res.model.metadata_props}
    assert rec.saturation_note(res.model) == ""


def test_saturating_gates_fail_int16_check_by_name(monkeypatch) -> None:
    """NSNet2 48 kHz in small: at int16 a GRU whose gate inputs pass +-6.3 / +-3.5 departs from
    the fake-quant model (float gates) as ESP-DL does (dl_math.hpp SigmoidLUT / TanhLUT::get
    return the last entry there); the failed check names the layer and why. With tables made
    wide enough not to saturate, the same model passes: the tables' range is the cause."""
    from espstream.convert import convert_model

    m, _ = _rnn("GRU", H=16, inp=8, seq=24, scale=1.0)()

    def check():
        res = convert_model(m, random=8, chunk=4, axes={"x": 1}, target="esp32p4", bits=16)
        return next(c for c in res.checks if c.name == "int8 vs fake-quant")

    c = check()
    assert not c.ok
    assert "GRU 'GRU_1': " in c.detail and "ESP-DL's table range" in c.detail, c.detail
    monkeypatch.setattr(rec, "SIGMOID_BOUND", rec.F32(40.0))
    monkeypatch.setattr(rec, "TANH_BOUND", rec.F32(20.0))
    rec.gate_table.cache_clear()
    try:
        c = check()
    finally:
        rec.gate_table.cache_clear()
    assert c.ok, c.detail

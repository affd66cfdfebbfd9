"""The QDQ contract of `calibrate` on small hand-made graphs (see espstream/quant/calibrate.py)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx_builders import make_model, rand, run

from espstream.errors import UserError
from espstream.quant import calibrate_model, model_inputs, random_data
from espstream.quant.data import CalibrationData
from espstream.quant.plan import INTERNAL, OWN, SHARE, make_plan
from espstream.quant.scheme import exponent_for_range


# ---- helpers that read the QDQ graph back ------------------------------------------------
def _inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _producer(m: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in m.graph.node if name in n.output), None)


def _consumers(m: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if name in n.input]


def _exp_of_scale(scale: np.ndarray) -> np.ndarray:
    e = np.log2(scale.astype(np.float64))
    assert np.all(e == np.round(e)), scale  # exactly a power of two
    return e.astype(int)


def dq_exponent(m: onnx.ModelProto, tensor: str) -> int:
    """The exponent of the DequantizeLinear that produces `tensor`."""
    dq = _producer(m, tensor)
    assert dq is not None and dq.op_type == "DequantizeLinear", (tensor, dq)
    q = _producer(m, dq.input[0])
    inits = _inits(m)
    e = int(_exp_of_scale(inits[dq.input[1]]))
    if q is not None:  # an activation: Q and DQ share the scale, zero point 0
        assert q.op_type == "QuantizeLinear" and q.input[1] == dq.input[1]
        assert int(inits[q.input[2]]) == 0
    return e


def _data(model, n=16, seed=0, scale=1.0) -> CalibrationData:
    d = random_data(model_inputs(model), n, seed)
    if scale != 1.0:
        for _, arrays in d._sources:
            for a in arrays.values():
                a.arr = a.arr * np.float32(scale)
    return d


# ---- a graph exercising every rule ---------------------------------------------------------
def rules_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 4, 3)) * 3.0).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((8, 4, 1)) * 0.2).astype(np.float32)  # a much narrower range
    wg = (rng.standard_normal((3, 64)) * 0.2).astype(np.float32)
    bg = np.array([0.1, -0.2, 0.3], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[2, 0]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Sigmoid", ["r1"], ["sg"], name="sig"),
        helper.make_node("Mul", ["r1", "sg"], ["silu"], name="silu"),
        helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["silu", "c2"], ["a"], name="add"),
        helper.make_node("Transpose", ["a"], ["t"], name="tr", perm=[0, 2, 1]),
        helper.make_node("Slice", ["t", "st", "en", "ax"], ["sl"], name="slice"),
        helper.make_node("Flatten", ["sl"], ["fl"], name="flat", axis=1),
        helper.make_node("Gemm", ["fl", "wg", "bg"], ["y"], name="fc", transB=1),
        helper.make_node("Concat", ["a", "c2"], ["cat"], name="cat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["z"], name="pool", kernel_shape=[2], strides=[2]),
    ]
    inits = {"w1": w1, "b1": b1, "w2": w2, "wg": wg, "bg": bg,
             "st": np.array([2], np.int64), "en": np.array([10], np.int64),
             "ax": np.array([1], np.int64)}
    return make_model(nodes, {"x": [1, 4, 10]}, {"y": [1, 3], "z": [1, 16, 5]}, inits)


@pytest.fixture(scope="module")
def rules_p4():
    m = rules_model()
    # rules 4-5 as written: the model's own weights and biases, no rule-10 passes (they move
    # weights between layers and biases by design; tests/test_quant_*.py test them)
    off = {"equalize": False, "bias_correction": False, "adaround": False,
           "exponent_search": False}
    return m, calibrate_model(m, _data(m), method="minmax", report_samples=4, **off)


def test_plan_states():
    plan = make_plan(rules_model())
    st = plan.state
    assert st["x"] == OWN and st["c1"] == INTERNAL and st["r1"] == OWN
    assert st["sg"] == INTERNAL and st["silu"] == OWN and st["c2"] == OWN and st["a"] == OWN
    assert st["t"] == SHARE and st["sl"] == SHARE and st["fl"] == SHARE and st["z"] == SHARE
    assert plan.root("fl") == "a" and plan.root("z") == "cat"
    assert [layer.op for layer in plan.layers] == [
        "input", "Conv+Relu", "SiLU", "Conv", "Add", "Gemm", "Concat"]


def test_checker_ort_and_metadata(rules_p4):
    m, r = rules_p4
    onnx.checker.check_model(r.model, full_check=True)
    meta = {p.key: p.value for p in r.model.metadata_props}
    assert meta["espstream.target"] == "esp32p4"
    assert meta["espstream.bits"] == "8"
    assert meta["espstream.rounding"] == "half_even"
    assert meta["espstream.method"] == "minmax"
    assert meta["espstream.per_channel"] == "true"
    x = rand(1, 4, 10, seed=7)
    fy, fz = run(m, {"x": x})
    qy, qz = run(r.model, {"x": x})
    assert qy.shape == fy.shape and qz.shape == fz.shape
    assert 10 * math.log10(np.sum(fy**2) / np.sum((fy - qy) ** 2)) > 20


def test_every_activation_exponent_obeys_the_rules(rules_p4):
    m, r = rules_p4
    q = r.model
    e = {t: dq_exponent(q, r.qdq_names[t]) for t in r.plan.quantized()}
    assert e == {t: r.exponents[t] for t in e}
    # data movement shares its input's exponent
    assert e["t"] == e["sl"] == e["fl"] == e["a"]
    assert e["z"] == e["cat"]
    # Conv + Relu fused: the Relu reads the raw Conv output (no Q/DQ between them)
    assert _producer(q, "c1").op_type == "Conv"
    assert [n.op_type for n in _consumers(q, "c1")] == ["Relu"]
    # SiLU: the Sigmoid output goes straight into the Mul
    assert [n.op_type for n in _consumers(q, "sg")] == ["Mul"]
    # the graph input's exponent is the minmax exponent of the data actually seen
    xs = np.concatenate([s["x"] for s in _data(m)])
    assert e["x"] == exponent_for_range(float(xs.min()), float(xs.max()), 8)


def test_add_and_concat_inputs_are_requantized_to_the_output_exponent(rules_p4):
    _, r = rules_p4
    q = r.model
    e = r.exponents
    # silu's only use is the Add: it takes the Add's exponent (no requantization needed);
    # c2 also feeds the Concat, keeps its own, much finer exponent (w2 is 15x narrower than w1)
    assert e["silu"] == e["a"]
    assert e["c2"] < e["a"]
    for node_name, out in (("add", "a"), ("cat", "cat")):
        node = next(n for n in q.graph.node if n.name == node_name)
        for inp in node.input:
            dq = _producer(q, inp)
            assert dq.op_type == "DequantizeLinear"
            src = _producer(q, dq.input[0])
            assert src.op_type == "QuantizeLinear"
            float_name = inp.split("_requant_")[0]
            if e[float_name] == e[out]:
                assert inp == float_name  # no extra pair when the exponents agree
            else:
                assert dq_exponent(q, inp) == e[out]
                assert src.input[0] == float_name  # requantizes the quantized input
    wiring = (("add", "a", ["silu", "c2"]), ("cat", "cat", ["a", "c2"]))
    expected = {(n, i) for n, out, ins in wiring for i in ins if e[i] != e[out]}
    assert ("add", "c2") in expected
    assert {(d["node"], d["input"]) for d in r.requantized} == expected


def test_weights_per_channel_and_bias_exponent(rules_p4):
    m, r = rules_p4
    q = r.model
    inits = _inits(q)
    conv = next(n for n in q.graph.node if n.name == "conv1")
    wdq, bdq = _producer(q, conv.input[1]), _producer(q, conv.input[2])
    assert [a.i for a in wdq.attribute if a.name == "axis"] == [0]
    wq = inits[wdq.input[0]]
    assert wq.dtype == np.int8 and wq.shape == (8, 4, 3)
    w_e = _exp_of_scale(inits[wdq.input[1]])
    assert w_e.shape == (8,)
    w = _inits(m)["w1"]
    for c in range(8):  # each channel covers its own max |w| (minmax)
        assert w_e[c] == exponent_for_range(float(w[c].min()), float(w[c].max()), 8)
    np.testing.assert_array_equal(wq, np.clip(np.rint(w / 2.0 ** w_e[:, None, None]), -128, 127))
    # bias: int32 with exponent e_in + e_w per channel
    bq, b_e = inits[bdq.input[0]], _exp_of_scale(inits[bdq.input[1]])
    assert bq.dtype == np.int32
    np.testing.assert_array_equal(b_e, r.exponents["x"] + w_e)
    np.testing.assert_array_equal(bq, np.rint(_inits(m)["b1"] / 2.0**b_e))
    # Gemm with transB=1: output channels on axis 0; its input is the shared flatten exponent
    fc = next(n for n in q.graph.node if n.name == "fc")
    g_e = _exp_of_scale(inits[_producer(q, fc.input[2]).input[1]])
    gw_e = _exp_of_scale(inits[_producer(q, fc.input[1]).input[1]])
    np.testing.assert_array_equal(g_e, r.exponents["fl"] + gw_e)


def test_esp32s3_per_tensor_half_up_and_20_bit_bias():
    rng = np.random.default_rng(1)
    w = (rng.uniform(-0.5, 0.5, (4, 2, 1))).astype(np.float32)
    w[0, 0, 0] = 0.5  # per-tensor max |w| = 0.5: 127 * 2^-8 = 0.496 < 0.5 <= 0.99: e_w = -7
    b = np.array([1000.0, -1000.0, 0.5, 0.0], np.float32)
    m = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
                   {"x": [1, 2, 6]}, {"y": [1, 4, 6]}, {"w": w, "b": b})
    x = np.clip(rand(16, 2, 6), -3.9, 3.9)
    x[0, 0, 0] = 3.9  # minmax: 127 * 2^-5 = 3.97 >= 3.9: e_in = -5
    data = CalibrationData(model_inputs(m))
    from espstream.quant.data import _Array
    data._add("t", {"x": _Array("t", model_inputs(m)[0], x)})
    r = calibrate_model(m, data, target="esp32s3", method="minmax", weight_method="minmax",
                        report_samples=0)
    q = r.model
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["espstream.rounding"] == "half_up" and meta["espstream.per_channel"] == "false"
    inits = _inits(q)
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    wdq, bdq = _producer(q, conv.input[1]), _producer(q, conv.input[2])
    assert not [a for a in wdq.attribute if a.name == "axis"]
    assert int(_exp_of_scale(inits[wdq.input[1]])) == -7
    # bias exponent -5 + -7 = -12: 1000 * 2^12 = 4096000 saturates to 2^19 - 1 = 524287
    assert int(_exp_of_scale(inits[bdq.input[1]])) == -12
    assert inits[bdq.input[0]].tolist() == [524287, -524288, 2048, 0]
    assert r.bias_clipped == {"conv": 2}


def test_relu_not_fused_when_the_conv_output_has_other_uses():
    w = rand(4, 2, 1, seed=2)
    m = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Add", ["c", "r"], ["y"], name="add")],
        {"x": [1, 2, 5]}, {"y": [1, 4, 5]}, {"w": w})
    plan = make_plan(m)
    assert plan.state["c"] == OWN and plan.state["r"] == OWN


def test_softmax_output_stays_float():
    w = rand(3, 6, seed=3)
    m = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Softmax", ["h"], ["y"], name="sm", axis=-1)],
        {"x": [1, 6]}, {"y": [1, 3]}, {"w": w.T.copy()})
    r = calibrate_model(m, _data(m), report_samples=0)
    sm = next(n for n in r.model.graph.node if n.op_type == "Softmax")
    assert sm.output == ["y"] and not _consumers(r.model, "y")
    mm = next(n for n in r.model.graph.node if n.op_type == "MatMul")
    wdq = _producer(r.model, mm.input[1])
    assert [a.i for a in wdq.attribute if a.name == "axis"] == [1]  # MatMul: last axis of B


def test_softmax_output_feeding_a_conv_is_refused():
    m = make_model(
        [helper.make_node("Softmax", ["x"], ["s"], name="sm", axis=1),
         helper.make_node("Conv", ["s", "w"], ["y"], name="conv")],
        {"x": [1, 2, 5]}, {"y": [1, 4, 5]}, {"w": rand(4, 2, 1)})
    with pytest.raises(UserError, match="float output of a Softmax"):
        make_plan(m)


def _run_optimized(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnxruntime with all graph optimizations on (what users get by default)."""
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def test_16_bit_opset_21_int16_and_shifted_int32_bias():
    m = rules_model()
    # a bias that int32 cannot hold at e_in + e_w (~2^-24 with int16): 200 * 2^24 > 2^31
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(
        np.array([200.0, -0.5, 0.25, 0, 0, 0, 0, 0.125], np.float32), "b1"))
    r = calibrate_model(m, _data(m), bits=16, method="minmax", report_samples=0)
    q = r.model
    onnx.checker.check_model(q, full_check=True)
    assert next(o.version for o in q.opset_import if o.domain == "") == 21
    assert q.ir_version >= 10
    inits = _inits(q)
    assert inits["zero_point_int16"].dtype == np.int16
    conv = next(n for n in q.graph.node if n.name == "conv1")
    assert inits[_producer(q, conv.input[1]).input[0]].dtype == np.int16
    bdq = _producer(q, conv.input[2])
    bq, b_e = inits[bdq.input[0]], _exp_of_scale(inits[bdq.input[1]])
    assert bq.dtype == np.int32
    k = r.bias_shift["conv1"]
    e_exact = r.exponents["x"] + np.array(r.weight_exponents["conv1"])
    np.testing.assert_array_equal(b_e, e_exact + k)
    # k is the smallest shift that fits int32: without it 200 would not fit, with k-1 neither
    assert k >= 1
    assert abs(200.0 / 2.0 ** float(e_exact[0] + k)) <= 2**31 - 1
    assert abs(200.0 / 2.0 ** float(e_exact[0] + k - 1)) > 2**31 - 1
    x = rand(1, 4, 10, seed=9)
    fy = run(m, {"x": x})[0]
    for runner in (run, _run_optimized):  # onnxruntime's graph optimizations must not change it
        qy = runner(q, {"x": x})[0]
        assert 10 * math.log10(np.sum(fy**2) / np.sum((fy - qy) ** 2)) > 60  # int16: near exact


def test_per_tensor_override_and_per_channel_override():
    m = rules_model()
    r = calibrate_model(m, _data(m), per_channel=False, report_samples=0)
    assert all(len(v) == 1 for v in r.weight_exponents.values())
    r = calibrate_model(m, _data(m), target="c", per_channel=True, report_samples=0)
    assert len(r.weight_exponents["conv1"]) == 8


def test_already_quantized_is_refused_and_data_movement_alone_is_calibrated(rules_p4):
    _, r = rules_p4
    with pytest.raises(UserError, match="already quantized"):
        calibrate_model(r.model, _data(r.model))
    # nothing with an exponent of its own: the input's exponent carries through the Reshape
    m = make_model([helper.make_node("Reshape", ["x", "s"], ["y"])], {"x": [1, 6]},
                   {"y": [2, 3]}, {"s": np.array([2, 3], np.int64)})
    res = calibrate_model(m, _data(m), report_samples=0)
    assert "x" in res.exponents
    assert [n.op_type for n in res.model.graph.node].count("QuantizeLinear") >= 1


def test_unsupported_operator_is_named():
    m = make_model([helper.make_node("Erf", ["x"], ["y"], name="erf0")], {"x": [1, 4]},
                   {"y": [1, 4]})
    with pytest.raises(UserError, match=r"node 'erf0': operator Erf is not supported"):
        make_plan(m)


def test_operators_optimize_removes_point_to_optimize():
    # an unoptimized export (BatchNormalization, Dropout) piped into calibrate: the line says
    # what fixes it instead of listing every supported operator
    scale, bias, mean, var = (np.ones(4, np.float32), np.zeros(4, np.float32),
                              np.zeros(4, np.float32), np.ones(4, np.float32))
    m = make_model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"],
                                     name="bn"),
                    helper.make_node("Dropout", ["h"], ["y"], name="drop")],
                   {"x": [1, 4, 6]}, {"y": [1, 4, 6]},
                   {"s": scale, "b": bias, "m": mean, "v": var})
    with pytest.raises(UserError) as e:
        calibrate_model(m, _data(m), report_samples=0)
    msg = str(e.value)
    assert "BatchNormalization (node 'bn')" in msg and "Dropout (node 'drop')" in msg
    assert "run `espstream optimize` first" in msg and "supported:" not in msg
    # anything else still gets the list of what calibrate takes
    m = make_model([helper.make_node("Erf", ["x"], ["h"], name="erf0"),
                    helper.make_node("Dropout", ["h"], ["y"], name="drop")],
                   {"x": [1, 4]}, {"y": [1, 4]})
    with pytest.raises(UserError, match=r"supported: .*Conv") as e:
        calibrate_model(m, _data(m), report_samples=0)
    assert "optimize" not in str(e.value)


def test_batched_and_single_runs_give_the_same_exponents():
    m = rules_model()
    a = calibrate_model(m, _data(m, 40), batch=16, method="mse", report_samples=0)
    b = calibrate_model(m, _data(m, 40), batch=1, method="mse", report_samples=0)
    assert a.batched and not b.batched
    assert a.exponents == b.exponents
    for t in a.observers:
        assert a.observers[t].count == b.observers[t].count


def test_fixed_batch_reshape_falls_back_to_one_sample_per_run():
    m = make_model(
        [helper.make_node("Reshape", ["x", "s"], ["r"], name="rs"),
         helper.make_node("Relu", ["r"], ["y"], name="relu")],
        {"x": [1, 2, 3]}, {"y": [1, 6]}, {"s": np.array([1, 6], np.int64)})
    r = calibrate_model(m, _data(m, 8), batch=8, report_samples=0)
    assert not r.batched
    assert r.observers["y"].count == 8 * 6


def test_report_layers_and_outputs(rules_p4):
    _, r = rules_p4
    rep = r.report
    assert rep.samples == 4
    assert {s.tensor for s in rep.layers} == set(r.plan.observed())
    local = [s.local_db for s in rep.layers]
    assert local == sorted(local)  # worst first
    assert set(rep.outputs) == {"y", "z"} and all(v > 10 for v in rep.outputs.values())
    inp = next(s for s in rep.layers if s.op == "input")
    assert inp.local_db == inp.cumulative_db
    js = r.to_json()
    assert js["layers"][0]["sqnr_local_db"] == pytest.approx(rep.layers[0].local_db, abs=1e-3)
    assert js["requantized"] and js["tensors"][0]["tensor"] == "x"


def test_report_sums_run_in_the_session_as_scalars(rules_p4):
    """qreport: the session's outputs are only the per-pair float64 sums of one sample, equal
    to numpy's over the side-by-side model's tensors (so a run holds no reported tensor)."""
    import onnxruntime as ort

    from espstream.quant import qreport

    m, r = rules_p4
    combined, reported = qreport._combined(r)
    pairs = list(dict.fromkeys((qreport.FLOAT_PREFIX + t if t != "x" else t, fq)
                               for t, fq, _ in reported))
    summed, names = qreport._with_sums(combined, pairs)
    assert len(names) == 2 * len(pairs)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
               and not o.type.tensor_type.shape.dim for o in summed.graph.output)
    sample = next(iter(_data(m)))
    tensors = dict(zip([o.name for o in combined.graph.output], ort.InferenceSession(
        combined.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, sample),
        strict=True))
    sess = ort.InferenceSession(summed.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in summed.graph.output], sess.run(None, sample), strict=True))
    for k, (ref, x) in enumerate(pairs):
        a = tensors[ref].astype(np.float64)
        d = a - tensors[x].astype(np.float64)
        assert got[names[2 * k]].shape == () and got[names[2 * k + 1]].shape == ()
        assert float(got[names[2 * k]]) == pytest.approx(float(np.sum(a * a)), rel=1e-12)
        assert float(got[names[2 * k + 1]]) == pytest.approx(float(np.sum(d * d)), rel=1e-12,
                                                              abs=1e-300)


def test_explicit_pad_before_a_pool_is_calibrated_as_written():
    """onnxruntime's optimizer would fold this Pad into the MaxPool (pads == kernel: refused)."""
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
        helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[1], strides=[2]),
        helper.make_node("Conv", ["m", "w", "b"], ["y"], kernel_shape=[1]),
    ]
    inits = {"pads": np.array([0, 0, 0, 0, 0, 1]), "w": rand(2, 2, 1), "b": rand(2, seed=1)}
    m = make_model(nodes, {"x": [1, 2, 9]}, {"y": [1, 2, 5]}, inits)
    r = calibrate_model(m, _data(m), method="minmax", report_samples=0)
    x = rand(1, 2, 9, seed=3)
    (ref,) = run(m, {"x": x})
    (got,) = run(r.model, {"x": x})
    assert got.shape == ref.shape and np.abs(got - ref).max() < 0.1


def test_weight_exponents_default_to_least_squared_error():
    """One outlier among small weights: covering it (minmax) costs every other weight
    precision; the default (mse) clips it and keeps a finer step."""
    w = np.full((1, 64, 1), 0.01, np.float32)
    w[0, :32, 0] = -0.013
    w[0, 0, 0] = 1.0  # minmax: 127 * 2^-7 = 0.99 < 1.0 <= 127 * 2^-6: e_w = -6
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                   {"x": [1, 64, 4]}, {"y": [1, 1, 4]}, {"w": w})
    default = calibrate_model(m, _data(m), target="c", report_samples=0)
    minmax = calibrate_model(m, _data(m), target="c", weight_method="minmax", report_samples=0)
    meta = {p.key: p.value for p in default.model.metadata_props}
    assert meta["espstream.weight_method"] == "mse"
    assert minmax.weight_exponents["conv"] == [-6]
    (e,) = default.weight_exponents["conv"]
    assert e < -6

    def sq_err(exp: int) -> float:
        q = np.clip(np.rint(w / 2.0**exp), -128, 127) * 2.0**exp
        return float(((q - w) ** 2).sum())

    assert sq_err(e) < sq_err(-6)

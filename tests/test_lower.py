"""lower: QDQ ONNX -> IntGraph. Structure against ESP-PPQ's own exports of the same fixture
models, round trips through the .espdl writer / reader, LUTs against ESP-PPQ's tables and hand
values, layout rules, streaming caches, and the refusals."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from espstream.errors import UserError
from espstream.espdl import read, write
from espstream.lower import build_lut, lower
from espstream.optimize import optimize_model
from espstream.quant import (
    calibrate_model,
    model_inputs,
    random_data,
    read_calibration_data,
    scheme,
)
from espstream.sim import Simulator, run_chunks
from espstream.stream.streamify import streamify_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FIXTURES = ROOT / "tests" / "data" / "esp-ppq"
TARGETS = ("c", "esp32s3", "esp32p4")


@functools.cache
def _float(path: str) -> onnx.ModelProto:
    return optimize_model(onnx.load(path)).model


@functools.cache
def qdq_model(name: str, target: str = "esp32p4", bits: int = 8) -> onnx.ModelProto:
    fm = _float(str(MODELS / f"{name}.onnx"))
    data = read_calibration_data(str(MODELS / f"{name}.calib.npy"), model_inputs(fm))
    return calibrate_model(fm, data, target=target, bits=bits, report_samples=0).model


@functools.cache
def fixture_qdq(name: str, target: str) -> onnx.ModelProto:
    fm = _float(str(FIXTURES / name / "model.onnx"))
    data = read_calibration_data(str(FIXTURES / name / "calib.npy"), model_inputs(fm))
    return calibrate_model(fm, data, target=target, report_samples=0).model


def fixture_espdl(name: str, target: str, kind: str = "offline"):
    g = read((FIXTURES / name / target / f"{kind}.espdl").read_bytes())
    g.target = g.target or target  # ESP-PPQ records none; S3's layout fits P4 too
    return g


def _layouts(g) -> dict:
    return json.loads(g.metadata["espstream.layout"])


# ---- structure against ESP-PPQ --------------------------------------------------------------


def _ops(g):
    """Node sequence modulo names: op type and attributes (lut names aside). RequantizeLinear
    nodes are left out: where they go follows the exponents, which each quantizer picks itself."""
    return [(n.op_type, {k: v for k, v in n.attrs.items() if k != "lut"})
            for n in g.nodes if n.op_type != "RequantizeLinear"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["tutorial_tcn", "stream_tcn"])
def test_structure_equals_esp_ppq(name, target):
    ours = lower(fixture_qdq(name, target))
    ref = fixture_espdl(name, target)
    assert ours.target == ref.target == target
    assert _ops(ours) == _ops(ref)
    # graph inputs and outputs: same dtype and runtime-layout shape
    for a, b in zip(ours.inputs + ours.outputs, ref.inputs + ref.outputs, strict=True):
        assert (a.name, a.dtype, a.shape) == (b.name, b.dtype, b.shape)
    # every node output has the runtime shape ESP-PPQ gives it (its Transpose output's value
    # info keeps the input's shape in ESP-PPQ's file, so Transposes are compared by perm only)
    on = [n for n in ours.nodes if n.op_type not in ("RequantizeLinear", "Transpose")]
    rn = [n for n in ref.nodes if n.op_type not in ("RequantizeLinear", "Transpose")]
    for a, b in zip(on, rn, strict=True):
        assert ours.value_info(a.outputs[0]).shape == ref.value_info(b.outputs[0]).shape, a.name
        # parameters: same dims, dtype, layout doc string and number of exponents
        for ia, ib in zip(a.inputs[1:], b.inputs[1:], strict=True):
            assert (ia in ours.initializers) == (ib in ref.initializers), (a.name, ia)
            if ia not in ours.initializers:
                continue
            ta, tb = ours.initializers[ia], ref.initializers[ib]
            assert (ta.dims, ta.dtype, ta.doc_string, len(ta.exponents)) == (
                tb.dims, tb.dtype, tb.doc_string, len(tb.exponents)), (a.name, ia)
        if "lut" in a.attrs:
            assert ours.initializers[a.attrs["lut"]].dims == (256,)
            assert ours.initializers[a.attrs["lut"]].exponents == ours.exponents(a.outputs[0])


def test_slice_axes_and_transpose_before_flatten():
    """tutorial_tcn: the time Slice's axes become the NWC axis 1 and a Transpose [0, 2, 1]
    back to the ONNX order precedes Flatten, as in ESP-PPQ's file."""
    g = lower(fixture_qdq("tutorial_tcn", "c"))
    sl = next(n for n in g.nodes if n.op_type == "Slice")
    assert g.initializers[sl.inputs[3]].data.tolist() == [1]  # ONNX axes [2]
    assert g.initializers[sl.inputs[1]].data.tolist() == [-3]
    k = g.nodes.index(sl)
    tr, fl = g.nodes[k + 1], g.nodes[k + 2]
    assert (tr.op_type, tr.attrs["perm"], tr.inputs) == ("Transpose", [0, 2, 1], sl.outputs)
    assert (fl.op_type, fl.inputs) == ("Flatten", tr.outputs)
    gemm = g.nodes[-1]
    assert gemm.op_type == "Gemm" and gemm.attrs["transB"] == 0
    assert g.initializers[gemm.inputs[1]].dims == (1, 1, 48, 16)


def test_weights_match_the_qdq_model():
    """Filters are the QDQ model's integer weights in the logical layout, biases as stored."""
    q = qdq_model("kws2d")
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    g = lower(q)
    conv1 = g.node("/conv1/Conv")
    w = inits["/conv1/Conv.folded_weight_quantized"]  # ONNX [N, C, kH, kW]
    assert np.array_equal(g.initializers[conv1.inputs[1]].data, w.transpose(2, 3, 1, 0))
    # ONNX order [top, left, bottom, right], as ESP-PPQ writes it: ESP-DL's Conv deserializer
    # reorders it to [top, bottom, left, right] on loading
    assert conv1.attrs["pads"] == [2, 1, 0, 1]
    assert conv1.attrs["activation"] == "Relu"
    dw = g.node("/ds/dw/Conv")
    wd = inits["ds.dw.weight_quantized"]  # [16, 1, 3, 3] -> [3, 3, 16, 1]
    assert np.array_equal(g.initializers[dw.inputs[1]].data, wd[:, 0].transpose(1, 2, 0)[..., None])
    assert dw.attrs["activation"] == "Linear" and dw.attrs["group"] == 16
    scale = inits["ds.dw.weight_scale"]
    assert g.initializers[dw.inputs[1]].exponents == [int(np.log2(s)) for s in scale]
    assert np.array_equal(g.initializers[dw.inputs[2]].data, inits["ds.dw.bias_quantized"])
    assert g.inputs[0].shape == [1, 32, 10, 1] and g.outputs[0].shape == [1, 32, 1, 12]
    assert _layouts(g) == {"x": [0, 2, 3, 1], "y": [0, 2, 3, 1]}


def test_every_activation_has_a_value_info():
    g = lower(qdq_model("stream_tcn"))
    produced = [o for n in g.nodes for o in n.outputs] + [v.name for v in g.inputs]
    for name in produced:
        vi = g.value_infos[name]
        assert vi.dtype == np.int8 and len(vi.exponents) == 1 and all(
            isinstance(d, int) for d in vi.shape)
    assert all(n.attrs["quant_type"] == "S8" for n in g.nodes)


def test_requantize_where_the_qdq_model_requantizes():
    q = qdq_model("stream_tcn")
    pairs = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and "requant" in n.output[0]]
    g = lower(q)
    req = [n for n in g.nodes if n.op_type == "RequantizeLinear"]
    assert len(req) == len(pairs) > 0
    for n in req:
        e_in, e_out = g.exponents(n.inputs[0])[0], g.exponents(n.outputs[0])[0]
        assert e_in != e_out
        assert float(g.initializers[n.inputs[1]].data) == 2.0 ** (e_out - e_in)
        assert g.initializers[n.inputs[2]].data.dtype == np.int8
    for n in g.nodes:
        if n.op_type == "Add":
            assert {g.exponents(i)[0] for i in n.inputs} == {g.exponents(n.outputs[0])[0]}


# ---- round trip, simulator agreement ----------------------------------------------------


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["tutorial_tcn", "stream_tcn", "kws2d"])
def test_round_trip_through_espdl(name, target, bits):
    g = lower(qdq_model(name, target, bits))
    assert g.diff(read(write(g))) == []
    assert all(n.attrs["quant_type"] == ("S8" if bits == 8 else "S16") for n in g.nodes)
    if bits == 16:
        bias = [g.initializers[n.inputs[2]] for n in g.nodes if n.op_type == "Conv"]
        assert all(b.dtype == np.int64 for b in bias)


@pytest.mark.parametrize("name", ["tutorial_tcn", "stream_tcn", "kws2d"])
def test_simulator_equals_fake_quant_onnxruntime_on_esp32p4(name):
    """esp32p4 rounds half to even like onnxruntime: the lowered graph run by the integer
    simulator gives the fake-quant model's output exactly (graph optimisations off, so
    onnxruntime does not swap in its own integer kernels)."""
    q = qdq_model(name)
    g = lower(q)
    x = np.load(MODELS / f"{name}.input.npy")[:1].astype(np.float32)
    lay = _layouts(g)
    xq = scheme.quantize(x, g.inputs[0].exponent, 8, "half_even")
    out = Simulator(g).run({"x": np.transpose(xq, lay["x"])})["y"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = ort.InferenceSession(q.SerializeToString(), so).run(None, {"x": x})[0]
    yq = np.rint(np.ldexp(y.astype(np.float64), -g.outputs[0].exponent)).astype(np.int64)
    assert np.array_equal(out, np.transpose(yq, lay["y"]))


# ---- LUTs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ["offline", "streaming"])
def test_swish_tables_equal_esp_ppq(target, kind):
    """Built from the same exponents, every Swish table is byte for byte ESP-PPQ's."""
    ref = fixture_espdl("tutorial_tcn", target, kind)
    luts = [n for n in ref.nodes if "lut" in n.attrs]
    assert len(luts) == 3
    rounding = scheme.get_target(target).rounding
    for n in luts:
        e_in, e_out = ref.exponents(n.inputs[0])[0], ref.exponents(n.outputs[0])[0]
        table = build_lut("Swish", {}, e_in, e_out, rounding)
        assert np.array_equal(table, ref.initializers[n.attrs["lut"]].data)


def test_lut_hand_values():
    t = build_lut("Sigmoid", {}, -4, -7, "half_even")
    assert t[128] == 64  # sigmoid(0) = 0.5 = 64 * 2^-7
    assert t[255] == 127  # sigmoid(7.94) * 128 = 127.95 -> 128 -> saturated
    assert t[0] == 0  # sigmoid(-8) * 128 = 0.043
    assert t[128 + 16] == 94  # sigmoid(1) * 128 = 93.58
    # ties: LeakyRelu(alpha 0.5) of q = -3 at exponent 0 is -1.5
    assert build_lut("LeakyRelu", {"alpha": 0.5}, 0, 0, "half_up")[125] == -1
    assert build_lut("LeakyRelu", {"alpha": 0.5}, 0, 0, "half_even")[125] == -2
    assert build_lut("Tanh", {}, -5, -7, "half_up")[128 + 32] == 97  # tanh(1) * 128 = 97.48


# ---- small graphs: activations, layout-sensitive ops ----------------------------------------


def _calibrated(nodes, inputs, outputs, inits=None, target="esp32p4", opset=13):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in (inits or {}).items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    m = onnx.shape_inference.infer_shapes(m)
    return calibrate_model(m, random_data(model_inputs(m), 16, 0), target=target,
                           report_samples=0).model


def _conv_w(cout, cin, k, seed=0):
    return (np.random.default_rng(seed).standard_normal([cout, cin, k]) / np.sqrt(cin * k))


def test_activations_become_luts_and_fused_relu():
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Sigmoid", ["r1"], ["s1"]),
        helper.make_node("Tanh", ["s1"], ["t1"]),
        helper.make_node("Conv", ["t1", "w2"], ["c2"]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["k2"]),
        helper.make_node("Concat", ["k2", "t1"], ["cat"], axis=1),
        helper.make_node("MaxPool", ["cat"], ["mp"], kernel_shape=[2], strides=[2]),
        helper.make_node("HardSwish", ["mp"], ["y"]),
    ]
    q = _calibrated(nodes, {"x": [1, 4, 8]}, ["y"],
                    {"w1": _conv_w(6, 4, 3), "w2": _conv_w(6, 6, 1, 1), "lo": 0.0, "hi": 0.5},
                    opset=14)
    g = lower(q)
    assert [n.op_type for n in g.nodes] == [
        "Conv", "Sigmoid", "Tanh", "Conv", "Clip", "Concat", "MaxPool", "HardSwish"]
    assert g.nodes[0].attrs["activation"] == "Relu"
    assert g.nodes[3].attrs["activation"] == "Linear"  # Clip(0, 0.5) is not a plain Relu
    for n in g.nodes:
        if n.op_type in ("Sigmoid", "Tanh", "Clip", "HardSwish"):
            lut = g.initializers[n.attrs["lut"]]
            assert lut.dims == (256,) and lut.exponents == g.exponents(n.outputs[0])
    clip = g.nodes[4]
    assert g.exponents(clip.inputs[0]) == g.exponents(clip.outputs[0])
    table = g.initializers[clip.attrs["lut"]].data
    e = g.exponents(clip.outputs[0])[0]
    assert table.max() == min(127, round(0.5 / 2.0**e)) and table[:128].max() == 0
    assert g.nodes[5].attrs["axis"] == 2  # ONNX channel axis 1 -> NWC axis 2
    assert len({g.exponents(i)[0] for i in g.nodes[5].inputs}) == 1
    assert g.nodes[6].attrs["kernel_shape"] == [2] and g.outputs[0].shape == [1, 4, 12]


def test_reshape_and_softmax_layouts():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Softmax", ["r"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(_conv_w(4, 3, 1).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([1, 20], np.int64), "shape")],
    )
    m = onnx.shape_inference.infer_shapes(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    q = calibrate_model(m, random_data(model_inputs(m), 8, 0), report_samples=0).model
    g = lower(q)
    assert [n.op_type for n in g.nodes] == ["Conv", "Transpose", "Reshape", "Softmax"]
    assert g.nodes[1].attrs["perm"] == [0, 2, 1]
    assert g.nodes[3].attrs["axis"] == 1
    assert g.outputs[0].dtype == np.float32 and g.outputs[0].shape == [1, 20]


# ---- streaming ----------------------------------------------------------------------------


def test_streaming_caches_and_chunked_equals_offline():
    q = qdq_model("stream_tcn")
    s = streamify_model(q, 4).model
    g = lower(s)
    caches = [n for n in g.nodes if n.op_type == "StreamingCache"]
    assert [n.attrs["window_size"] for n in caches] == [3, 5, 9, 17]
    assert all(n.attrs["frame_axis"] == 1 and n.attrs["quant_type"] == "S8" for n in caches)
    assert [v.name for v in g.inputs] == ["x"] and [v.name for v in g.outputs] == ["y"]
    assert g.inputs[0].shape == [1, 4, 16]
    assert g.metadata["espstream.chunk"] == "4"
    assert json.loads(g.metadata["espstream.delay"]) == {"y": 0}
    assert g.diff(read(write(g))) == []
    for n in g.nodes:  # the consumer after a cache runs with no time padding
        if n.op_type == "Conv" and n.inputs[0] in {c.outputs[0] for c in caches}:
            assert n.attrs["pads"] == [0, 0]
    off = lower(q)
    x = np.random.default_rng(3).integers(-128, 128, [1, 64, 16]).astype(np.int8)
    want = Simulator(off).run({"x": x})["y"]
    got = np.concatenate([o["y"] for o in run_chunks(Simulator(g), {"x": x})], axis=1)
    assert np.array_equal(got, want)


def test_streaming_tutorial_tcn_summary_output():
    g = lower(streamify_model(qdq_model("tutorial_tcn"), 3).model)
    assert [n.attrs["window_size"] for n in g.nodes if n.op_type == "StreamingCache"] == [
        3, 5, 3, 3]
    assert g.inputs[0].shape == [1, 3, 16] and g.outputs[0].shape == [1, 16]


def test_recurrent_state_pair_is_refused():
    m = onnx.ModelProto()
    m.CopyFrom(streamify_model(qdq_model("stream_tcn"), 4).model)
    states = json.loads(next(p.value for p in m.metadata_props if p.key == "espstream.states"))
    a, b = states[0]
    # pretend the first state were a hidden state read by an Add instead of its cache
    cache = next(n for n in m.graph.node if n.op_type == "StreamingCache" and n.input[1] == a)
    cache.op_type, cache.domain = "Add", ""
    del cache.attribute[:]
    with pytest.raises(UserError, match=f"state '{a}' -> '{b}' is not a StreamingCache state"):
        lower(m)


# ---- refusals -----------------------------------------------------------------------------


def test_float_model_refused():
    with pytest.raises(UserError, match="float model; calibrate it first"):
        lower(onnx.load(MODELS / "tutorial_tcn.onnx"))


def test_target_mismatch_refused():
    with pytest.raises(UserError, match="--target c differs .* esp32p4"):
        lower(qdq_model("kws2d"), target="c")
    assert lower(qdq_model("kws2d"), target="esp32p4").target == "esp32p4"


def test_all_unsupported_operators_listed_at_once():
    q = onnx.ModelProto()
    q.CopyFrom(qdq_model("stream_tcn"))
    relus = [n for n in q.graph.node if n.op_type == "Relu"]
    relus[0].op_type = "Erf"
    relus[1].op_type = "Softplus"
    relus[2].op_type, relus[2].domain = "FusedThing", "com.vendor"
    with pytest.raises(UserError) as e:
        lower(q)
    msg = str(e.value)
    assert "3 operator(s)" in msg
    for n, t in ((relus[0], "Erf"), (relus[1], "Softplus"), (relus[2], "com.vendor.FusedThing")):
        assert f"{t} '{n.name}'" in msg


def test_non_power_of_two_scale_refused():
    q = onnx.ModelProto()
    q.CopyFrom(qdq_model("kws2d"))
    for t in q.graph.initializer:
        if t.name == "scale_2^-5":
            t.CopyFrom(numpy_helper.from_array(np.array(0.03, np.float32), t.name))
    with pytest.raises(UserError, match="not a power of two"):
        lower(q)

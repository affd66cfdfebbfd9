"""The int8 path on what streamify writes into QDQ models: one test (or two) per fix.

- lower, rule 7: a data-movement output that no QuantizeLinear reads is still the integer
  activation at its input's exponent (streamify's StreamingCache -> Slice chains);
  an Identity (a no-op Pad after streamify) is an alias, or an Identity node for an output.
- lower, rule 8: streamify's start mask, a StreamingCache over a DequantizeLinear of integer
  ones, reads them as an initializer.
- lower, rule 5: grouped convolutions other than depthwise stay refused (ESP-DL's Conv takes
  group 1 or group = input channels).
- streamify on 16-bit QDQ models (opset 21): the StreamingCache function imports the model's
  opset, and the start mask is int16 like the tensor it masks.
- verify's Runner interface has `reset()`; `run_stream` (and the staged pipeline's
  `run_pipeline`) call it before every sequence, and the int8 runner no longer guesses a new
  sequence from the state arrays it is fed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from stream_graphs import G

from espstream import verify_int8
from espstream.errors import UserError
from espstream.lower import lower
from espstream.quant import calibrate_model, model_inputs, random_data
from espstream.sim import Simulator
from espstream.stream import cache
from espstream.stream.streamify import streamify_model
from espstream.verify import OrtRunner, read_meta, run_stream, verify_models

verify_int8.register()


def _qdq_model(nodes, inits: dict[str, np.ndarray], x_shape, outputs: dict[str, list],
               target: str = "c") -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    m.metadata_props.add(key="espstream.target", value=target)
    onnx.checker.check_model(m)
    return m


def _qdq(src: str, dst: str, scale: str) -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [src, scale, "zp"], [dst + "_q"]),
            helper.make_node("DequantizeLinear", [dst + "_q", scale, "zp"], [dst])]


SCALES = {"s4": np.float32(2.0**-4), "s3": np.float32(2.0**-3), "zp": np.int8(0)}


def _pipeline(g: G, outputs: list[str], chunk: int, bits: int = 8, target: str = "c"):
    m = g.model(*outputs)
    q = calibrate_model(m, random_data(model_inputs(m), 4), target=target, bits=bits,
                        report_samples=0).model
    return q, streamify_model(q, chunk, axes={"x": 2}).model


def _int8_exact(q, s, frames: int) -> None:
    v = verify_models(q, s, random=2, engine="int8", frames=frames)
    assert v.ok, v.failure()
    for o in v.outputs:
        assert o.compared > 0 and o.max_abs == 0.0 and o.exact == 1.0


# ---- lower rule 7: data movement without a Q/DQ after it -----------------------------------


def test_data_movement_without_qdq_keeps_the_input_exponent():
    """x -> Transpose -> Transpose -> Q(2^-3): the middle tensor has no Q/DQ; it is the integer
    activation at x's exponent 2^-4, and the final Q is one RequantizeLinear (a right shift by
    1, half up on the c target)."""
    nodes = [*_qdq("x", "xd", "s4"),
             helper.make_node("Transpose", ["xd"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Transpose", ["t"], ["u"], perm=[0, 2, 1]),
             *_qdq("u", "y", "s3")]
    g = lower(_qdq_model(nodes, SCALES, [1, 2, 4], {"y": [1, 2, 4]}))
    assert [n.op_type for n in g.nodes] == ["Transpose", "Transpose", "RequantizeLinear"]
    vi = g.value_info("t")
    assert vi.exponents == [-4] and vi.dtype == np.int8
    # runtime layout of x is [1, T, C]; y comes out in the ONNX order [1, C, T]
    x = np.array([[[3, -3], [1, -1], [5, 127], [-128, 0]]], np.int8)
    y = Simulator(g).run({"x": x})["y"]
    assert y.tolist() == [[[2, 1, 3, -64], [-1, 0, 64, 0]]]


@pytest.mark.parametrize("merge", ["add", "concat"])
def test_cache_then_slice_chain_lowers_and_streams_exactly(merge):
    """Two consumers read x back 2 and 1 frames: streamify writes ONE cache on x's
    DequantizeLinear output and a Slice of it (no Q/DQ between them) for the shorter one
    (the lowering failure first reported as 'a Concat of Sigmoid / Tanh conv outputs')."""
    g = G(channels=2, frames=32, seed=3)
    a, b = g.act(g.conv("x", 2, k=3), "Sigmoid"), g.act(g.conv("x", 2, k=2), "Tanh")
    y = g.add(a, b) if merge == "add" else g.concat(a, b)
    q, s = _pipeline(g, [y], chunk=4)
    producer = {o: n for n in s.graph.node for o in n.output}
    chains = [n for n in s.graph.node if n.op_type == "Slice"
              and producer.get(n.input[0]) is not None
              and producer[n.input[0]].op_type == "StreamingCache"]
    assert chains, "streamify no longer writes cache -> Slice: this test needs another graph"
    ig = lower(s)
    caches = {n.outputs[0]: n for n in ig.nodes if n.op_type == "StreamingCache"}
    slices = [n for n in ig.nodes if n.op_type == "Slice" and n.inputs[0] in caches]
    assert slices
    for n in slices:
        assert ig.value_info(n.outputs[0]).exponents == ig.value_info(n.inputs[0]).exponents
    _int8_exact(q, s, 32)


# ---- lower rule 7: Identity ----------------------------------------------------------------


def test_identity_is_an_alias_or_a_node_for_an_output():
    inner = [*_qdq("x", "xd", "s4"), helper.make_node("Identity", ["xd"], ["i"]),
             *_qdq("i", "id", "s4"), helper.make_node("Relu", ["id"], ["r"]),
             *_qdq("r", "y", "s4")]
    g = lower(_qdq_model(inner, SCALES, [1, 2, 4], {"y": [1, 2, 4]}))
    assert [n.op_type for n in g.nodes] == ["Relu"] and g.nodes[0].inputs == ["x"]
    last = [*_qdq("x", "xd", "s4"), helper.make_node("Identity", ["xd"], ["i"]),
            *_qdq("i", "y", "s4")]
    g = lower(_qdq_model(last, SCALES, [1, 2, 4], {"y": [1, 2, 4]}))
    assert [(n.op_type, n.outputs) for n in g.nodes] == [("Identity", ["y"])]
    x = np.arange(-4, 4, dtype=np.int8).reshape(1, 4, 2)
    assert np.array_equal(Simulator(g).run({"x": x})["y"], x)


def test_streamified_no_op_pad_lowers_and_streams_exactly():
    """A time Pad in front of a conv becomes an Identity after streamify (the cache supplies
    the padding); as the last layer, its output is a graph output."""
    for last in (False, True):
        g = G(channels=2, frames=24, seed=5)
        x = g.conv("x", 2, k=2)
        x = g.pad(x, 2, 0)
        if not last:
            x = g.conv(x, 2, k=3, left=0)
        q, s = _pipeline(g, [x], chunk=3)
        assert "Identity" in [n.op_type for n in s.graph.node]
        ops = [n.op_type for n in lower(s).nodes]
        assert ("Identity" in ops) == last
        _int8_exact(q, s, 24)


# ---- lower rule 8: the start mask -----------------------------------------------------------


def _lookahead_graph(seed: int = 7) -> tuple[G, str]:
    """A lookahead conv (delay 2, biased so its pre-start frames are not zero) followed by a
    causal one: streamify masks the delayed tensor's pre-start frames to zero."""
    g = G(channels=2, frames=24, seed=seed)
    a = g.conv("x", 2, k=3, left=0, right=2)
    return g, g.conv(a, 2, k=3)


@pytest.mark.parametrize("target", ["c", "esp32p4"])
def test_start_mask_is_a_cache_over_an_initializer(target):
    g, y = _lookahead_graph()
    q, s = _pipeline(g, [y], chunk=4, target=target)
    assert any(n.op_type == "Mul" and n.name.startswith("stream/") for n in s.graph.node)
    ig = lower(s)
    [mask] = [n for n in ig.nodes if n.op_type == "StreamingCache"
              and n.inputs[0] in ig.initializers]
    ones = ig.initializers[mask.inputs[0]]
    assert ones.data.dtype == np.int8 and ones.exponents == [0]
    assert ones.data.shape == (1, 4, 1) and (ones.data == 1).all()  # [1, chunk, 1] in NWC
    assert mask.attrs["window_size"] == 3  # the delay (2) + 1
    # the mask, run alone: two zero frames on the first call, ones afterwards
    trace = Simulator(ig)
    x = np.zeros([1, 4, 2], np.int8)
    first = trace.trace({"x": x})[mask.outputs[0]]
    second = trace.trace({"x": x})[mask.outputs[0]]
    assert first[0, :, 0].tolist() == [0, 0, 1, 1, 1, 1]
    assert second[0, :, 0].tolist() == [1] * 6
    _int8_exact(q, s, 24)


def test_lookahead_model_exports_with_its_mask_counted():
    """export (report, inspect) on a streaming model whose start mask is a cache over an
    initializer: every cache byte is counted, the mask's included (found by fuzzing: export
    looked the mask up among the activations and failed)."""
    from espstream.export import export_model
    from espstream.inspect import inspect_bytes

    g, y = _lookahead_graph()
    m = g.model(y)
    q = calibrate_model(m, random_data(model_inputs(m), 4), target="esp32p4",
                        report_samples=0).model
    st = streamify_model(q, 4, axes={"x": 2})
    ex = export_model(st.model, test_random=True)
    # streamify counts its states from the ONNX shapes, one byte per int8 value
    assert ex.report["cache_bytes"] == st.state_bytes_int8 > 0
    info = inspect_bytes(ex.data, "m.espdl")
    caches = info["streaming_caches"]
    mask = [c for c in caches if c["input"] in lower(st.model).initializers]
    assert [c["bytes"] for c in mask] == [2]  # (window 3 - 1) frames of one int8 value
    assert sum(c["bytes"] for c in caches) == info["cache_bytes"] == st.state_bytes_int8


# ---- lower rule 5: what stays refused -------------------------------------------------------


def test_grouped_conv_refused_depthwise_accepted():
    g = G(channels=4, frames=16, seed=1)
    y = g.conv("x", 4, k=3, group=2)
    m = g.model(y)
    q = calibrate_model(m, random_data(model_inputs(m), 2), target="c", report_samples=0).model
    with pytest.raises(UserError, match="group 2 with 4 input and 4 output channels; ESP-DL "
                                        r"supports group 1 or depthwise \(group = channels\)"):
        lower(q)
    g = G(channels=4, frames=16, seed=1)
    m = g.model(g.conv("x", k=3, group=-1))
    q = calibrate_model(m, random_data(model_inputs(m), 2), target="c", report_samples=0).model
    [conv] = [n for n in lower(q).nodes if n.op_type == "Conv"]
    assert conv.attrs["group"] == 4


# ---- 16-bit models through streamify --------------------------------------------------------


def test_cache_function_imports_the_model_opset():
    for opset, want in ((21, 21), (13, 13), (11, 13)):
        m = helper.make_model(helper.make_graph([], "g", [], []),
                              opset_imports=[helper.make_opsetid("", opset)])
        cache.install(m)
        [f] = m.functions
        assert [(o.domain, o.version) for o in f.opset_import] == [("", want)]


def test_sixteen_bit_model_streams_exactly_with_an_int16_mask():
    g, y = _lookahead_graph(seed=11)
    q, s = _pipeline(g, [y], chunk=4, bits=16, target="esp32s3")
    assert next(o.version for o in s.opset_import if o.domain == "") == 21
    onnx.checker.check_model(s)
    ig = lower(s)
    [mask] = [n for n in ig.nodes if n.op_type == "StreamingCache"
              and n.inputs[0] in ig.initializers]
    assert ig.initializers[mask.inputs[0]].data.dtype == np.int16
    assert all(n.attrs["quant_type"] == "S16" for n in ig.nodes)
    _int8_exact(q, s, 24)  # the int8 engine runs the 16-bit model as the chip would
    # and onnxruntime runs the streaming model too (fake-quant, within one step)
    assert verify_models(q, s, random=1, frames=24).ok


# ---- verify: Runner.reset() -------------------------------------------------------------------


class _Recording:
    def __init__(self, inner) -> None:
        self.inner, self.events = inner, []

    def reset(self) -> None:
        self.events.append("reset")
        self.inner.reset()

    def run(self, feeds):
        self.events.append("run")
        return self.inner.run(feeds)


def test_run_stream_resets_before_every_sequence():
    g = G(channels=2, frames=16, seed=2)
    q, s = _pipeline(g, [g.conv("x", 2, k=3)], chunk=4)
    meta = read_meta(s)
    x = np.random.default_rng(0).standard_normal([1, 2, 16]).astype(np.float32)
    for runner in (OrtRunner(s, "s"), verify_int8.Int8Runner(s, "s")):
        rec = _Recording(runner)
        a = run_stream(rec, s, meta, {"x": x}, 4)
        b = run_stream(rec, s, meta, {"x": x}, 4)
        assert rec.events == ["reset", "run", "run", "run", "run"] * 2
        assert all(np.array_equal(a[k], b[k]) for k in a)  # the second sequence starts clean


def test_int8_runner_keeps_its_caches_whatever_states_it_is_fed():
    """Fresh zero state arrays on every call (the old runner took that for a new sequence and
    reset): the simulator's caches carry on, and only reset() clears them."""
    g = G(channels=2, frames=16, seed=4)
    q, s = _pipeline(g, [g.conv("x", 2, k=3)], chunk=4)
    meta = read_meta(s)
    x = np.random.default_rng(1).standard_normal([1, 2, 16]).astype(np.float32)
    runner = verify_int8.Int8Runner(s, "s")
    want = run_stream(runner, s, meta, {"x": x}, 4)
    state_outs = {b for _a, b in meta.states}
    [out] = [o.name for o in s.graph.output if o.name not in state_outs]
    zeros = {a: np.zeros([d.dim_value for d in vi.type.tensor_type.shape.dim], np.float32)
             for a, _b in meta.states for vi in s.graph.input if vi.name == a}
    assert zeros
    runner.reset()
    got = [runner.run({"x": x[:, :, 4 * k: 4 * k + 4], **zeros})[out] for k in range(4)]
    assert np.array_equal(np.concatenate(got, axis=2), want[out])
    first = {"x": x[:, :, 0:4], **zeros}
    assert not np.array_equal(runner.run(first)[out], got[0])  # the caches hold frames 13..15
    runner.reset()
    assert np.array_equal(runner.run(first)[out], got[0])


def test_staged_int8_pipeline_starts_every_sequence_clean():
    """verify of `streamify --stages` parts in the int8 engine: the parts' caches are reset
    before each sequence (run_pipeline calls reset()), so every sequence, not only the first,
    equals offline frame for frame."""
    from espstream.stream.stages import streamify_stages, verify_stages

    g = G(channels=2, frames=16, seed=6)
    y = g.conv(g.act(g.conv("x", 2, k=3), "Relu"), 2, k=3, d=2)
    m = g.model(y)
    q = calibrate_model(m, random_data(model_inputs(m), 4), target="c", report_samples=0).model
    _res, split = streamify_stages(q, 4, 2, axes={"x": 2})
    res = verify_stages(q, [p.model for p in split.parts], random=3, engine="int8")
    assert res.ok, res.failure()
    [o] = res.outputs
    assert o.kind == "time" and o.max_abs == 0.0 and o.compared == 16

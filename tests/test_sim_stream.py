"""StreamingCache in the simulator, and what ESP-PPQ's automatic streaming conversion does.

The ESP-PPQ findings (tests/data/esp-ppq/*/*/streaming.espdl, chunk 3 for tutorial_tcn, 4 for
stream_tcn), asserted exactly below:

1. Neither streaming export can run: every residual Add receives the StreamingCache's output
   ([kept W-1 frames ; chunk], so chunk + W - 1 frames) on one side and the block's output
   (chunk frames) on the other. ESP-PPQ inserted the cache in front of the block and let the
   skip connection read the cache's output instead of the chunk ("does not align residual
   branches"). ESP-DL does not check Add's shapes: it takes the larger frame count and reads
   past the end of the shorter buffer, so on the chip the result is wrong, not an error; the
   simulator refuses it with the node and the two shapes.
2. That is the only defect: with each residual operand cut back to its last `chunk` frames
   (the current chunk, which is what the offline model adds), both streaming exports equal
   their offline exports exactly on every target: stream_tcn frame for frame (64 frames),
   tutorial_tcn after every chunk against the offline model run on the frames so far.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from espstream import kernels as fast
from espstream.errors import UserError
from espstream.espdl import read
from espstream.intgraph import IntGraph, Node, Tensor, ValueInfo
from espstream.kernels import reference
from espstream.sim import Simulator, run_chunks

DATA = Path(__file__).parent / "data" / "esp-ppq"
TARGETS = ("esp32p4", "esp32s3", "c")
CHUNK = {"tutorial_tcn": 3, "stream_tcn": 4}


def fixture(model: str, target: str, kind: str) -> IntGraph:
    g = read((DATA / model / target / f"{kind}.espdl").read_bytes())
    g.target = g.target or target  # ESP-PPQ records none; S3's layout fits P4 too
    return g


def cache_graph(window: int, shape: list[int], axis: int = 1) -> IntGraph:
    vis = {
        "x": ValueInfo("x", np.dtype(np.int8), shape, [-3]),
        "y": ValueInfo("y", np.dtype(np.int8), None, [-3]),
    }
    return IntGraph(
        name="cache",
        nodes=[Node("StreamingCache", "sc", ["x"], ["y"],
                    {"window_size": window, "frame_axis": axis, "quant_type": "S8"})],
        inputs=[vis["x"]], outputs=[vis["y"]], value_infos=vis, target="c",
    )  # fmt: skip


# ---- StreamingCache semantics -----------------------------------------------------------------


def test_cache_keeps_window_minus_one_frames_and_resets() -> None:
    sim = Simulator(cache_graph(3, [1, 2, 2]))
    a = np.array([[[1, 2], [3, 4]]], np.int8)
    b = np.array([[[5, 6], [7, 8]]], np.int8)
    c = np.array([[[9, 10], [11, 12]]], np.int8)
    assert sim.caches() == {"sc": None}
    y = sim.run({"x": a})["y"]
    assert y.tolist() == [[[0, 0], [0, 0], [1, 2], [3, 4]]]  # zero at start
    assert sim.caches()["sc"].tolist() == [[[1, 2], [3, 4]]]
    assert sim.run({"x": b})["y"].tolist() == [[[1, 2], [3, 4], [5, 6], [7, 8]]]
    assert sim.run({"x": c})["y"].tolist() == [[[5, 6], [7, 8], [9, 10], [11, 12]]]
    sim.reset()
    assert sim.run({"x": c})["y"].tolist() == [[[0, 0], [0, 0], [9, 10], [11, 12]]]


def test_cache_longer_than_chunk() -> None:
    """W - 1 = 4 kept frames from chunks of 1: the window slides one frame per call."""
    sim = Simulator(cache_graph(5, [1, 1, 1]))
    outs = [sim.run({"x": np.array([[[v]]], np.int8)})["y"][0, :, 0].tolist() for v in (1, 2, 3)]
    assert outs == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 2], [0, 0, 1, 2, 3]]


def test_cache_window_one_is_identity_and_nhwc_frames() -> None:
    x = np.arange(6, dtype=np.int8).reshape(1, 1, 3, 2)
    assert np.array_equal(Simulator(cache_graph(1, [1, 1, 3, 2])).run({"x": x})["y"], x)
    # NHWC with frames on H (axis 1): whole [W, C] rows are frames.
    sim = Simulator(cache_graph(2, [1, 1, 3, 2]))
    sim.run({"x": x})
    y = sim.run({"x": x + 10})["y"]
    assert y.shape == (1, 2, 3, 2)
    assert np.array_equal(y[0, 0], x[0, 0]) and np.array_equal(y[0, 1], x[0, 0] + 10)


def test_cache_is_byte_flat_like_the_runtime() -> None:
    """With an axis of size > 1 before the frame axis the runtime's flat copy is not a
    per-row concatenation; the simulator copies flatly too: [kept bytes ; chunk bytes]."""
    sim = Simulator(cache_graph(2, [2, 2]), check_shapes=True)
    x = np.array([[1, 2], [3, 4]], np.int8)  # frame axis 1 of a [2, 2] tensor; kept = [2, 1]
    y = sim.run({"x": x})["y"]
    assert y.reshape(-1).tolist() == [0, 0, 1, 2, 3, 4]
    assert y.shape == (2, 3)
    assert sim.caches()["sc"].reshape(-1).tolist() == [3, 4]


def test_cache_chunk_change_needs_reset() -> None:
    """Another chunk length keeps the same W - 1 frames; other frames (channels) do not fit."""
    sim = Simulator(cache_graph(3, [1, 2, 2]), check_shapes=False)
    sim.run({"x": np.ones((1, 2, 2), np.int8)})
    assert sim.run({"x": np.zeros((1, 3, 2), np.int8)})["y"][0, :, 0].tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(UserError, match="reset"):
        sim.run({"x": np.zeros((1, 2, 3), np.int8)})
    sim.reset()
    assert sim.run({"x": np.ones((1, 2, 3), np.int8)})["y"].shape == (1, 4, 3)


def _causal_conv(stream: bool, T: int) -> IntGraph:
    """pre 1x1 conv -> (cache W=5) -> dilated depthwise conv (k 3, d 2, offline pads [4, 0])."""
    rng = np.random.default_rng(7)
    w1 = rng.integers(-128, 128, (1, 4, 4)).astype(np.int8)
    w2 = rng.integers(-128, 128, (3, 4, 1)).astype(np.int8)
    b2 = rng.integers(-2000, 2000, 4).astype(np.int32)
    vis = {
        "x": ValueInfo("x", np.dtype(np.int8), [1, T, 4], [-5]),
        "h": ValueInfo("h", np.dtype(np.int8), None, [-4]),
        "hc": ValueInfo("hc", np.dtype(np.int8), None, [-4]),
        "y": ValueInfo("y", np.dtype(np.int8), None, [-3]),
    }
    conv = {"activation": "Relu", "dilations": [2], "group": 4, "kernel_shape": [3],
            "pads": [0, 0] if stream else [4, 0], "strides": [1]}  # fmt: skip
    nodes = [Node("Conv", "pre", ["x", "w1"], ["h"], {"group": 1, "kernel_shape": [1]})]
    if stream:
        nodes.append(
            Node("StreamingCache", "sc", ["h"], ["hc"], {"window_size": 5, "frame_axis": 1})
        )
    nodes.append(Node("Conv", "dw", ["hc" if stream else "h", "w2", "b2"], ["y"], conv))
    return IntGraph(
        name="causal", nodes=nodes,
        initializers={"w1": Tensor("w1", w1, [-8]), "w2": Tensor("w2", w2, [-7]),
                      "b2": Tensor("b2", b2, [-11])},
        inputs=[vis["x"]], outputs=[vis["y"]], value_infos=vis, target="esp32p4",
    )  # fmt: skip


@pytest.mark.parametrize("backend", [fast, reference], ids=["cython", "reference"])
def test_chunked_dilated_conv_equals_offline(backend) -> None:
    x = np.random.default_rng(3).integers(-128, 128, (1, 12, 4)).astype(np.int8)
    offline = Simulator(_causal_conv(False, 12), backend).run({"x": x})["y"]
    sim = Simulator(_causal_conv(True, 2), backend)
    chunks = run_chunks(sim, {"x": x})
    assert len(chunks) == 6
    assert np.array_equal(np.concatenate([c["y"] for c in chunks], axis=1), offline)
    sim.reset()  # a second pass from zero state gives the same again
    again = run_chunks(sim, {"x": x})
    assert np.array_equal(np.concatenate([c["y"] for c in again], axis=1), offline)


def test_run_chunks_needs_whole_chunks() -> None:
    sim = Simulator(_causal_conv(True, 2))
    with pytest.raises(UserError, match="not a whole number of chunks of 2 frames"):
        run_chunks(sim, {"x": np.zeros((1, 5, 4), np.int8)})


# ---- ESP-PPQ's streaming exports ----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", CHUNK)
def test_esp_ppq_streaming_export_misaligns_residual_add(model: str, target: str) -> None:
    """Finding 1: the first chunk already fails at the first residual Add."""
    g = fixture(model, target, "streaming")
    chunk = CHUNK[model]
    assert g.inputs[0].shape == [1, chunk, 16]
    caches = {n.name: n.attrs["window_size"] for n in g.nodes if n.op_type == "StreamingCache"}
    want = [3, 5, 3, 3] if model == "tutorial_tcn" else [3, 5, 9, 17]
    assert list(caches.values()) == want
    x = fixture(model, target, "offline").test_inputs["x"].data
    sim = Simulator(g)
    long = chunk + 2  # the first cache (window 3) feeds the first residual Add
    with pytest.raises(
        UserError,
        match=rf"node '/Add' \(Add\): input shapes \[1, {long}, 32\] and \[1, {chunk}, 32\]",
    ):
        sim.run({"x": x[:, :chunk]})


def align_residuals(g: IntGraph, chunk: int) -> IntGraph:
    """The fix ESP-PPQ misses: an Add operand that is a StreamingCache output (or a
    RequantizeLinear of one) is cut back to its last `chunk` frames, the current chunk."""
    g = copy.deepcopy(g)
    caches = {n.outputs[0] for n in g.nodes if n.op_type == "StreamingCache"}
    caches |= {
        n.outputs[0] for n in g.nodes if n.op_type == "RequantizeLinear" and n.inputs[0] in caches
    }
    for name, v in (("_start", -chunk), ("_end", 2**62), ("_axis", 1)):
        g.initializers[name] = Tensor(name, np.array([v], np.int64), [0])
    nodes = []
    for n in g.nodes:
        if n.op_type == "Add":
            for i, name in enumerate(n.inputs):
                if name in caches:
                    cut = f"{name}/last_chunk"
                    nodes.append(Node("Slice", cut, [name, "_start", "_end", "_axis"], [cut]))
                    vi = g.value_info(name)
                    g.value_infos[cut] = ValueInfo(cut, vi.dtype, None, list(vi.exponents))
                    n.inputs[i] = cut
        nodes.append(n)
    g.nodes = nodes
    return g


@pytest.mark.parametrize("target", TARGETS)
def test_esp_ppq_stream_tcn_exact_once_residuals_aligned(target: str) -> None:
    """Finding 2 for stream_tcn: 16 chunks of 4 frames == the offline output, all 64 frames."""
    off = fixture("stream_tcn", target, "offline")
    x, y = off.test_inputs["x"].data, off.test_outputs["y"].data
    sim = Simulator(align_residuals(fixture("stream_tcn", target, "streaming"), 4))
    outs = run_chunks(sim, {"x": x})
    assert len(outs) == 16
    np.testing.assert_array_equal(np.concatenate([o["y"] for o in outs], axis=1), y)


@pytest.mark.parametrize("target", TARGETS)
def test_esp_ppq_tutorial_tcn_exact_once_residuals_aligned(target: str) -> None:
    """Finding 2 for tutorial_tcn (a window summary): after every chunk k the streaming
    output equals the offline model run on frames [0, 3(k+1)); after the last chunk it equals
    ESP-PPQ's own test output."""
    off = fixture("tutorial_tcn", target, "offline")
    x, y = off.test_inputs["x"].data, off.test_outputs["y"].data
    sim = Simulator(align_residuals(fixture("tutorial_tcn", target, "streaming"), 3))
    outs = run_chunks(sim, {"x": x})
    assert len(outs) == 8
    np.testing.assert_array_equal(outs[-1]["y"], y)
    offline = Simulator(off, check_shapes=False)
    for k, o in enumerate(outs):
        np.testing.assert_array_equal(o["y"], offline.run({"x": x[:, : 3 * (k + 1)]})["y"])

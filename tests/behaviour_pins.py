"""SHA-256 pins of what the stages write, to prove a refactor changes no behaviour.

For every bundled model, the two ESP-PPQ fixture models and two operator-zoo graphs built here,
on every target, in int8 and int16, offline and streaming: the QDQ ONNX (`calibrate`), the
streaming ONNX (`streamify` of the QDQ model), the `.espdl` bytes (`export`) and the simulator's
outputs on a fixed input (offline in one call, streaming chunk by chunk). For the ESP-PPQ fixture
files: the simulator's outputs on their own test inputs and the bytes `write(read(file))` gives.

`python tests/behaviour_pins.py --write` records the current code's hashes in
tests/data/behaviour_hashes.json; tests/test_behaviour_hashes.py recomputes and compares them.
The pins record behaviour, they do not judge it: correctness is the other tests' job.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "tests" / "data" / "behaviour_hashes.json"
FIXTURES = ROOT / "tests" / "data" / "esp-ppq"
TARGETS = ("esp32p4", "esp32s3", "c")
BITS = (8, 16)


def _h(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _h_arrays(arrays: dict[str, np.ndarray] | list[dict[str, np.ndarray]]) -> str:
    d = hashlib.sha256()
    calls = arrays if isinstance(arrays, list) else [arrays]
    for call in calls:
        for k in sorted(call):
            a = np.ascontiguousarray(call[k])
            d.update(f"{k}:{a.dtype}:{a.shape}".encode())
            d.update(a.tobytes())
    return d.hexdigest()


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def zoo_time() -> onnx.ModelProto:
    """A time-preserving graph over most operators espstream lowers: x [1, 8, 16] (N, C, T)."""
    rng = np.random.default_rng(7)

    def w(*s: int, scale: float = 0.4) -> np.ndarray:
        return (rng.standard_normal(s) * scale).astype(np.float32)

    n = helper.make_node
    inits = [
        _init("w1", w(8, 8, 3)), _init("b1", w(8)), _init("cmul", w(1, 8, 1) + 1.0),
        _init("slope", np.abs(w(8, 1)) + 0.5), _init("wd", w(8, 1, 3)), _init("bd", w(8)),
        _init("mm", w(8, 4)), _init("cadd", w(1, 8, 1)),
    ]
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["a0"], name="conv1", kernel_shape=[3], pads=[2, 0]),
        n("Relu", ["a0"], ["a"], name="relu1"),
        n("Sigmoid", ["a"], ["sa"], name="sig1"),
        n("Mul", ["a", "sa"], ["b"], name="silu1"),
        n("Tanh", ["b"], ["c"], name="tanh1"),
        n("LeakyRelu", ["c"], ["d"], name="lrelu1", alpha=0.1),
        n("Clip", ["d", "lo", "hi"], ["e"], name="clip1"),
        n("Add", ["e", "a"], ["f"], name="add1"),
        n("Mul", ["f", "cmul"], ["g"], name="mul1"),
        n("MaxPool", ["g"], ["h"], name="maxpool1", kernel_shape=[2], pads=[1, 0]),
        n("Concat", ["h", "b"], ["i"], name="concat1", axis=1),
        n("Split", ["i"], ["j1", "j2"], name="split1", axis=1),
        n("Sub", ["j1", "j2"], ["k"], name="sub1"),
        n("Mul", ["k", "slope"], ["l"], name="mulc2"),
        n("Conv", ["l", "wd", "bd"], ["m"], name="dwconv1", kernel_shape=[3], group=8,
          dilations=[2], pads=[4, 0]),
        n("HardSigmoid", ["m"], ["hs"], name="hsig1"),
        n("Mul", ["hs", "m"], ["hm"], name="gate1"),
        n("AveragePool", ["hm"], ["o"], name="avgpool1", kernel_shape=[2], pads=[1, 0],
          count_include_pad=1),
        n("Elu", ["o"], ["p"], name="elu1"),
        n("Add", ["p", "cadd"], ["p2"], name="addc1"),
        n("HardSwish", ["p2"], ["p3"], name="hswish1"),
        n("Transpose", ["p3"], ["pt"], name="tr1", perm=[0, 2, 1]),
        n("MatMul", ["pt", "mm"], ["y"], name="matmul1"),
    ]
    inits += [_init("lo", np.array(-0.8)), _init("hi", np.array(0.9))]
    g = helper.make_graph(nodes, "zoo_time",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 4])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def zoo_head() -> onnx.ModelProto:
    """A pooled head: Pad, Conv, Exp / Sigmoid tables, Slice of the last frames, Reshape,
    Flatten, Gemm, Softmax (float output): x [1, 6, 12]."""
    rng = np.random.default_rng(11)

    def w(*s: int, scale: float = 0.4) -> np.ndarray:
        return (rng.standard_normal(s) * scale).astype(np.float32)

    n = helper.make_node
    inits = [
        _init("w1", w(6, 6, 3)), _init("b1", w(6)), _init("wg", w(24, 5)), _init("bg", w(5)),
        numpy_helper.from_array(np.array([0, 0, 2, 0, 0, 0], np.int64), "pads"),
        numpy_helper.from_array(np.array([-4], np.int64), "st"),
        numpy_helper.from_array(np.array([2**31 - 1], np.int64), "en"),
        numpy_helper.from_array(np.array([2], np.int64), "ax"),
        numpy_helper.from_array(np.array([1, 6, 4], np.int64), "shp"),
    ]
    nodes = [
        n("Pad", ["x", "pads"], ["xp"], name="pad1", mode="constant"),
        n("Conv", ["xp", "w1", "b1"], ["a"], name="conv1", kernel_shape=[3]),
        n("Sigmoid", ["a"], ["s"], name="sig1"),
        n("Mul", ["s", "x"], ["m"], name="mul1"),
        n("Slice", ["m", "st", "en", "ax"], ["sl"], name="slice1"),
        n("Reshape", ["sl", "shp"], ["r"], name="reshape1"),
        n("Flatten", ["r"], ["fl"], name="flatten1", axis=1),
        n("Gemm", ["fl", "wg", "bg"], ["gm"], name="gemm1"),
        n("Softmax", ["gm"], ["y"], name="softmax1", axis=-1),
    ]
    g = helper.make_graph(nodes, "zoo_head",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def models() -> Iterator[tuple[str, onnx.ModelProto, np.ndarray, np.ndarray, int]]:
    """(name, float model, calibration data, test input, chunk)."""
    chunks = {"tutorial_tcn": 3, "stream_tcn": 4, "kws2d": 2, "kws_gru": 4}
    for name, chunk in chunks.items():
        yield (name, onnx.load(ROOT / "models" / f"{name}.onnx"),
               np.load(ROOT / "models" / f"{name}.calib.npy"),
               np.load(ROOT / "models" / f"{name}.input.npy"), chunk)
    for name, chunk in (("tutorial_tcn", 3), ("stream_tcn", 4)):
        calib = np.load(FIXTURES / name / "calib.npy")
        yield f"esp-ppq/{name}", onnx.load(FIXTURES / name / "model.onnx"), calib, calib[:1], chunk
    for name, build, shape, chunk in (("zoo_time", zoo_time, (8, 16), 4),
                                      ("zoo_head", zoo_head, (6, 12), 4)):
        rng = np.random.default_rng(3)
        calib = rng.standard_normal((16, *shape)).astype(np.float32)
        yield name, build(), calib, rng.standard_normal((1, *shape)).astype(np.float32), chunk


def _sim_offline(graph, x: np.ndarray) -> dict[str, np.ndarray]:
    from espstream.export import quantize_input
    from espstream.sim import Simulator

    sim = Simulator(graph)
    name = graph.inputs[0].name
    return sim.run({name: quantize_input(graph, name, x)})


def _sim_stream(graph, x: np.ndarray) -> list[dict[str, np.ndarray]]:
    from espstream.quant import scheme
    from espstream.sim import Simulator, run_chunks

    sim = Simulator(graph, check_shapes=False)
    vi = graph.inputs[0]
    # the whole offline input in the runtime layout; run_chunks cuts it on the frame axis
    q = scheme.quantize(np.asarray(x, np.float64), vi.exponents[0], 8 if vi.dtype == np.int8
                        else 16, scheme.get_target(graph.target).rounding)
    perm = json.loads(graph.metadata["espstream.layout"])[vi.name]
    q = np.ascontiguousarray(np.transpose(q, perm))
    rt_axis = json.loads(graph.metadata["espstream.time_axes"])[vi.name]
    return run_chunks(sim, {vi.name: q}, axis=rt_axis)


def compute() -> dict[str, str]:
    from espstream.espdl import read, write
    from espstream.export import export_model
    from espstream.optimize import optimize_model
    from espstream.quant import calibrate_model, model_inputs
    from espstream.stream.streamify import streamify_model

    out: dict[str, str] = {}
    for name, model, calib, x, chunk in models():
        opt = optimize_model(model).model
        inputs = model_inputs(opt)
        data = _data(inputs, calib)
        for target in TARGETS:
            for bits in BITS:
                key = f"{name}/{target}/int{bits}"
                qdq = calibrate_model(opt, data, target=target, bits=bits).model
                out[f"{key}/qdq.onnx"] = _h(qdq.SerializeToString())
                off = export_model(qdq)
                out[f"{key}/offline.espdl"] = _h(off.data)
                out[f"{key}/offline.sim"] = _h_arrays(_sim_offline(off.graph, x))
                st = streamify_model(qdq, chunk).model
                out[f"{key}/stream.onnx"] = _h(st.SerializeToString())
                se = export_model(st)
                out[f"{key}/stream.espdl"] = _h(se.data)
                out[f"{key}/stream.sim"] = _h_arrays(_sim_stream(se.graph, x))
    for fx in sorted(FIXTURES.glob("*/*/*.espdl")):
        rel = fx.relative_to(FIXTURES).as_posix()
        raw = fx.read_bytes()
        g = read(raw)
        out[f"fixture/{rel}/rewrite"] = _h(write(g))
        if g.test_inputs:
            from espstream.sim import Simulator

            out[f"fixture/{rel}/sim"] = _h_arrays(
                Simulator(g, target=g.target or fx.parent.name)  # S3 files record none
                .run({k: v.data for k, v in g.test_inputs.items()}))
    return out


def _data(inputs, calib: np.ndarray):
    import tempfile

    from espstream.quant import read_calibration_data

    tmp = Path(tempfile.mkdtemp()) / "calib.npy"
    np.save(tmp, calib)
    return read_calibration_data(str(tmp), inputs)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    hashes = compute()
    if "--write" in sys.argv:
        PINS.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(hashes)} pins to {PINS}")
    else:
        print(json.dumps(hashes, indent=1, sort_keys=True))

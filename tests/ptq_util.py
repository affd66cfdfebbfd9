"""Small models and helpers the PTQ technique tests share (tests/test_quant_*.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from espstream.quant.data import CalibrationData, model_inputs

#: every espstream.quant.ptq technique off (calibrate's int8 defaults turn some on)
OFF = {"equalize": False, "bias_correction": False, "adaround": False, "exponent_search": False}


def only(name: str) -> dict[str, bool]:
    """Options with just `name` on."""
    return {**OFF, name: True}


def graph(nodes: list, inits: dict[str, np.ndarray], shape: list[int],
          out: str = "y") -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    return m


def ds_block(seed: int = 0, cin: int = 8, ch: int = 16, t: int = 24,
             spread: float = 1.0) -> onnx.ModelProto:
    """Conv -> Relu -> depthwise Conv -> Relu -> pointwise Conv; `spread`: conv1's rows are
    scaled by factors spanning `spread` and the depthwise rows by their inverses (the same
    function, its weights badly balanced across channels: what equalization undoes)."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(1.0 / spread, 1.0, ch) if spread != 1.0 else np.ones(ch)
    inits = {
        "w1": rng.standard_normal((ch, cin, 3)) * scales[:, None, None] / np.sqrt(3 * cin),
        "b1": 0.1 * rng.standard_normal(ch) * scales,
        "w2": rng.standard_normal((ch, 1, 3)) / scales[:, None, None] / np.sqrt(3),
        "b2": 0.1 * rng.standard_normal(ch),
        "w3": rng.standard_normal((4, ch, 1)) / np.sqrt(ch),
        "b3": 0.1 * rng.standard_normal(4),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3],
                         pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", kernel_shape=[3],
                         pads=[2, 2], dilations=[2], group=ch),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="pw", kernel_shape=[1]),
    ]
    return graph(nodes, inits, [1, cin, t])


def data(model: onnx.ModelProto, n: int, seed: int, offset: float = 0.0) -> CalibrationData:
    spec = model_inputs(model)[0]
    shape = [int(d) for d in spec.shape[1:]]
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32) + offset
    return _calib(model, x)


def _calib(model: onnx.ModelProto, x: np.ndarray) -> CalibrationData:
    import tempfile
    from pathlib import Path

    from espstream.quant import read_calibration_data

    path = Path(tempfile.mkdtemp()) / "calib.npy"
    np.save(path, x)
    return read_calibration_data(str(path), model_inputs(model))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def arrays(d: CalibrationData) -> np.ndarray:
    return np.concatenate([s[next(iter(s))] for s in d])


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))

"""Make tests/data/mixed-ppq/: ESP-PPQ 1.3.12 mixed-precision exports with test values.

    benchmarks/.venv-ppq/bin/python tools/mixed_fixture/make.py tests/data/mixed-ppq

A small 1-D conv model built with onnx.helper (fixed seed): Conv(8->16, k3, pad 1) + Relu,
Conv(16->16, k3, pad 1) + Relu, Conv(16->8, k1), and a residual Add of the first and second
conv outputs before the last conv. ESP-PPQ quantizes it with its default espdl setting,
dispatcher "allin", and `dispatching_table` sending the node(s) named in CASES to int16
(`get_target_platform(target, 16)`), the rest int8; 16 standard-normal calibration samples
(seed 0), `export_test_values=True`. Per case and target: `<case>/<target>.espdl` (with
ESP-PPQ's test input and its simulated output), `.info`, `.json`, and `model.onnx` /
`calib.npy` once. Run in ESP-PPQ's environment only; the tests never import it.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CASES = {
    "mid16": ["conv2"],  # the middle conv int16: int8 -> int16 -> int8 boundaries
    "first16": ["conv1"],  # the first conv int16: its output feeds an int8 conv and the Add
    "last16": ["conv3"],  # the last conv int16: the graph output is int16
}
TARGETS = ("esp32p4", "esp32s3")


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(20261207)
    c_in, c, t = 8, 16, 16

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    inits = [
        numpy_helper.from_array(w(c, c_in, 3), "w1"),
        numpy_helper.from_array(w(c, scale=0.1), "b1"),
        numpy_helper.from_array(w(c, c, 3, scale=0.2), "w2"),
        numpy_helper.from_array(w(c, scale=0.1), "b2"),
        numpy_helper.from_array(w(c_in, c, 1, scale=0.25), "w3"),
        numpy_helper.from_array(w(c_in, scale=0.1), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1],
                         kernel_shape=[3]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1],
                         kernel_shape=[3]),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("Add", ["r1", "r2"], ["s"], "add"),
        helper.make_node("Conv", ["s", "w3", "b3"], ["y"], "conv3", kernel_shape=[1]),
    ]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, c_in, t])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_in, t])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def main(out: Path) -> int:
    import torch
    from esp_ppq import QuantizationSettingFactory
    from esp_ppq.api import espdl_quantize_onnx, get_target_platform

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    model = build()
    onnx.save(model, str(out / "model.onnx"))
    calib = np.random.default_rng(0).standard_normal((16, 1, 8, 16)).astype(np.float32)
    np.save(out / "calib.npy", calib[:, 0])
    for case, names in CASES.items():
        for target in TARGETS:
            setting = QuantizationSettingFactory.espdl_setting()
            setting.dispatcher = "allin"
            for name in names:
                setting.dispatching_table.append(name, get_target_platform(target, 16))
            loader = [torch.from_numpy(c) for c in calib]
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "model.onnx"
                onnx.save(model, str(src))  # ESP-PPQ rewrites its input (onnxsim)
                dst = Path(tmp) / "out.espdl"
                torch.manual_seed(0)
                with contextlib.redirect_stdout(sys.stderr):
                    espdl_quantize_onnx(
                        onnx_import_file=str(src), espdl_export_file=str(dst),
                        calib_dataloader=loader, calib_steps=len(loader),
                        input_shape=[1, 8, 16], target=target, num_of_bits=8,
                        setting=setting, device="cpu", error_report=False,
                        export_test_values=True, export_config=True, verbose=0)
                (out / case).mkdir(exist_ok=True)
                for suffix in (".espdl", ".info", ".json"):
                    f = dst.with_suffix(suffix)
                    if f.exists():
                        shutil.copyfile(f, out / case / f"{target}{suffix}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/mixed-ppq")))

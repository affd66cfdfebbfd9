"""Build the small float models in this folder with onnx.helper and NumPy only.

    .venv/bin/python models/build.py [--out DIR]

For every model NAME it writes NAME.onnx (opset 13, IR version 8, so older onnxruntime runs it),
NAME.input.npy (one sample input, float32, standard normal) and NAME.calib.npy (32 calibration
samples, standard normal, another seed). Everything is deterministic: running the script twice
gives the same bytes.

The graphs are written the way PyTorch's exporter writes them, clutter included, so that the
`optimize` stage has real work on every model: each causal padding is an explicit `Pad` whose
pads come out of a Constant / ConstantOfShape / Concat / Reshape / Slice / Transpose / Reshape /
Cast chain (what `F.pad` exports to), BatchNormalization is a separate node, and every model
holds an Identity, an inference Dropout and a Conv followed by a per-channel constant Mul or Add.
Weights are scaled (He / LeCun) and BatchNorm statistics drawn near their trained values, so
activations stay within a few units and the models quantize to int8 sensibly.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8
CALIB_SAMPLES = 32
INT64_MAX = 2**63 - 1


def _param(scope: str) -> str:
    """Parameter names as PyTorch's state dict spells them: `blocks.0/dw` -> `blocks.0.dw`."""
    return scope.replace("/", ".")


class Builder:
    """Collects nodes and initializers; names follow PyTorch's exporter (`/scope/Op_output_0`).

    Weights come from `np.random.RandomState`, whose stream NumPy keeps frozen across versions,
    so the committed files can be rebuilt bit for bit.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    # -- plumbing ---------------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], name: str, **attrs: object) -> str:
        assert name not in self._names, name
        self._names.add(name)
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def constant(self, name: str, values: Sequence[int]) -> str:
        """An int64 Constant node, as the exporter writes the operands of shape arithmetic."""
        tensor = numpy_helper.from_array(np.asarray(values, dtype=np.int64), "")
        return self.node("Constant", [], name, value=tensor)

    def normal(self, shape: Sequence[int], std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    # -- layers -----------------------------------------------------------------------------
    def conv(
        self,
        x: str,
        scope: str,
        cin: int,
        cout: int,
        kernel: Sequence[int],
        *,
        group: int = 1,
        dilations: Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
        pads: Sequence[int] | None = None,
        gain: float = 2.0,
    ) -> str:
        """Conv with bias; weights N(0, gain / fan_in): gain 2 (He) before a ReLU, 1 otherwise."""
        rank = len(kernel)
        fan_in = cin // group * int(np.prod(kernel))
        w = self.init(
            f"{_param(scope)}.weight",
            self.normal([cout, cin // group, *kernel], np.sqrt(gain / fan_in)),
        )
        b = self.init(f"{_param(scope)}.bias", self.normal([cout], 0.05))
        return self.node(
            "Conv",
            [x, w, b],
            f"/{scope}/Conv",
            dilations=list(dilations or [1] * rank),
            group=group,
            kernel_shape=list(kernel),
            pads=list(pads or [0] * (2 * rank)),
            strides=list(strides or [1] * rank),
        )

    def batchnorm(self, x: str, scope: str, channels: int) -> str:
        """BatchNormalization with statistics like a trained layer's: mean ~ 0, var ~ 1."""
        gamma = (1.0 + self.normal([channels], 0.1)).astype(np.float32)
        beta = self.normal([channels], 0.1)
        mean = self.normal([channels], 0.1)
        var = np.exp(self.normal([channels], 0.2)).astype(np.float32)
        names = [
            self.init(f"{_param(scope)}.{k}", v)
            for k, v in (("weight", gamma), ("bias", beta), ("running_mean", mean),
                         ("running_var", var))
        ]
        return self.node(
            "BatchNormalization", [x, *names], f"/{scope}/BatchNormalization", epsilon=1e-5
        )

    def unary(self, op: str, x: str, name: str) -> str:
        return self.node(op, [x], name)

    def silu(self, x: str, scope: str) -> str:
        """SiLU the way the exporter writes it for opset 13: x * Sigmoid(x)."""
        s = self.node("Sigmoid", [x], f"/{scope}/Sigmoid")
        return self.node("Mul", [x, s], f"/{scope}/Mul")

    def channel_const(self, op: str, x: str, scope: str, channels: int, rank: int) -> str:
        """Mul (a layer scale near 1) or Add (an offset near 0) by a per-channel constant."""
        shape = [1, channels] + [1] * (rank - 2)
        if op == "Mul":
            value = (1.0 + self.normal(shape, 0.1)).astype(np.float32)
        else:
            value = self.normal(shape, 0.1)
        c = self.init(f"{_param(scope)}.{'scale' if op == 'Mul' else 'offset'}", value)
        return self.node(op, [x, c], f"/{scope}/{op}")

    def dropout(self, x: str, scope: str, ratio: float = 0.1) -> str:
        """Inference Dropout: a ratio input, no training_mode (so it is the identity)."""
        r = self.init(f"{_param(scope)}.ratio", np.asarray(ratio, dtype=np.float32))
        return self.node("Dropout", [x, r], f"/{scope}/Dropout")

    def torch_pad(self, x: str, scope: str, pad: Sequence[int], rank: int) -> str:
        """`F.pad(x, pad)` as PyTorch exports it at opset 13.

        `pad` is in PyTorch's order (last axis first, begin/end pairs). The chain appends zeros for
        the leading axes, reshapes to [-1, 2], reverses the rows, transposes and flattens, which
        gives ONNX's [begins..., ends...]; a Pad with mode constant consumes it.
        """
        p = f"/{scope}"
        n_zeros = self.constant(f"{p}/Constant", [2 * rank - len(pad)])
        given = self.constant(f"{p}/Constant_1", list(pad))
        zeros = self.node(
            "ConstantOfShape",
            [n_zeros],
            f"{p}/ConstantOfShape",
            value=numpy_helper.from_array(np.zeros([1], dtype=np.int64), ""),
        )
        cat = self.node("Concat", [given, zeros], f"{p}/Concat", axis=0)
        pairs = self.node(
            "Reshape", [cat, self.constant(f"{p}/Constant_2", [-1, 2])], f"{p}/Reshape"
        )
        axes = self.constant(f"{p}/Constant_3", [0])
        starts = self.constant(f"{p}/Constant_4", [-1])
        ends = self.constant(f"{p}/Constant_5", [-INT64_MAX])
        steps = self.constant(f"{p}/Constant_6", [-1])
        rev = self.node("Slice", [pairs, starts, ends, axes, steps], f"{p}/Slice")
        tr = self.node("Transpose", [rev], f"{p}/Transpose", perm=[1, 0])
        flat = self.node(
            "Reshape", [tr, self.constant(f"{p}/Constant_7", [-1])], f"{p}/Reshape_1"
        )
        pads = self.node("Cast", [flat], f"{p}/Cast", to=TensorProto.INT64)
        return self.node("Pad", [x, pads, ""], f"{p}/Pad", mode="constant")

    def slice_last(self, x: str, scope: str, frames: int, axis: int) -> str:
        """x[..., -frames:] along `axis`, with the exporter's Constant operands."""
        p = f"/{scope}" if scope else ""
        axes = self.constant(f"{p}/Constant_8", [axis])
        starts = self.constant(f"{p}/Constant_9", [-frames])
        ends = self.constant(f"{p}/Constant_10", [INT64_MAX])
        steps = self.constant(f"{p}/Constant_11", [1])
        return self.node("Slice", [x, starts, ends, axes, steps], f"{p}/Slice_1")

    def recurrent(
        self,
        kind: str,
        x: str,
        scope: str,
        cin: int,
        hidden: int,
        state: Sequence[str] = (),
        state_out: Sequence[str] = (),
    ) -> str:
        """nn.GRU / nn.LSTM (one layer, forward, batch 1) as PyTorch exports it: x [T, 1, cin] ->
        Y [T, 1, 1, hidden]. PyTorch's GRU is linear_before_reset=1. Weights U(-k, k), k =
        1/sqrt(hidden), as PyTorch initialises them. `state`: graph inputs fed as initial_h
        (and initial_c); `state_out`: the graph outputs Y_h (and Y_c) are written to."""
        gates = 3 if kind == "GRU" else 4
        k = 1.0 / np.sqrt(hidden)

        def uniform(shape: Sequence[int]) -> np.ndarray:
            return self.rng.uniform(-k, k, shape).astype(np.float32)

        p = _param(scope)
        w = self.init(f"onnx::{kind}_{p}.w", uniform([1, gates * hidden, cin]))
        r = self.init(f"onnx::{kind}_{p}.r", uniform([1, gates * hidden, hidden]))
        b = self.init(f"onnx::{kind}_{p}.b", uniform([1, 2 * gates * hidden]))
        name = f"/{scope}/{kind}"
        assert name not in self._names, name
        self._names.add(name)
        out = f"{name}_output_0"
        attrs: dict[str, object] = {"hidden_size": hidden}
        if kind == "GRU":
            attrs["linear_before_reset"] = 1
        self.nodes.append(helper.make_node(
            kind, [x, w, r, b, "", *state], [out, *state_out], name=name, **attrs))
        return out

    # -- model ------------------------------------------------------------------------------
    def model(
        self,
        name: str,
        x: str,
        in_shape: Sequence[int],
        y: str,
        out_shape: Sequence[int],
        doc: str,
        extra_inputs: Sequence[tuple[str, Sequence[int]]] = (),
        extra_outputs: Sequence[tuple[str, Sequence[int]]] = (),
    ) -> onnx.ModelProto:
        # The last node's output becomes the graph output `y`.
        last = self.nodes[-1]
        for node in self.nodes:
            for i, inp in enumerate(node.input):
                if inp == last.output[0]:
                    node.input[i] = y
        last.output[0] = y
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))
             for n, s in [(x, in_shape), *extra_inputs]],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))
             for n, s in [(y, out_shape), *extra_outputs]],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="espstream-models",
            producer_version="1",
            doc_string=doc,
        )
        onnx.checker.check_model(model, full_check=True)
        return model


# ---------------------------------------------------------------------------------------------
# The models. Each entry: builder function, input shape, weight seed (input/calib use seed+1/+2).


def tutorial_tcn(b: Builder) -> onnx.ModelProto:
    """ESP-DL's streaming tutorial TCN: [1, 16, 24] -> [1, 16]."""
    h = b.conv("x", "pre", 16, 32, [1], gain=1.0)
    skip = b.unary("Identity", h, "/pre/Identity")
    for i, dilation in enumerate((1, 2, 1)):
        # Block 2i is the DS conv, block 2i + 1 its SiLU (an nn.Sequential, as in the fixture).
        scope = f"blocks.{2 * i}"
        h = b.torch_pad(skip if i == 0 else h, scope, [2 * dilation, 0], rank=3)
        h = b.conv(h, f"{scope}/dw", 32, 32, [3], group=32, dilations=[dilation])
        h = b.unary("Relu", h, f"/{scope}/Relu")
        h = b.conv(h, f"{scope}/pw", 32, 32, [1])
        h = b.batchnorm(h, f"{scope}/bn", 32)
        h = b.unary("Relu", h, f"/{scope}/Relu_1")
        h = b.silu(h, f"blocks.{2 * i + 1}")
    h = b.node("Add", [skip, h], "/Add")
    h = b.torch_pad(h, "pool", [2, 0], rank=3)
    h = b.node(
        "AveragePool",
        [h],
        "/AveragePool",
        ceil_mode=0,
        count_include_pad=1,
        kernel_shape=[3],
        pads=[0, 0],
        strides=[1],
    )
    h = b.conv(h, "out", 32, 16, [1], gain=1.0)
    h = b.channel_const("Mul", h, "out", 16, rank=3)
    h = b.slice_last(h, "", 3, axis=2)
    h = b.node("Flatten", [h], "/Flatten", axis=1)
    h = b.dropout(h, "fc")
    w = b.init("fc.weight", b.normal([16, 48], np.sqrt(1.0 / 48)))
    bias = b.init("fc.bias", b.normal([16], 0.05))
    b.node("Gemm", [h, w, bias], "/fc/Gemm", alpha=1.0, beta=1.0, transB=1)
    return b.model("tutorial_tcn", "x", [1, 16, 24], "y", [1, 16], tutorial_tcn.__doc__ or "")


def stream_tcn(b: Builder) -> onnx.ModelProto:
    """Causal TCN, residual dilated blocks 1, 2, 4, 8: [1, 16, 64] -> [1, 16, 64]."""
    h = b.conv("x", "pre", 16, 32, [1], gain=1.0)
    for i, dilation in enumerate((1, 2, 4, 8)):
        scope = f"blocks.{i}"
        r = b.torch_pad(h, scope, [2 * dilation, 0], rank=3)
        r = b.conv(r, f"{scope}/dw", 32, 32, [3], group=32, dilations=[dilation])
        r = b.unary("Relu", r, f"/{scope}/Relu")
        # Residual branches are scaled down so the sum of four stays near unit range.
        r = b.conv(r, f"{scope}/pw", 32, 32, [1], gain=0.5)
        r = b.batchnorm(r, f"{scope}/bn", 32)
        r = b.unary("Relu", r, f"/{scope}/Relu_1")
        if i == 1:
            r = b.dropout(r, scope)
        if i == 2:
            r = b.unary("Identity", r, f"/{scope}/Identity")
        h = b.node("Add", [h, r], "/Add" if i == 0 else f"/Add_{i}")
    h = b.conv(h, "out", 32, 16, [1], gain=0.5)
    b.channel_const("Add", h, "out", 16, rank=3)
    return b.model("stream_tcn", "x", [1, 16, 64], "y", [1, 16, 64], stream_tcn.__doc__ or "")


def kws2d(b: Builder) -> onnx.ModelProto:
    """2-D keyword spotter, causal on T, strided on features: [1, 1, 32, 10] -> [1, 12, 32, 1]."""
    # F.pad(x, (1, 1, 2, 0)): features 1 | 1, time 2 | 0; then stride 2 along features: 10 -> 5.
    h = b.torch_pad("x", "conv1", [1, 1, 2, 0], rank=4)
    h = b.conv(h, "conv1", 1, 16, [3, 3], strides=[1, 2])
    h = b.batchnorm(h, "bn1", 16)
    h = b.unary("Relu", h, "/relu1/Relu")
    # Depthwise (3, 3) with dilation 2 on T: the causal 4 frames by a Pad, the symmetric feature
    # padding in the Conv's own pads (a Pad fold must merge both).
    h = b.torch_pad(h, "ds/dw", [0, 0, 4, 0], rank=4)
    h = b.conv(
        h, "ds/dw", 16, 16, [3, 3], group=16, dilations=[2, 1], pads=[0, 1, 0, 1], gain=1.0
    )
    h = b.conv(h, "ds/pw", 16, 16, [1, 1])
    h = b.batchnorm(h, "ds/bn", 16)
    h = b.unary("Relu", h, "/ds/Relu")
    h = b.unary("Identity", h, "/ds/Identity")
    # (1, 3) stride 2 along features: 5 -> 2.
    h = b.conv(h, "conv2", 16, 32, [1, 3], strides=[1, 2])
    h = b.channel_const("Mul", h, "conv2", 32, rank=4)
    h = b.unary("Relu", h, "/conv2/Relu")
    h = b.node(
        "AveragePool", [h], "/pool/AveragePool", kernel_shape=[1, 2], strides=[1, 2], pads=[0] * 4
    )
    h = b.dropout(h, "head")
    b.conv(h, "head", 32, 12, [1, 1], gain=1.0)
    return b.model("kws2d", "x", [1, 1, 32, 10], "y", [1, 12, 32, 1], kws2d.__doc__ or "")


def kws_gru(b: Builder) -> onnx.ModelProto:
    """Conv + GRU keyword spotter (a CRNN): [1, 10, 32] -> [1, 12, 32], one prediction a frame."""
    h = b.torch_pad("x", "conv", [2, 0], rank=3)
    h = b.conv(h, "conv", 10, 16, [3])
    h = b.batchnorm(h, "bn", 16)
    h = b.unary("Relu", h, "/relu/Relu")
    h = b.unary("Identity", h, "/relu/Identity")
    # [1, C, T] -> [T, 1, C], the layout nn.GRU(batch_first=False) takes.
    h = b.node("Transpose", [h], "/Transpose", perm=[2, 0, 1])
    h = b.recurrent("GRU", h, "gru", 16, 16)
    h = b.node("Squeeze", [h, b.constant("/gru/Constant", [1])], "/gru/Squeeze")
    h = b.node("Transpose", [h], "/Transpose_1", perm=[1, 2, 0])
    h = b.dropout(h, "head")
    h = b.conv(h, "head", 16, 12, [1], gain=4.0)
    b.channel_const("Mul", h, "head", 12, rank=3)
    return b.model("kws_gru", "x", [1, 10, 32], "y", [1, 12, 32], kws_gru.__doc__ or "")


VAD_HIDDEN = 16


def vad_lstm(b: Builder) -> onnx.ModelProto:
    """LSTM voice activity detector with explicit state, as VAD models ship it:
    x [1, 16, 32], h [1, 1, 16], c [1, 1, 16] -> y [1, 1, 32] (speech probability a frame),
    hn [1, 1, 16], cn [1, 1, 16] (the LSTM's last state, fed back as h, c on the next call)."""
    h = b.torch_pad("x", "conv", [2, 0], rank=3)
    h = b.conv(h, "conv", 16, 16, [3])
    h = b.batchnorm(h, "bn", 16)
    h = b.unary("Relu", h, "/relu/Relu")
    h = b.unary("Identity", h, "/relu/Identity")
    h = b.node("Transpose", [h], "/Transpose", perm=[2, 0, 1])
    h = b.recurrent("LSTM", h, "lstm", 16, VAD_HIDDEN, state=["h", "c"], state_out=["hn", "cn"])
    h = b.node("Squeeze", [h, b.constant("/lstm/Constant", [1])], "/lstm/Squeeze")
    h = b.node("Transpose", [h], "/Transpose_1", perm=[1, 2, 0])
    h = b.dropout(h, "head")
    h = b.conv(h, "head", VAD_HIDDEN, 1, [1], gain=24.0)
    h = b.channel_const("Mul", h, "head", 1, rank=3)
    b.unary("Sigmoid", h, "/Sigmoid")
    state = [1, 1, VAD_HIDDEN]
    return b.model("vad_lstm", "x", [1, 16, 32], "y", [1, 1, 32], vad_lstm.__doc__ or "",
                   extra_inputs=[("h", state), ("c", state)],
                   extra_outputs=[("hn", state), ("cn", state)])


MODELS: dict[str, tuple[Callable[[Builder], onnx.ModelProto], list[int], int]] = {
    "tutorial_tcn": (tutorial_tcn, [1, 16, 24], 100),
    "stream_tcn": (stream_tcn, [1, 16, 64], 200),
    "kws2d": (kws2d, [1, 1, 32, 10], 300),
    "kws_gru": (kws_gru, [1, 10, 32], 400),
    "vad_lstm": (vad_lstm, [1, 16, 32], 500),
}


def build(name: str) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """The model, its sample input and its calibration set."""
    fn, shape, seed = MODELS[name]
    model = fn(Builder(seed))
    sample = np.random.RandomState(seed + 1).standard_normal(shape).astype(np.float32)
    calib_shape = [CALIB_SAMPLES, *shape[1:]]
    calib = np.random.RandomState(seed + 2).standard_normal(calib_shape).astype(np.float32)
    return model, sample, calib


def write_all(out: Path, names: Sequence[str] | None = None) -> list[Path]:
    """Build the models and write NAME.onnx, NAME.input.npy, NAME.calib.npy into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or MODELS:
        model, sample, calib = build(name)
        paths = [out / f"{name}.onnx", out / f"{name}.input.npy", out / f"{name}.calib.npy"]
        paths[0].write_bytes(model.SerializeToString(deterministic=True))
        np.save(paths[1], sample)
        np.save(paths[2], calib)
        written += paths
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder"
    )
    parser.add_argument("models", nargs="*", metavar="NAME", help=f"default: all of {list(MODELS)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.models if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    for path in write_all(args.out, args.models or None):
        print(path)


if __name__ == "__main__":
    main()

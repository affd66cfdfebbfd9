"""Small temporal ONNX graphs for the streamify / verify tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class G:
    """A [1, C, T] (or [1, C, T, F]) graph under construction; methods return tensor names."""

    def __init__(self, channels: int = 3, frames: int | str = 24, seed: int = 0,
                 features: int | None = None, opset: int = 13):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.ch: dict[str, int] = {"x": channels}
        self.k = 0
        self.opset = opset
        shape = [1, channels, frames] + ([features] if features else [])
        self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def init(self, base: str, arr: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(self, op: str, inputs: list[str], ch: int | None = None, n_out: int = 1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_"), **attrs))
        for o in outs:
            self.ch[o] = ch if ch is not None else self.ch.get(inputs[0], 0)
        return outs[0] if n_out == 1 else outs

    # -- layers ---------------------------------------------------------------------------
    def conv(self, x: str, cout: int | None = None, k: int = 3, d: int = 1, s: int = 1,
             group: int = 1, left: int | None = None, right: int = 0, bias: bool = True,
             fk: int | None = None, fpad: int = 0) -> str:
        cin = self.ch[x]
        cout = cout or cin
        if group == -1:
            group = cin
            cout = cin
        kshape = [k] + ([fk] if fk else [])
        w = self.rng.standard_normal([cout, cin // group, *kshape]).astype(np.float32)
        w /= np.sqrt(cin // group * k)
        ins = [x, self.init("w", w)]
        if bias:
            ins.append(self.init("b", 0.1 * self.rng.standard_normal(cout).astype(np.float32)))
        left = (k - 1) * d if left is None else left
        if fk:
            pads, dil, st = [left, fpad, right, fpad], [d, 1], [s, 1]
        else:
            pads, dil, st = [left, right], [d], [s]
        return self.op("Conv", ins, cout, kernel_shape=kshape, dilations=dil, strides=st,
                       pads=pads, group=group)

    def conv_transpose(self, x: str, k: int = 3, s: int = 2, left: int = 0, right: int = 0):
        cin = self.ch[x]
        w = (self.rng.standard_normal([cin, cin, k]) / np.sqrt(cin * k)).astype(np.float32)
        b = (0.1 * self.rng.standard_normal(cin)).astype(np.float32)
        return self.op("ConvTranspose", [x, self.init("w", w), self.init("b", b)], cin,
                       kernel_shape=[k], strides=[s], pads=[left, right])

    def pool(self, x: str, kind: str = "MaxPool", k: int = 3, s: int = 1,
             left: int | None = None, right: int = 0, include_pad: int = 1) -> str:
        left = k - 1 if left is None else left
        attrs = {"kernel_shape": [k], "strides": [s], "pads": [left, right]}
        if kind == "AveragePool":
            attrs["count_include_pad"] = include_pad
        return self.op(kind, [x], **attrs)

    def pad(self, x: str, left: int, right: int = 0, rank: int = 3, axis: int = 2) -> str:
        pads = [0] * (2 * rank)
        pads[axis], pads[axis + rank] = left, right
        return self.op("Pad", [x, self.init("pads", np.array(pads, np.int64))], mode="constant")

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def act(self, x: str, op: str) -> str:
        return self.op(op, [x])

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b])

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b])

    def concat(self, a: str, b: str, axis: int = 1) -> str:
        return self.op("Concat", [a, b], self.ch[a] + self.ch[b], axis=axis)

    def gru(self, x: str, hidden: int = 4, lstm: bool = False) -> str:
        """[1, C, T] -> Transpose -> GRU/LSTM -> Squeeze -> Transpose -> [1, H, T]."""
        cin = self.ch[x]
        gates = 4 if lstm else 3
        t = self.op("Transpose", [x], perm=[2, 0, 1])
        sc = 1 / np.sqrt(hidden)
        w = self.init("W", (sc * self.rng.standard_normal([1, gates * hidden, cin])).astype(
            np.float32))
        r = self.init("R", (sc * self.rng.standard_normal([1, gates * hidden, hidden])).astype(
            np.float32))
        b = self.init("B", (0.1 * self.rng.standard_normal([1, 2 * gates * hidden])).astype(
            np.float32))
        y = self.op("LSTM" if lstm else "GRU", [t, w, r, b], hidden, hidden_size=hidden)
        sq = self.op("Squeeze", [y, self.init("ax", np.array([1], np.int64))], hidden)
        return self.op("Transpose", [sq], hidden, perm=[1, 2, 0])

    def last_frames_head(self, x: str, m: int, n_out: int = 5) -> str:
        """Slice the last m frames, Flatten, Gemm: ESP-DL's streaming tutorial head."""
        c = self.ch[x]
        sl = self.op("Slice", [x, self.init("st", np.array([-m], np.int64)),
                               self.init("en", np.array([2**63 - 1], np.int64)),
                               self.init("ax", np.array([2], np.int64))])
        fl = self.op("Flatten", [sl], axis=1)
        w = (self.rng.standard_normal([n_out, c * m]) / np.sqrt(c * m)).astype(np.float32)
        return self.op("Gemm", [fl, self.init("fw", w), self.init("fb", np.zeros(n_out,
                       np.float32))], n_out, transB=1)

    def model(self, *outputs: str) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "g", self.inputs, [], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)],
                              ir_version=8)
        inferred = onnx.shape_inference.infer_shapes(m)
        known = {v.name: v for v in inferred.graph.value_info}
        m.graph.output.extend(known[o] for o in outputs)
        onnx.checker.check_model(m)
        return m


def add_qdq(model: onnx.ModelProto, exponent: int = -5) -> onnx.ModelProto:
    """A hand-made fake-quant model: every activation feeding a node passes through
    QuantizeLinear -> DequantizeLinear with scale 2^exponent, int8, zero point 0."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name for i in g.initializer}
    scale = numpy_helper.from_array(np.array(2.0**exponent, np.float32), "qscale")
    zp = numpy_helper.from_array(np.array(0, np.int8), "qzp")
    g.initializer.extend([scale, zp])
    acts = {i.name for i in g.input}
    for n in g.node:
        acts.update(n.output)
    new_nodes = []
    for t in sorted(acts):
        new_nodes.append(helper.make_node("QuantizeLinear", [t, "qscale", "qzp"], [t + "_q"]))
        new_nodes.append(helper.make_node("DequantizeLinear", [t + "_q", "qscale", "qzp"],
                                          [t + "_dq"]))
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in acts and i not in inits:
                n.input[k] = i + "_dq"
    for o in g.output:  # outputs leave through their DQ as well
        o.name = o.name + "_dq"
    nodes = list(g.node) + new_nodes
    del g.node[:]
    g.node.extend(nodes)
    import onnx_graphsurgeon as gs

    gg = gs.import_onnx(m)
    gg.cleanup().toposort()
    out = gs.export_onnx(gg)
    out.ir_version = model.ir_version
    onnx.checker.check_model(out)
    return out

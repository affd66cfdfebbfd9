"""The evaluation zoo (issue 16, item 1): models nobody tunes on, built by script, fixed seeds.

Seven architecture families, two members each (different sizes, weight seeds and input
statistics): plain TCN, residual TCN, depthwise-separable KWS, 2-D CNN, conv + GRU, LayerNorm
head, pooled head. Input statistics: `normal` (standard normal), `logmel` (log band energies of
synthetic audio: tones, chirps and noise, framed and FFT'd, not standardized), `skewed`
(lognormal, all positive), `heavy` (Student t, 2.5 degrees of freedom).

Split once (rule): within each family, a coin flip with seed 16 sends one member to the
development half and the other to the held-out half, so each half holds every family once.
Defaults may be chosen on `dev` only; `held` is only reported. The split is printed by
`python benchmarks/zoo.py` and must not be changed after figures were reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _G:
    """A tiny graph builder: each method appends nodes and returns its output name."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def _name(self, p: str) -> str:
        self.n += 1
        return f"{p}{self.n}"

    def const(self, a: np.ndarray, p: str = "w") -> str:
        name = self._name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def node(self, op: str, ins: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int | tuple = 3, dil: int = 1,
             groups: int = 1, dims: int = 1, gain: float = 1.0) -> str:
        ks = (k,) * dims if isinstance(k, int) else k
        fan = cin // groups * int(np.prod(ks))
        w = gain * self.rng.standard_normal((cout, cin // groups, *ks)) * np.sqrt(2.0 / fan)
        b = 0.1 * self.rng.standard_normal(cout)
        pads = [dil * (kk - 1) // 2 for kk in ks] * 2
        return self.node("Conv", [x, self.const(w.astype(np.float32)),
                                  self.const(b.astype(np.float32), "b")],
                         kernel_shape=list(ks), dilations=[dil] * dims, group=groups, pads=pads)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def gemm(self, x: str, cin: int, cout: int) -> str:
        w = self.rng.standard_normal((cout, cin)) / np.sqrt(cin)
        b = 0.1 * self.rng.standard_normal(cout)
        return self.node("Gemm", [x, self.const(w.astype(np.float32)),
                                  self.const(b.astype(np.float32), "b")], transB=1)

    def model(self, x_shape: list[int], y: str) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "zoo",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
                              self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        m = onnx.shape_inference.infer_shapes(m)
        onnx.checker.check_model(m, full_check=True)
        return m


# ---- families --------------------------------------------------------------------------------


def tcn_plain(seed: int, cin: int, ch: int, layers: int, T: int) -> onnx.ModelProto:
    g = _G(seed)
    x, c = "x", cin
    for i in range(layers):
        x, c = g.relu(g.conv(x, c, ch, 3, dil=2**i)), ch
    return g.model([1, cin, T], g.conv(x, ch, 8, 1))


def tcn_res(seed: int, cin: int, ch: int, layers: int, T: int) -> onnx.ModelProto:
    g = _G(seed)
    x = g.conv("x", cin, ch, 1)
    for i in range(layers):
        h = g.relu(g.conv(x, ch, ch, 3, dil=2**i))
        x = g.node("Add", [x, g.conv(h, ch, ch, 1, gain=0.5)])
    return g.model([1, cin, T], g.conv(g.relu(x), ch, 8, 1))


def ds_kws(seed: int, cin: int, ch: int, blocks: int, T: int) -> onnx.ModelProto:
    g = _G(seed)
    x = g.relu(g.conv("x", cin, ch, 3))
    for _ in range(blocks):
        x = g.relu(g.conv(x, ch, ch, 3, groups=ch))
        x = g.relu(g.conv(x, ch, ch, 1))
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    return g.model([1, cin, T], g.gemm(x, ch, 12))


def cnn2d(seed: int, cin: int, ch: int, H: int, W: int) -> onnx.ModelProto:
    g = _G(seed)
    x = g.relu(g.conv("x", cin, ch, 3, dims=2))
    x = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.relu(g.conv(x, ch, 2 * ch, 3, dims=2))
    x = g.relu(g.conv(x, 2 * ch, 2 * ch, 3, dims=2))
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    return g.model([1, cin, H, W], g.gemm(x, 2 * ch, 10))


def conv_gru(seed: int, cin: int, ch: int, hidden: int, T: int) -> onnx.ModelProto:
    g = _G(seed)
    x = g.relu(g.conv("x", cin, ch, 3))
    x = g.node("Transpose", [x], perm=[2, 0, 1])  # [T, 1, ch]
    w = g.rng.standard_normal((1, 3 * hidden, ch)) / np.sqrt(ch)
    r = g.rng.standard_normal((1, 3 * hidden, hidden)) / np.sqrt(hidden)
    b = 0.1 * g.rng.standard_normal((1, 6 * hidden))
    y = g._name("gru")
    g.nodes.append(helper.make_node(
        "GRU", [x, g.const(w.astype(np.float32)), g.const(r.astype(np.float32)),
                g.const(b.astype(np.float32), "b")], [y], name=y, hidden_size=hidden,
        linear_before_reset=1))
    return g.model([1, cin, T], y)


def ln_head(seed: int, cin: int, ch: int, out: int, T: int) -> onnx.ModelProto:
    g = _G(seed)
    x = g.relu(g.conv("x", cin, ch, 3))
    x = g.conv(x, ch, ch, 3, dil=2)
    x = g.node("Transpose", [x], perm=[0, 2, 1])  # [1, T, ch]
    gamma = (1 + 0.2 * g.rng.standard_normal(ch)).astype(np.float32)
    beta = (0.1 * g.rng.standard_normal(ch)).astype(np.float32)
    x = g.node("LayerNormalization", [x, g.const(gamma), g.const(beta, "b")], axis=-1)
    w = (g.rng.standard_normal((ch, out)) / np.sqrt(ch)).astype(np.float32)
    return g.model([1, cin, T], g.node("MatMul", [x, g.const(w)]))


def pooled_head(seed: int, cin: int, ch: int, layers: int, T: int) -> onnx.ModelProto:
    g = _G(seed)
    x, c = "x", cin
    for i in range(layers):
        x, c = g.relu(g.conv(x, c, ch, 5, dil=1 + i)), ch
    x = g.node("AveragePool", [x], kernel_shape=[4], strides=[4])
    x = g.node("Flatten", [g.node("GlobalMaxPool", [x])])
    return g.model([1, cin, T], g.gemm(g.relu(g.gemm(x, ch, ch)), ch, 6))


# ---- input statistics ------------------------------------------------------------------------


def _logmel(rng: np.random.Generator, n: int, bands: int, frames: int) -> np.ndarray:
    sr, hop, nfft = 16000, 160, 512
    t = np.arange(hop * (frames - 1) + nfft) / sr
    edges = np.geomspace(60, sr / 2, bands + 1)
    freqs = np.fft.rfftfreq(nfft, 1 / sr)
    band = np.clip(np.searchsorted(edges, freqs) - 1, 0, bands - 1)
    window = np.hanning(nfft)
    out = np.empty((n, bands, frames), np.float32)
    for i in range(n):
        sig = rng.normal(0, rng.uniform(0.001, 0.05), t.size)
        for _ in range(rng.integers(1, 4)):
            f0, f1 = rng.uniform(100, 4000, 2)
            phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * t[-1]))
            sig += rng.uniform(0.05, 0.5) * np.sin(phase) * (rng.uniform() < 0.8)
        idx = np.arange(nfft)[None, :] + hop * np.arange(frames)[:, None]
        spec = np.abs(np.fft.rfft(sig[idx] * window, axis=1)) ** 2  # [frames, bins]
        e = np.zeros((frames, bands))
        np.add.at(e.T, band, spec.T)
        out[i] = np.log(e.T + 1e-6)
    return out


def make_inputs(kind: str, shape: list[int], n: int, seed: int) -> np.ndarray:
    """n samples shaped `shape` ([1, ...]) of one input statistic, float32, [n, *shape[1:]]."""
    rng = np.random.default_rng(seed)
    s = [n, *shape[1:]]
    if kind == "normal":
        x = rng.standard_normal(s)
    elif kind == "skewed":
        x = rng.lognormal(0.0, 1.0, s)
    elif kind == "heavy":
        x = rng.standard_t(2.5, s)
    elif kind == "logmel":
        if len(s) == 3:
            x = _logmel(rng, n, s[1], s[2])
        else:  # [n, c, H, W]: H bands by W frames per channel
            x = _logmel(rng, n * s[1], s[2], s[3]).reshape(s)
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(x, dtype=np.float32)


# ---- the zoo ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    build: Callable[[], onnx.ModelProto]
    inputs: str  # input statistic
    half: str = ""  # "dev" or "held", set by the split


_MEMBERS: list[tuple[str, str, Callable[[], onnx.ModelProto], str]] = [
    ("tcn_plain_a", "tcn_plain", lambda: tcn_plain(101, 16, 32, 4, 64), "normal"),
    ("tcn_plain_b", "tcn_plain", lambda: tcn_plain(102, 40, 48, 5, 96), "logmel"),
    ("tcn_res_a", "tcn_res", lambda: tcn_res(201, 40, 32, 4, 64), "logmel"),
    ("tcn_res_b", "tcn_res", lambda: tcn_res(202, 16, 64, 3, 80), "heavy"),
    ("ds_kws_a", "ds_kws", lambda: ds_kws(301, 40, 64, 3, 49), "logmel"),
    ("ds_kws_b", "ds_kws", lambda: ds_kws(302, 20, 48, 4, 64), "skewed"),
    ("cnn2d_a", "cnn2d", lambda: cnn2d(401, 1, 8, 40, 32), "logmel"),
    ("cnn2d_b", "cnn2d", lambda: cnn2d(402, 3, 12, 24, 24), "heavy"),
    ("conv_gru_a", "conv_gru", lambda: conv_gru(501, 40, 32, 32, 32), "logmel"),
    ("conv_gru_b", "conv_gru", lambda: conv_gru(502, 16, 24, 48, 40), "normal"),
    ("ln_head_a", "ln_head", lambda: ln_head(601, 16, 32, 8, 48), "normal"),
    ("ln_head_b", "ln_head", lambda: ln_head(602, 40, 48, 12, 64), "logmel"),
    ("pooled_head_a", "pooled_head", lambda: pooled_head(701, 24, 32, 3, 64), "skewed"),
    ("pooled_head_b", "pooled_head", lambda: pooled_head(702, 16, 48, 4, 96), "normal"),
]


def zoo() -> list[ZooModel]:
    """Every member with its half (the split rule in the module docstring)."""
    rng = np.random.default_rng(16)
    out: list[ZooModel] = []
    families = list(dict.fromkeys(f for _, f, _, _ in _MEMBERS))
    for fam in families:
        members = [m for m in _MEMBERS if m[1] == fam]
        first_dev = bool(rng.integers(0, 2))
        for j, (name, f, build, inputs) in enumerate(members):
            half = "dev" if (j == 0) == first_dev else "held"
            out.append(ZooModel(name, f, build, inputs, half))
    return out


if __name__ == "__main__":
    for m in zoo():
        model = m.build()
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = make_inputs(m.inputs, shape, 2, 0)
        print(f"{m.half:5s} {m.name:14s} {m.family:12s} {m.inputs:7s} input {shape} "
              f"range [{x.min():.2f}, {x.max():.2f}] nodes {len(model.graph.node)}")

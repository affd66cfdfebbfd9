"""The integer simulator: bit-exact on ESP-PPQ's fixtures, and operator by operator against
values worked out here independently (Python integers, exact fractions, explicit rounding).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from espstream import kernels as fast
from espstream.errors import UserError
from espstream.espdl import read
from espstream.intgraph import IntGraph, Node, Tensor, ValueInfo
from espstream.kernels import reference
from espstream.sim import Simulator

DATA = Path(__file__).parent / "data" / "esp-ppq"
MODELS = ("tutorial_tcn", "stream_tcn")
TARGETS = ("esp32p4", "esp32s3", "c")
BACKENDS = {"cython": fast, "reference": reference}

_graphs: dict[Path, IntGraph] = {}


def fixture(model: str, target: str, kind: str = "offline") -> IntGraph:
    path = DATA / model / target / f"{kind}.espdl"
    if path not in _graphs:
        g = read(path.read_bytes())
        # ESP-PPQ records no target; an S3 file (blocked, per-tensor) must be told it
        assert g.target == (None if target == "esp32s3" else target)
        g.target = target
        _graphs[path] = g
    return _graphs[path]


def given_inputs(g: IntGraph) -> dict[str, np.ndarray]:
    return {name: t.data for name, t in g.test_inputs.items()}


# ---- the acid test: ESP-PPQ's own test values, bit for bit ----------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", MODELS)
def test_fixture_offline_bit_exact(model: str, target: str, backend: str) -> None:
    g = fixture(model, target)
    assert g.target == target
    out = Simulator(g, BACKENDS[backend]).run(given_inputs(g))
    assert set(out) == set(g.test_outputs) == {"y"}
    for name, want in g.test_outputs.items():
        assert out[name].dtype == want.data.dtype
        assert out[name].shape == want.data.shape
        np.testing.assert_array_equal(out[name], want.data)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", MODELS)
def test_fixture_backends_agree_on_every_tensor(model: str, target: str) -> None:
    g = fixture(model, target)
    a = Simulator(g, fast).trace(given_inputs(g))
    b = Simulator(g, reference).trace(given_inputs(g))
    assert a.keys() == b.keys()
    assert len(a) == len(g.nodes) + 1  # every node output plus the input
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("target", TARGETS)
def test_fixture_rounding_is_observable(target: str) -> None:
    """stream_tcn's test output can tell half-up from half-even: simulating a file with the
    other target's rounding breaks about half of its 1024 values (so the match above is
    evidence for the per-target rounding, not luck)."""
    g = fixture("stream_tcn", target)
    other = "c" if target == "esp32p4" else "esp32p4"
    out = Simulator(g, fast, target=other).run(given_inputs(g))["y"]
    assert np.count_nonzero(out != g.test_outputs["y"].data) > 400


def test_trace_dequantize_and_intermediates() -> None:
    g = fixture("tutorial_tcn", "c")
    sim = Simulator(g)
    values = sim.trace(given_inputs(g))
    assert list(values)[0] == "x"
    assert values["/AveragePool_output_0"].shape == (1, 24, 32)
    assert values["/Slice_1_output_0"].shape == (1, 3, 16)
    np.testing.assert_array_equal(values["/Slice_1_output_0"], values["/out/Conv_output_0"][:, -3:])
    np.testing.assert_array_equal(
        values["PPQ_Variable_0"], values["/Slice_1_output_0"].transpose(0, 2, 1)
    )
    assert sim.dequantize("y", np.array([64]))[0] == 64 * 2.0**-8


# ---- hand-made graphs: helpers -----------------------------------------------------------------


def rnd(v: Fraction, mode: str) -> int:
    """Round an exact rational: ties up (toward +inf) or to even."""
    f = math.floor(v)
    rest = v - f
    if rest > Fraction(1, 2):
        return f + 1
    if rest < Fraction(1, 2):
        return f
    return f + 1 if mode == "half_up" or f % 2 else f


def sat(v: int, bits: int = 8) -> int:
    return max(-(2 ** (bits - 1)), min(2 ** (bits - 1) - 1, v))


MODE = {"esp32p4": "half_even", "esp32s3": "half_up", "c": "half_up"}


def make_graph(
    nodes: list[Node],
    inits: list[Tensor],
    acts: dict[str, tuple],
    inputs: list[str],
    outputs: list[str],
    target: str = "c",
) -> IntGraph:
    """acts: name -> (dtype, shape, exponent)."""
    vis = {
        n: ValueInfo(n, np.dtype(d), list(s) if s else None, [e]) for n, (d, s, e) in acts.items()
    }
    return IntGraph(
        name="t",
        nodes=nodes,
        initializers={t.name: t for t in inits},
        inputs=[vis[n] for n in inputs],
        outputs=[vis[n] for n in outputs],
        value_infos=vis,
        target=target,
    )


def run1(g: IntGraph, x: np.ndarray, backend: str = "cython") -> np.ndarray:
    out = Simulator(g, BACKENDS[backend]).run({g.inputs[0].name: x})
    return out[g.outputs[0].name]


def conv_graph(x_shape, w_file, w_exps, bias, b_exps, e_in, e_out, attrs, target="c"):
    inits = [Tensor("w", w_file, list(w_exps))]
    ins = ["x", "w"]
    if bias is not None:
        inits.append(Tensor("b", bias, list(b_exps)))
        ins.append("b")
    out_shape = None
    return make_graph(
        [Node("Conv", "conv", ins, ["y"], dict(attrs))],
        inits,
        {"x": (np.int8, x_shape, e_in), "y": (np.int8, out_shape, e_out)},
        ["x"],
        ["y"],
        target,
    )


RNG = np.random.default_rng(1234)


# ---- Conv ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", TARGETS)
def test_conv1d_pads_dilation_bias_relu_per_channel(target: str, backend: str) -> None:
    T, C, N, K, dil, pads = 9, 3, 4, 3, 2, (4, 1)
    x = RNG.integers(-128, 128, (1, T, C)).astype(np.int8)
    w = RNG.integers(-128, 128, (K, C, N)).astype(np.int8)  # file order [W, C, N]
    w_exps = [-7, -6, -7, -8] if target == "esp32p4" else [-7]
    e_in, e_out = -5, -4
    we = np.broadcast_to(np.array(w_exps), (N,))
    bias = RNG.integers(-3000, 3000, N).astype(np.int32)
    g = conv_graph(
        [1, T, C], w, w_exps, bias, [int(e_in + e) for e in we], e_in, e_out,
        {"activation": "Relu", "dilations": [dil], "group": 1, "kernel_shape": [K],
         "pads": list(pads), "strides": [1]},
        target,
    )  # fmt: skip
    got = run1(g, x, backend)
    t_out = T + sum(pads) - dil * (K - 1)
    want = np.zeros((1, t_out, N), np.int64)
    for t in range(t_out):
        for n in range(N):
            acc = int(bias[n])
            for k in range(K):
                src = t + k * dil - pads[0]
                if 0 <= src < T:
                    acc += sum(int(x[0, src, c]) * int(w[k, c, n]) for c in range(C))
            shift = e_out - e_in - int(we[n])
            v = rnd(Fraction(acc, 2**shift), MODE[target])
            want[0, t, n] = sat(max(v, 0))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode_target", ["esp32p4", "c"])
def test_conv_tie_rounds_per_target(mode_target: str) -> None:
    """1x1 conv, one input 1 channel: acc = x * w, shift 2: x*w = 2 -> 0.5, 6 -> 1.5,
    -2 -> -0.5, -6 -> -1.5."""
    x = np.array([[[2], [6], [-2], [-6], [10]]], np.int8)
    w = np.array([[[1]]], np.int8)
    g = conv_graph([1, 5, 1], w, [-2], None, None, 0, 0,
                   {"activation": "Linear", "group": 1, "kernel_shape": [1], "pads": [0, 0]},
                   mode_target)  # fmt: skip
    got = run1(g, x)[0, :, 0].tolist()
    if mode_target == "esp32p4":
        assert got == [0, 2, 0, -2, 2]  # 0.5->0 1.5->2 -0.5->0 -1.5->-2 2.5->2
    else:
        assert got == [1, 2, 0, -1, 3]  # ties toward +inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_stride_dilation_layout(backend: str) -> None:
    H, W, C, N = 7, 8, 2, 3
    kh, kw, (sh, sw), (dh, dw) = 3, 2, (2, 1), (1, 2)
    pads = (1, 0, 2, 1)  # top, bottom, left, right
    x = RNG.integers(-128, 128, (1, H, W, C)).astype(np.int8)
    w = RNG.integers(-128, 128, (kh, kw, C, N)).astype(np.int8)  # file order [H, W, C, N]
    e_in, e_w, e_out = -4, -7, -3
    bias = RNG.integers(-500, 500, N).astype(np.int32)
    g = conv_graph(
        [1, H, W, C], w, [e_w], bias, [e_in + e_w], e_in, e_out,
        {"activation": "Linear", "dilations": [dh, dw], "group": 1, "kernel_shape": [kh, kw],
         # the file holds ONNX order [top, left, bottom, right]
         "pads": [pads[0], pads[2], pads[1], pads[3]], "strides": [sh, sw]},
    )  # fmt: skip
    got = run1(g, x, backend)
    oh = (H + pads[0] + pads[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (W + pads[2] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    assert got.shape == (1, oh, ow, N)
    for i in range(oh):
        for j in range(ow):
            for n in range(N):
                acc = int(bias[n])
                for a in range(kh):
                    for b in range(kw):
                        r, c = i * sh + a * dh - pads[0], j * sw + b * dw - pads[2]
                        if 0 <= r < H and 0 <= c < W:
                            acc += sum(int(x[0, r, c, ch]) * int(w[a, b, ch, n]) for ch in range(C))
                assert got[0, i, j, n] == sat(
                    rnd(Fraction(acc, 2 ** (e_out - e_in - e_w)), "half_up")
                )


@pytest.mark.parametrize("nd", [1, 2])
def test_depthwise_layout(nd: int) -> None:
    C, K = 4, 3
    shape = [1, 5, C] if nd == 1 else [1, 4, 5, C]
    x = RNG.integers(-128, 128, shape).astype(np.int8)
    wshape = (K, C, 1) if nd == 1 else (2, K, C, 1)  # [W, N, 1] / [H, W, N, 1]
    w = RNG.integers(-128, 128, wshape).astype(np.int8)
    pads = [K - 1, 0] if nd == 1 else [1, K - 1, 0, 0]  # 2-D: [top, left, bottom, right]
    g = conv_graph(shape, w, [-6], None, None, -3, -2,
                   {"activation": "Linear", "group": C, "kernel_shape": list(wshape[:-2]),
                    "pads": pads})  # fmt: skip
    got = run1(g, x)
    xs = x[0] if nd == 2 else x[0][None]
    ws = w if nd == 2 else w[None]
    kh = ws.shape[0]
    for i in range(xs.shape[0]):
        for j in range(xs.shape[1]):
            for c in range(C):
                acc = 0
                for a in range(kh):
                    for b in range(K):
                        r = i + a - (pads[0] if nd == 2 else 0)
                        s = j + b - (K - 1)
                        if 0 <= r < xs.shape[0] and 0 <= s < xs.shape[1]:
                            acc += int(xs[r, s, c]) * int(ws[a, b, c, 0])
                v = sat(rnd(Fraction(acc, 2**7), "half_up"))  # shift -2 + 3 + 6
                assert (got[0, i, j, c] if nd == 2 else got[0, j, c]) == v


@pytest.mark.parametrize("target", TARGETS)
def test_gemm(target: str) -> None:
    C, N = 5, 3
    x = RNG.integers(-128, 128, (1, C)).astype(np.int8)
    w = RNG.integers(-128, 128, (1, 1, C, N)).astype(np.int8)
    bias = RNG.integers(-2000, 2000, N).astype(np.int32)
    g = make_graph(
        [Node("Gemm", "fc", ["x", "w", "b"], ["y"],
              {"activation": "Linear", "alpha": 1.0, "beta": 1.0, "transB": 0})],
        [Tensor("w", w, [-8]), Tensor("b", bias, [-13])],
        {"x": (np.int8, [1, C], -5), "y": (np.int8, [1, N], -6)},
        ["x"], ["y"], target,
    )  # fmt: skip
    got = run1(g, x)
    for n in range(N):
        acc = int(bias[n]) + sum(int(x[0, c]) * int(w[0, 0, c, n]) for c in range(C))
        assert got[0, n] == sat(rnd(Fraction(acc, 2**7), MODE[target]))


def test_conv_bias_exponent_mismatch_is_refused() -> None:
    w = np.ones((1, 2, 2), np.int8)
    g = conv_graph([1, 3, 2], w, [-7], np.zeros(2, np.int32), [-11], -5, -4,
                   {"group": 1, "kernel_shape": [1], "pads": [0, 0]})  # fmt: skip
    with pytest.raises(UserError, match="bias 'b' channel 0 has exponent -11.*-12"):
        Simulator(g)


# ---- elementwise -------------------------------------------------------------------------------


def test_add_saturates_and_refuses_other_exponents() -> None:
    acts = {"a": (np.int8, [1, 4], -3), "b": (np.int8, [1, 4], -3), "y": (np.int8, [1, 4], -3)}
    g = make_graph([Node("Add", "add", ["a", "b"], ["y"])], [], acts, ["a", "b"], ["y"])
    a = np.array([[100, -100, 5, 127]], np.int8)
    b = np.array([[100, -100, -9, 0]], np.int8)
    np.testing.assert_array_equal(Simulator(g).run({"a": a, "b": b})["y"], [[127, -128, -4, 127]])
    acts["b"] = (np.int8, [1, 4], -4)
    with pytest.raises(UserError, match="input 'b' has exponent -4 but the output has -3"):
        Simulator(make_graph([Node("Add", "add", ["a", "b"], ["y"])], [], acts, ["a", "b"], ["y"]))


def test_add_mismatched_frames_is_a_clear_error() -> None:
    acts = {"a": (np.int8, None, 0), "b": (np.int8, None, 0), "y": (np.int8, None, 0)}
    g = make_graph([Node("Add", "add", ["a", "b"], ["y"])], [], acts, ["a", "b"], ["y"])
    sim = Simulator(g)
    with pytest.raises(
        UserError, match=r"node 'add' \(Add\): input shapes \[1, 6, 2\] and \[1, 4, 2\]"
    ):
        sim.run({"a": np.zeros((1, 6, 2), np.int8), "b": np.zeros((1, 4, 2), np.int8)})


@pytest.mark.parametrize("target", TARGETS)
def test_mul(target: str) -> None:
    acts = {"a": (np.int8, [6], -4), "b": (np.int8, [6], -5), "y": (np.int8, [6], -6)}
    g = make_graph([Node("Mul", "mul", ["a", "b"], ["y"])], [], acts, ["a", "b"], ["y"], target)
    a = np.array([3, -3, 5, 127, -128, 1], np.int8)
    b = np.array([1, 1, 5, 127, 127, -1], np.int8)
    got = Simulator(g).run({"a": a, "b": b})["y"]
    want = [
        sat(rnd(Fraction(int(p) * int(q), 2**3), MODE[target])) for p, q in zip(a, b, strict=True)
    ]
    assert got.tolist() == want


@pytest.mark.parametrize("target", TARGETS)
def test_requantize(target: str) -> None:
    acts = {"x": (np.int8, [8], -6), "y": (np.int8, [8], -5)}
    g = make_graph(
        [Node("RequantizeLinear", "rq", ["x", "s", "z"], ["y"])],
        [Tensor("s", np.array(2.0, np.float32), [0]), Tensor("z", np.array(0, np.int8), [0])],
        acts, ["x"], ["y"], target,
    )  # fmt: skip
    x = np.array([1, 3, 5, -1, -3, 127, -128, 0], np.int8)
    got = run1(g, x).tolist()
    assert got == [sat(rnd(Fraction(int(v), 2), MODE[target])) for v in x]
    assert got[:5] == ([0, 2, 2, 0, -2] if target == "esp32p4" else [1, 2, 3, 0, -1])


def test_lut_indexed_by_q_plus_128() -> None:
    table = (np.arange(256) - 128)[::-1].astype(np.int8)  # table[i] = 127 - i
    acts = {"x": (np.int8, [4], -3), "y": (np.int8, [4], -3)}
    g = make_graph(
        [Node("Swish", "sw", ["x"], ["y"], {"lut": "tab", "quant_type": "S8"})],
        [Tensor("tab", table, [-3])], acts, ["x"], ["y"],
    )  # fmt: skip
    x = np.array([-128, -1, 0, 127], np.int8)
    assert run1(g, x).tolist() == [127, 0, -1, -128]


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "Swish"])
def test_elementwise_without_table(op: str) -> None:
    f = {
        "Sigmoid": lambda v: 1 / (1 + math.exp(-v)),
        "Tanh": math.tanh,
        "Swish": lambda v: v / (1 + math.exp(-v)),
    }[op]
    acts = {"x": (np.int8, [256], -4), "y": (np.int8, [256], -7)}
    g = make_graph([Node(op, "f", ["x"], ["y"])], [], acts, ["x"], ["y"])
    x = np.arange(-128, 128).astype(np.int8)
    want = [sat(math.floor(f(int(q) / 16) * 128 + 0.5)) for q in x]
    assert run1(g, x).tolist() == want


# ---- pools -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_avgpool_full_area_divisor(target: str) -> None:
    x = np.array([[[3], [4], [-5], [9], [1]]], np.int8)
    acts = {"x": (np.int8, [1, 5, 1], -2), "y": (np.int8, None, -3)}
    g = make_graph(
        [Node("AveragePool", "ap", ["x"], ["y"],
              {"kernel_shape": [3], "pads": [2, 0], "strides": [1], "count_include_pad": 0})],
        [], acts, ["x"], ["y"], target,
    )  # fmt: skip
    got = run1(g, x)[0, :, 0].tolist()
    xs = [0, 0, 3, 4, -5, 9, 1]
    # e_in - e_out = 1: y = 2 * sum / 3 (the padded taps count in the divisor)
    want = [sat(rnd(Fraction(2 * sum(xs[t : t + 3]), 3), MODE[target])) for t in range(5)]
    assert got == want == [2, 5, 1, 5, 3]


def test_global_average_pool_and_maxpool() -> None:
    x = RNG.integers(-128, 128, (1, 3, 4, 2)).astype(np.int8)
    acts = {"x": (np.int8, [1, 3, 4, 2], -3), "y": (np.int8, None, -3)}
    g = make_graph([Node("GlobalAveragePool", "g", ["x"], ["y"])], [], acts, ["x"], ["y"])
    got = run1(g, x)
    assert got.shape == (1, 1, 1, 2)
    for c in range(2):
        assert got[0, 0, 0, c] == sat(rnd(Fraction(int(x[0, :, :, c].sum()), 12), "half_up"))
    g = make_graph(
        [Node("MaxPool", "m", ["x"], ["y"],
              # [top, left, bottom, right]
              {"kernel_shape": [2, 2], "pads": [1, 1, 0, 0], "strides": [2, 2]})],
        [], acts, ["x"], ["y"],
    )  # fmt: skip
    got = run1(g, x)
    assert got.shape == (1, 2, 2, 2)
    for i in range(2):
        for j in range(2):
            rows = [r for r in (2 * i - 1, 2 * i) if 0 <= r < 3]
            cols = [c for c in (2 * j - 1, 2 * j) if 0 <= c < 4]
            np.testing.assert_array_equal(got[0, i, j], x[0][np.ix_(rows, cols)].max(axis=(0, 1)))


# ---- data movement ---------------------------------------------------------------------------


def _i64(name: str, v: list[int]) -> Tensor:
    return Tensor(name, np.array(v, np.int64), [0])


def test_data_movement_chain() -> None:
    x = np.arange(6 * 4).reshape(1, 6, 4).astype(np.int8)
    e = -5
    acts = {n: (np.int8, None, e) for n in "xabcdefg"}
    acts["x"] = (np.int8, [1, 6, 4], e)
    g = make_graph(
        [
            Node("Slice", "s", ["x", "st", "en", "ax"], ["a"]),
            Node("Transpose", "t", ["a"], ["b"], {"perm": [0, 2, 1]}),
            Node("Flatten", "f", ["b"], ["c"], {"axis": 1}),
            Node("Reshape", "r", ["c", "shape"], ["d"]),
            Node("Unsqueeze", "u", ["d", "uax"], ["e"]),
            Node("Squeeze", "q", ["e", "uax"], ["f"]),
            Node("Concat", "cat", ["f", "f"], ["g"], {"axis": 1}),
        ],
        [_i64("st", [-3]), _i64("en", [2**63 - 1]), _i64("ax", [1]), _i64("shape", [0, -1, 3]),
         _i64("uax", [3])],
        acts, ["x"], ["g"],
    )  # fmt: skip
    vals = Simulator(g).trace({"x": x})
    np.testing.assert_array_equal(vals["a"], x[:, 3:6])
    np.testing.assert_array_equal(vals["b"], x[:, 3:6].transpose(0, 2, 1))
    np.testing.assert_array_equal(vals["c"], x[:, 3:6].transpose(0, 2, 1).reshape(1, 12))
    assert vals["d"].shape == (1, 4, 3)
    assert vals["e"].shape == (1, 4, 3, 1)
    assert vals["f"].shape == (1, 4, 3)
    np.testing.assert_array_equal(vals["g"], np.concatenate([vals["f"]] * 2, axis=1))


def test_slice_with_steps_and_negative_axes() -> None:
    x = np.arange(10, dtype=np.int8).reshape(1, 10, 1)
    acts = {"x": (np.int8, [1, 10, 1], 0), "y": (np.int8, None, 0)}
    g = make_graph(
        [Node("Slice", "s", ["x", "st", "en", "ax", "sp"], ["y"])],
        [_i64("st", [8]), _i64("en", [-20]), _i64("ax", [-2]), _i64("sp", [-3])],
        acts, ["x"], ["y"],
    )  # fmt: skip
    assert run1(g, x)[0, :, 0].tolist() == [8, 5, 2]


# ---- errors -------------------------------------------------------------------------------------


def test_unknown_operator_is_named() -> None:
    acts = {"x": (np.int8, [4], 0), "y": (np.int8, [4], 0)}
    g = make_graph([Node("Frobnicate", "odd", ["x"], ["y"])], [], acts, ["x"], ["y"])
    with pytest.raises(UserError, match="node 'odd': operator 'Frobnicate' is not supported"):
        Simulator(g)


def test_bad_inputs_are_user_errors() -> None:
    g = fixture("stream_tcn", "c")
    sim = Simulator(g)
    with pytest.raises(UserError, match="no value given for input 'x'"):
        sim.run({})
    with pytest.raises(UserError, match="must be int8"):
        sim.run({"x": np.zeros((1, 64, 16), np.float32)})
    with pytest.raises(UserError, match=r"must have shape \[1, 64, 16\]"):
        sim.run({"x": np.zeros((1, 16, 64), np.int8)})
    with pytest.raises(UserError, match="no input named 'z'"):
        sim.run({"x": np.zeros((1, 64, 16), np.int8), "z": np.zeros(1)})


def test_unknown_target_needs_an_argument() -> None:
    acts = {"x": (np.int8, [4], 0), "y": (np.int8, [4], 0)}
    g = make_graph([Node("Identity", "i", ["x"], ["y"])], [], acts, ["x"], ["y"], target=None)
    with pytest.raises(UserError, match="does not record its target.*no filters"):
        Simulator(g)
    x = np.array([1, 2, 3, 4], np.int8)
    np.testing.assert_array_equal(Simulator(g, target="c").run({"x": x})["y"], x)


def test_pad_split_gather() -> None:
    x = np.arange(1, 7, dtype=np.int8).reshape(1, 3, 2)
    acts = {n: (np.int8, None, -2) for n in ("p", "e", "s1", "s2", "g")}
    acts["x"] = (np.int8, [1, 3, 2], -2)
    g = make_graph(
        [
            Node("Pad", "pad", ["x", "pads", "cval"], ["p"], {"mode": "constant"}),
            Node("Pad", "edge", ["x", "pads"], ["e"], {"mode": "edge"}),
            Node("Split", "split", ["p", "sizes"], ["s1", "s2"], {"axis": 1}),
            Node("Gather", "gather", ["x", "idx"], ["g"], {"axis": 1}),
        ],
        [_i64("pads", [0, 2, 0, 0, 0, 1]), Tensor("cval", np.array(-7, np.int8), [-2]),
         _i64("sizes", [1, 4]), _i64("idx", [2, 0])],
        acts, ["x"], ["g"],
    )  # fmt: skip
    v = Simulator(g).trace({"x": x})
    assert v["p"][0].tolist() == [[-7, -7, -7], [-7, -7, -7], [1, 2, -7], [3, 4, -7], [5, 6, -7]]
    assert v["e"][0].tolist() == [[1, 2, 2], [1, 2, 2], [1, 2, 2], [3, 4, 4], [5, 6, 6]]
    assert v["s1"].shape == (1, 1, 3) and v["s2"].shape == (1, 4, 3)
    assert v["g"][0].tolist() == [[5, 6], [1, 2]]
    # ESP-DL adds an index to the address unchecked: a negative one is refused, not wrapped
    g.initializers["idx"] = _i64("idx", [-1, 0])
    with pytest.raises(UserError, match=r"indices -1\.\.0 outside \[0, 3\)"):
        Simulator(g).trace({"x": x})


def test_softmax_is_float_and_clip16() -> None:
    acts = {"x": (np.int16, [1, 3], -4), "c": (np.int16, None, -4), "y": (np.float32, None, 0)}
    g = make_graph(
        [Node("Clip", "clip", ["x", "lo", "hi"], ["c"]),
         Node("Softmax", "sm", ["c"], ["y"], {"axis": -1})],
        [Tensor("lo", np.array(-16, np.int16), [-4]), Tensor("hi", np.array(32, np.int16), [-4])],
        acts, ["x"], ["y"],
    )  # fmt: skip
    v = Simulator(g).trace({"x": np.array([[-100, 16, 100]], np.int16)})
    assert v["c"].tolist() == [[-16, 16, 32]]
    z = np.exp(np.array([-1.0, 1.0, 2.0]))
    np.testing.assert_allclose(v["y"][0], z / z.sum(), rtol=1e-6)
    assert v["y"].dtype == np.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("model", "kind"), [("tutorial_tcn", "offline"),
                                             ("stream_tcn", "offline"),
                                             ("espdl-tutorial", "streaming_model")])
def test_run_equals_trace(model: str, kind: str, backend: str) -> None:
    """`run` takes a path prepared once per model (the names each node reads bound in
    advance); `trace` checks name by name. Over several calls (streaming: the caches carried
    by both, reset between) both give the same outputs, and the outputs of earlier calls are
    not changed by later ones."""
    # (ESP-PPQ's streaming files cannot run: tests/test_sim_stream.py; ESP-DL's tutorial can)
    if model == "espdl-tutorial":
        g = read((DATA.parent / model / "esp32p4" / f"{kind}.espdl").read_bytes())
        g.target = "esp32p4"
    else:
        g = fixture(model, "esp32p4", kind)
    a, b = Simulator(g, BACKENDS[backend]), Simulator(g, BACKENDS[backend])
    rng = np.random.default_rng(0)
    vi = g.inputs[0]
    kept = []
    for _ in range(4):
        x = rng.integers(-128, 128, vi.shape).astype(vi.dtype)
        got, want = a.run({vi.name: x}), b.trace({vi.name: x})
        assert set(got) == {o.name for o in g.outputs}
        for name, v in got.items():
            np.testing.assert_array_equal(v, want[name])
        kept.append((got, {k: v.copy() for k, v in got.items()}))
    for got, copy in kept:
        for name in got:
            np.testing.assert_array_equal(got[name], copy[name])


def test_run_reports_what_trace_reports() -> None:
    """A node reading a name nothing produces, or a graph output no node writes: `run` gives
    `trace`'s error, and a node whose function returns fewer outputs than it names fails as
    trace does when the missing one is read."""
    acts = {"x": (np.int8, [4], 0), "y": (np.int8, [4], 0), "z": (np.int8, [4], 0)}
    g = make_graph([Node("Identity", "a", ["ghost"], ["y"])], [], acts, ["x"], ["y"])
    x = {"x": np.zeros(4, np.int8)}
    for call in (Simulator(g).run, Simulator(g).trace):
        with pytest.raises(UserError, match="reads 'ghost', which nothing produces"):
            call(x)
    g = make_graph([Node("Identity", "i", ["x"], ["y"])], [], acts, ["x"], ["z"])
    for call in (Simulator(g).run, Simulator(g).trace):
        with pytest.raises(UserError, match="no node produces output 'z'"):
            call(x)
    g = make_graph([Node("Identity", "i", ["x"], ["y", "z"]), Node("Identity", "a", ["z"],
                    ["w"])], [], {**acts, "w": (np.int8, [4], 0)}, ["x"], ["w"])
    for call in (Simulator(g).run, Simulator(g).trace):
        with pytest.raises(UserError, match="reads 'z', which nothing produces"):
            call(x)

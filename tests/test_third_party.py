"""Third-party models shipped inside the installed `onnx` package (issue 7).

1. `light/`: nine ImageNet classifiers (opset 9) go through the real CLI: optimize
   --upgrade-opset (its output checked against the shipped reference output), calibrate
   --random, export --test-random and verify; each model either passes every stage or is refused
   by a named stage with one clear line naming what is unsupported. Their weights are constant
   fills (every ConstantOfShape fills 0.02), so all channels are alike and the classifiers'
   outputs are uniform: these models test structure, operators and refusals, not numerics.
2. `pytorch-converted/`: every convolution and pooling case. `optimize` (after the opset
   upgrade) must reproduce the shipped output; the calibrated model run by the integer simulator
   must stay within an error bound derived from its quantization steps (see `error_bound`).
   What ESP-DL cannot run (3-D, grouped non-depthwise convolution) must be refused by
   `export` with a message naming it; ConvTranspose runs as InsertZeros + Conv.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_util import assert_user_error, espstream
from onnx import helper, numpy_helper
from onnx_builders import make_model

from espstream.errors import UserError
from espstream.export import export_model
from espstream.modelio import parse_model
from espstream.optimize import optimize_model
from espstream.quant import calibrate_model, model_inputs, read_calibration_data
from espstream.verify import quant_step
from espstream.verify_int8 import Int8Runner, int8_vs_fakequant

DATA = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"
LIGHT = DATA / "light"
PYTORCH = DATA / "pytorch-converted"


def ort_run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def load_pb(path: Path) -> np.ndarray:
    return numpy_helper.to_array(onnx.load_tensor(str(path)))


# ---- 1. light models through the CLI ---------------------------------------------------------

# What happens to each model, as measured (see the module docstring of each stage):
#   ("ok",) - optimize, calibrate, export and verify all pass;
#   (stage, fragments) - `stage` refuses with exit 2 and one line holding every fragment.
# Unsupported operator types are listed in full (the optimized models hold exactly these types
# outside calibrate's supported list): LRN (AlexNet, ZFNet, GoogLeNet). DenseNet's
# BatchNormalizations after a Concat (no convolution before them to fold into) become a Mul and
# an Add in optimize (batchnorm_to_affine), merged with the Mul and Add that follow them
# (merge_affine). SqueezeNet's opset-9 Softmax
# over [1, 1000, 1, 1] is upgraded to Flatten -> Softmax -> Reshape: a Softmax whose output
# feeds another operator, which ESP-DL cannot run (it computes Softmax last, in float).
# ResNet's and ShuffleNet's residual Sums become Adds in optimize (sum_to_add); ShuffleNet's
# grouped 1x1 convolutions (group 4, not depthwise) have no ESP-DL kernel.
LIGHT_EXPECTED: dict[str, tuple] = {
    "squeezenet": ("export", ["Softmax", "feeds other operators"]),
    "shufflenet": ("export", ["Conv 'n4': group 4", "ESP-DL supports group 1 or depthwise"]),
    "inception_v1": ("calibrate", ["operator LRN is not supported by calibrate"]),
    "inception_v2": ("ok",),
    "resnet50": ("ok",),
    "densenet121": ("ok",),
    "bvlc_alexnet": ("calibrate", ["operator LRN is not supported by calibrate"]),
    "zfnet512": ("calibrate", ["operator LRN is not supported by calibrate"]),
    "vgg19": ("ok",),
}
# The default run takes the small ones (a few seconds each); constant folding expands the
# others' generated weights to 50-400 MB (VGG-19's fc6 alone is 392 MB).
LIGHT_FAST = ("squeezenet", "shufflenet", "inception_v1", "inception_v2")


def _light_params():
    for name in LIGHT_EXPECTED:
        marks = () if name in LIGHT_FAST else (pytest.mark.slow,)
        yield pytest.param(name, id=name, marks=marks)


def test_light_model_list_is_complete():
    shipped = sorted(p.name[len("light_") : -len(".onnx")] for p in LIGHT.glob("light_*.onnx"))
    assert shipped == sorted(LIGHT_EXPECTED)


def reference_input(model_path: Path) -> dict[str, np.ndarray]:
    """The input onnx's backend test runner feeds the light models to make their reference
    outputs (`generate_dummy_data(random=False)`): arange(n) / n in the input's shape."""
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    feeds = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        n = int(np.prod(shape))
        feeds[vi.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", list(_light_params()))
def test_light_model(name, tmp_path):
    src = LIGHT / f"light_{name}.onnx"
    expected = LIGHT_EXPECTED[name]
    opt, qdq, espdl = tmp_path / "opt.onnx", tmp_path / "qdq.onnx", tmp_path / "m.espdl"

    # Opset 9 is refused unless upgraded explicitly; the refusal names the option.
    assert_user_error(espstream("optimize", src, "-o", opt), "opset 9", "--upgrade-opset")
    assert not opt.exists()
    p = espstream("optimize", src, "--upgrade-opset", "-o", opt)
    assert p.returncode == 0, p.stderr.decode()
    assert "upgraded from opset 9 to 13 with onnx.version_converter" in p.stderr.decode()
    feeds = reference_input(src)
    (got,) = ort_run(opt, {k: v for k, v in feeds.items()})
    want = load_pb(LIGHT / f"light_{name}_output_0.pb")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    p = espstream("calibrate", opt, "-q", "--random", "2", "--report-samples", "0", "-o", qdq)
    if expected[0] == "calibrate":
        assert_user_error(p, *expected[1])
        assert not qdq.exists()
        return
    assert p.returncode == 0, p.stderr.decode()

    p = espstream("export", qdq, "--test-random", "-o", espdl)
    if expected[0] == "export":
        assert_user_error(p, *expected[1])
        assert not espdl.exists()
        return
    assert p.returncode == 0, p.stderr.decode()
    assert expected == ("ok",)

    # verify: the file's embedded test values (simulator at export time, as Model::test()) ...
    p = espstream("verify", espdl)
    assert p.returncode == 0, p.stderr.decode()
    # ... and the integer simulator against the fake-quant model in onnxruntime. esp32p4 (the
    # default target) rounds ties to even like onnxruntime, so they agree exactly.
    model = onnx.load(str(qdq))
    agree = int8_vs_fakequant(model, [feeds])
    assert agree.checks and all(c.max_lsb == 0 and c.ok for c in agree.checks), agree.to_json()
    # The classifiers' logits are all equal (constant weights). Those ending in a float
    # Softmax must give the shipped uniform output; DenseNet ends in a quantized Conv, so its
    # outputs are within one step of the output's quantization.
    (out,) = Int8Runner(model, name).run(feeds).values()
    if [n.op_type for n in model.graph.node][-1] == "Softmax":
        np.testing.assert_allclose(out.reshape(want.shape), want, rtol=1e-5)
    else:
        (oname,) = [o.name for o in model.graph.output]
        np.testing.assert_allclose(out.reshape(want.shape), want, rtol=0,
                                   atol=quant_step(model, oname))


def test_calibrate_names_every_unsupported_operator_type(tmp_path):
    """A model with two unsupported types (ResNet's Sum, AlexNet's LRN): both are named in one
    error, with a count, not only the first one met."""
    nodes = [
        helper.make_node("Sum", ["x", "x"], ["s"], name="sum0"),
        helper.make_node("LRN", ["s"], ["l"], name="lrn0", size=3),
        helper.make_node("Sum", ["l", "x"], ["y"], name="sum1"),
    ]
    model = make_model(nodes, {"x": [1, 4, 5, 5]}, {"y": [1, 4, 5, 5]})
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)
    with pytest.raises(UserError) as e:
        calibrate_model(model, samples(model, x, tmp_path), report_samples=0)
    msg = str(e.value)
    assert "operators not supported by calibrate" in msg
    assert "Sum (node 'sum0' and 1 more)" in msg
    assert "LRN (node 'lrn0')" in msg


# ---- 2. pytorch-converted convolution and pooling cases ---------------------------------------

CASES = sorted(
    p.name for p in PYTORCH.iterdir()
    if p.is_dir() and any(k in p.name for k in ("Conv", "AvgPool", "MaxPool"))
)
# What ESP-DL has no kernel for: refused by export (lower) with these fragments.
REFUSED = {
    **{c: "3-D convolution; ESP-DL has 1-D and 2-D" for c in CASES if c.startswith("test_Conv3d")},
    **{c: "3-D pooling; ESP-DL has 1-D and 2-D" for c in CASES if "Pool3d" in c},
    "test_Conv1d_groups": "ESP-DL supports group 1 or depthwise",
    "test_Conv2d_groups": "ESP-DL supports group 1 or depthwise",
    "test_Conv2d_groups_thnn": "ESP-DL supports group 1 or depthwise",
    "test_Conv2d_depthwise_with_multiplier": "ESP-DL supports group 1 or depthwise",
    "test_MaxPool1d_stride_padding_dilation": "dilation is not supported by ESP-DL",
    "test_MaxPool2d_stride_padding_dilation": "dilation is not supported by ESP-DL",
}


def test_pytorch_case_list():
    """The cases this file covers (a new onnx release adding one shows up here)."""
    kinds = {c.split("_")[1] for c in CASES}
    assert kinds == {"AvgPool1d", "AvgPool2d", "AvgPool3d", "Conv1d", "Conv2d", "Conv3d",
                     "ConvTranspose2d", "MaxPool1d", "MaxPool2d", "MaxPool3d"}
    assert len(CASES) >= 40


def _case_params():
    for c in CASES:
        kind = "refused" if c in REFUSED else "int8"
        yield pytest.param(c, id=f"{c}-{kind}")


@functools.cache
def case_data(case: str) -> tuple[bytes, np.ndarray, np.ndarray]:
    d = PYTORCH / case
    x = load_pb(d / "test_data_set_0" / "input_0.pb")
    y = load_pb(d / "test_data_set_0" / "output_0.pb")
    return (d / "model.onnx").read_bytes(), x, y


def batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same single-operator graph with batch 1 (ESP-DL runs batch 1); the shipped batch-2
    data is then fed one sample at a time."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    del m.graph.value_info[:]
    return m


def error_bound(case: str, fm: onnx.ModelProto, cal, x: np.ndarray) -> np.ndarray:
    """Largest |integer result - float reference| the quantization itself allows, per output
    element, from the exponents the calibrated model uses.

    Calibration is `minmax` on the case's own input, so no activation or weight clips and every
    error is a rounding error: input step s_in, weight step s_w[c] (per output channel), bias
    step s_in * s_w[c], output step s_out; each rounding is off by at most half a step.
    - Conv: x_q w_q - x w = x_q (w_q - w) + w (x_q - x), so for output channel c
      |err| <= s_w[c]/2 * sum_window |x_q| + s_in/2 * sum|W_c| + s_in s_w[c]/2 + s_out/2,
      with sum_window |x_q| <= the same convolution of |x| + s_in/2 with all-ones weights
      (zero padding adds nothing); the int32 accumulator is exact and ESP-DL rounds once into
      the output.
    - AveragePool: the mean of rounded inputs is within s_in/2 of the true mean, computed in
      float32 and rounded once: s_in/2 + s_out/2. MaxPool is 1-Lipschitz in the max norm and
      keeps its input's exponent: s_in/2 (+ s_out/2, a margin).
    A wrong shift, layout, padding or window is off by far more than this (tens to hundreds of
    LSBs), and the bound stays under 15% of the output's range (checked): 1-11 output LSBs here, the
    most where the input's range is ten times the output's (Conv1d_pad1size1).
    """
    inp = fm.graph.input[0].name
    outp = fm.graph.output[0].name
    s_in, s_out = 2.0 ** cal.exponents[inp], 2.0 ** cal.exponents[outp]
    if "Conv" not in case:
        return np.full((1,) * x.ndim, s_in / 2 + s_out / 2)
    kinds = ("Conv", "ConvTranspose")
    conv = next(n for n in fm.graph.node if n.op_type in kinds)
    w = numpy_helper.to_array(next(t for t in fm.graph.initializer if t.name == conv.input[1]))
    # output channels: axis 0 of a Conv's weight, axis 1 of a ConvTranspose's (group 1 here)
    n_axis = 1 if conv.op_type == "ConvTranspose" else 0
    n_out = w.shape[n_axis]
    (e_w,) = cal.weight_exponents.values()  # the one Conv's
    s_w = np.broadcast_to(2.0 ** np.asarray(e_w, np.float64), (n_out,))
    ones = onnx.ModelProto()
    ones.CopyFrom(fm)
    node = next(n for n in ones.graph.node if n.op_type in kinds)
    del node.input[2:]
    del ones.graph.initializer[:]
    ones.graph.initializer.append(numpy_helper.from_array(np.ones_like(w), node.input[1]))
    absx = (np.abs(x) + s_in / 2).astype(np.float32)
    window = np.concatenate([ort_run(ones, {inp: absx[i : i + 1]})[0] for i in range(len(x))])
    chan = (1, -1) + (1,) * (x.ndim - 2)
    abs_w = np.moveaxis(np.abs(w.astype(np.float64)), n_axis, 0).reshape(n_out, -1).sum(1)
    return (s_w.reshape(chan) / 2 * window.astype(np.float64)
            + (s_in / 2 * abs_w + s_in * s_w / 2).reshape(chan) + s_out / 2)


@pytest.mark.parametrize("case", list(_case_params()))
def test_pytorch_case(case, tmp_path):
    raw, x, y = case_data(case)
    model = parse_model(raw, case, upgrade_opset=True)

    # optimize keeps the expected output, on the shipped batch as it is
    res = optimize_model(model)
    (got,) = ort_run(res.model, {res.model.graph.input[0].name: x})
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)

    fm = batch_one(res.model)
    cal = calibrate_model(fm, samples(fm, x, tmp_path), method="minmax", report_samples=0)
    if case in REFUSED:
        try:
            export_model(cal.model)
            refusal = "(exported)"
        except UserError as e:
            refusal = str(e)
        assert REFUSED[case] in refusal
        return
    export_model(cal.model)  # exports

    inp, outp = fm.graph.input[0].name, fm.graph.output[0].name
    runner = Int8Runner(cal.model, case)
    q = np.concatenate([runner.run({inp: x[i : i + 1]})[outp] for i in range(len(x))])
    bound = error_bound(case, fm, cal, x)
    s_out = 2.0 ** cal.exponents[outp]
    err = np.abs(q.astype(np.float64) - y)
    info = (f"max error {err.max() / s_out:.2f} LSB, bound {bound.max() / s_out:.2f} LSB, "
            f"bound / max|y| {bound.max() / np.abs(y).max():.3f}")
    assert float(bound.max()) < 0.15 * float(np.abs(y).max()), "bound too loose to mean anything"
    excess = err - (bound + 1e-5 * np.abs(y))  # + float32 rounding of the reference
    assert (excess <= 0).all(), info


def samples(model: onnx.ModelProto, x: np.ndarray, folder: Path):
    """`x` as calibration data (a .npy [N, ...] against a batch-1 input: N samples)."""
    path = folder / "calib.npy"
    np.save(path, x)
    return read_calibration_data(str(path), model_inputs(model))


def test_calibrate_quantizes_a_scalar_constant(tmp_path):
    """Mul by a 0-d constant: calibrate crashed on it (onnx-graphsurgeon was handed a NumPy
    scalar), found through the MaxPool cases; fixed in calibrate since."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "c"], ["y"])]
    model = make_model(nodes, {"x": [1, 3, 8]}, {"y": [1, 3, 8]},
                       {"c": np.array(1.0, np.float32)})
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    cal = calibrate_model(model, samples(model, x, tmp_path), report_samples=0)
    assert any(n.op_type == "DequantizeLinear" for n in cal.model.graph.node)

"""export: .espdl files with test values, C++ coefficient files, file sizes against ESP-PPQ,
and the CLI contract (target check, refusals, bad paths: exit 2, one line, no partial file)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_util import assert_user_error, espstream

from espstream.errors import UserError
from espstream.espdl import read
from espstream.export import export_model
from espstream.optimize import optimize_model
from espstream.quant import calibrate_model, model_inputs, read_calibration_data, scheme
from espstream.sim import Simulator
from espstream.stream.streamify import streamify_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FIXTURES = ROOT / "tests" / "data" / "esp-ppq"
TARGETS = ("c", "esp32s3", "esp32p4")


@functools.cache
def qdq(path: str, calib: str, target: str = "esp32p4", bits: int = 8) -> onnx.ModelProto:
    fm = optimize_model(onnx.load(path)).model
    data = read_calibration_data(calib, model_inputs(fm))
    return calibrate_model(fm, data, target=target, bits=bits, report_samples=0).model


def model_qdq(name: str, target: str = "esp32p4", bits: int = 8) -> onnx.ModelProto:
    return qdq(str(MODELS / f"{name}.onnx"), str(MODELS / f"{name}.calib.npy"), target, bits)


def fixture_qdq(name: str, target: str) -> onnx.ModelProto:
    return qdq(str(FIXTURES / name / "model.onnx"), str(FIXTURES / name / "calib.npy"), target)


@pytest.fixture(scope="module")
def qdq_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("qdq")
    p = d / "kws.qdq.onnx"
    onnx.save(model_qdq("kws2d"), p)
    return p


def _check_test_values(g):
    """What Model::test() does on the chip: run the embedded input, compare exactly."""
    assert g.test_inputs and g.test_outputs
    out = Simulator(g).run({k: t.data for k, t in g.test_inputs.items()})
    for k, t in g.test_outputs.items():
        assert np.array_equal(out[k], t.data)
        assert t.exponents == g.value_info(k).exponents


# ---- the .espdl file ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["tutorial_tcn", "stream_tcn", "kws2d"])
def test_export_round_trip_and_test_values(name, target, bits):
    r = export_model(model_qdq(name, target, bits), test_random=True)
    g = read(r.data)
    assert g.diff(r.graph) == []
    assert r.data[:4] == b"EDL2" and len(r.data) % 16 == 0
    _check_test_values(g)
    assert r.report["target"] == target and r.report["test_values"]


def test_test_data_is_quantized_in_the_runtime_layout():
    x = np.load(MODELS / "tutorial_tcn.input.npy")
    r = export_model(model_qdq("tutorial_tcn", "esp32s3"), test_data=x)
    t = r.graph.test_inputs["x"]
    want = np.clip(np.floor(x[:1] / 2.0 ** t.exponents[0] + 0.5), -128, 127)  # half up on S3
    assert np.array_equal(t.data, want.transpose(0, 2, 1))
    assert t.data.shape == (1, 24, 16)


def test_streaming_export_embeds_one_chunk():
    s = streamify_model(model_qdq("stream_tcn"), 4).model
    x = np.load(MODELS / "stream_tcn.input.npy")  # [1, 16, 64]: the first chunk is used
    r = export_model(s, test_data=x)
    g = read(r.data)
    assert g.test_inputs["x"].data.shape == (1, 4, 16)
    e = g.test_inputs["x"].exponents[0]
    assert np.array_equal(g.test_inputs["x"].data,
                          scheme.quantize(x[:1, :, :4], e, 8, "half_even").transpose(0, 2, 1))
    _check_test_values(g)
    assert r.report["streaming"] and r.report["cache_bytes"] == (2 + 4 + 8 + 16) * 32
    assert g.metadata["espstream.chunk"] == "4"
    caches = [n for n in g.nodes if n.op_type == "StreamingCache"]
    assert [n.attrs["window_size"] for n in caches] == [3, 5, 9, 17]


def test_test_data_of_the_wrong_shape_refused():
    with pytest.raises(UserError, match=r"test data for input 'x' has shape \[1, 16, 23\]"):
        export_model(model_qdq("tutorial_tcn"), test_data=np.zeros([1, 16, 23], np.float32))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["tutorial_tcn", "stream_tcn"])
def test_file_size_against_esp_ppq(name, target):
    """Issue 6, point 4: the fixture models exported here, with test values as ESP-PPQ's
    offline files have, are no more than 5% larger than ESP-PPQ's files. (They are 8-14%
    smaller: the writer stores each distinct string once; with every string written
    separately, as ESP-PPQ does, they are within -1%..+6%: our names are longer, e.g.
    '/blocks.0/pw/Conv.folded_weight' for ESP-PPQ's 'onnx::Conv_166'.)"""
    ours = len(export_model(fixture_qdq(name, target), test_random=True).data)
    theirs = (FIXTURES / name / target / "offline.espdl").stat().st_size
    assert ours <= 1.05 * theirs
    assert ours >= 0.80 * theirs  # same parameters: not wildly different either


# ---- C++ coefficients ---------------------------------------------------------------------

CPP_MAIN = r"""
#include <cstdio>
#include "kws_coefficient.hpp"
using namespace kws_coefficient;
int main() {
    const Filter *f = get_conv1_conv_filter();
    const Bias *b = get_conv1_conv_bias();
    const Activation *a = get_conv1_conv_activation();
    long fsum = 0, bsum = 0;
    int n = f->shape[0] * f->shape[1] * f->shape[2] * f->shape[3];
    for (int i = 0; i < n; i++) fsum += f->element[i] * (i % 7 + 1);
    for (int i = 0; i < b->size; i++) bsum += b->element[i];
    std::printf("%d %d %d %d %ld %ld %d %d %s %d %d %d\n", f->shape[0], f->shape[1], f->shape[2],
                f->shape[3], fsum, bsum, f->exponent_count, f->padding[0], a->type, a->exponent,
                head_conv_output_exponent, get_head_conv_filter()->exponents[1]);
    return 0;
}
"""


def test_cpp_export_compiles_and_holds_the_data(tmp_path, qdq_file):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: cannot compile the generated C++")
    proc = espstream("export", qdq_file, "--format", "cpp", "--name", "kws", "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kws_coefficient.cpp",
                                                          "kws_coefficient.hpp"]
    (tmp_path / "main.cpp").write_text(CPP_MAIN)
    exe = tmp_path / "main"
    subprocess.run(["g++", "-std=c++11", "-Wall", "-Werror", "-O0", "-o", str(exe),
                    str(tmp_path / "main.cpp"), str(tmp_path / "kws_coefficient.cpp")],
                   check=True, capture_output=True, timeout=120)
    got = subprocess.run([str(exe)], capture_output=True, check=True, text=True).stdout.split()
    g = export_model(model_qdq("kws2d")).graph
    conv = g.node("/conv1/Conv")
    w = g.initializers[conv.inputs[1]]
    b = g.initializers[conv.inputs[2]]
    weights = np.arange(w.data.size) % 7 + 1
    head = g.node("/head/Conv")
    want = [*map(str, w.dims), str(int(np.sum(w.data.reshape(-1).astype(np.int64) * weights))),
            str(int(b.data.astype(np.int64).sum())), str(len(w.exponents)),
            str(conv.attrs["pads"][0]), "ReLU", str(g.exponents(conv.outputs[0])[0]),
            str(g.exponents(head.outputs[0])[0]),
            str(g.initializers[head.inputs[1]].exponents[1])]
    assert got == want


# ---- CLI ---------------------------------------------------------------------------------


def test_cli_export_and_report(tmp_path, qdq_file):
    out, rep = tmp_path / "m.espdl", tmp_path / "r.json"
    proc = espstream("export", qdq_file, "-o", out, "--test-random", "--json", rep)
    assert proc.returncode == 0, proc.stderr.decode()
    g = read(out.read_bytes())
    _check_test_values(g)
    r = json.loads(rep.read_text())
    assert r["target"] == "esp32p4" and r["files"]["model.espdl"] == out.stat().st_size
    assert r["ops"] == {"Conv": 5, "AveragePool": 1}


def test_cli_target_defaults_to_the_recorded_one(tmp_path, qdq_file):
    out = tmp_path / "m.espdl"
    assert espstream("export", qdq_file, "-o", out, "--target", "esp32p4").returncode == 0
    assert read(out.read_bytes()).target == "esp32p4"
    proc = espstream("export", qdq_file, "-o", tmp_path / "n.espdl", "--target", "esp32s3")
    assert_user_error(proc, "--target esp32s3 differs", "esp32p4")
    assert not (tmp_path / "n.espdl").exists()


def test_cli_refuses_float_model(tmp_path):
    proc = espstream("export", MODELS / "kws2d.onnx", "-o", tmp_path / "m.espdl")
    assert_user_error(proc, "float model; calibrate it first")
    assert list(tmp_path.iterdir()) == []


def test_cli_lists_every_unsupported_operator(tmp_path):
    q = onnx.ModelProto()
    q.CopyFrom(model_qdq("stream_tcn"))
    relus = [n for n in q.graph.node if n.op_type == "Relu"]
    relus[0].op_type = "Elu"  # supported (a LUT) ...
    relus[1].op_type = "Erf"
    relus[2].op_type = "Sin"
    p = tmp_path / "bad.onnx"
    onnx.save(q, p)
    proc = espstream("export", p, "-o", tmp_path / "m.espdl")
    line = assert_user_error(proc, "2 operator(s)", f"Erf '{relus[1].name}'",
                             f"Sin '{relus[2].name}'")
    assert "Elu" not in line
    assert not (tmp_path / "m.espdl").exists()


@pytest.mark.parametrize("args,fragment", [
    (["missing.onnx"], "missing.onnx: no such file"),
    (["{qdq}", "--test-data", "missing.npy"], "missing.npy: no such file"),
    (["{qdq}", "--test-data", "{qdq}"], "not a .npy / .npz array file"),
    (["{qdq}", "--test-data", "x.npy", "--test-random"], "not both"),
])
def test_cli_bad_paths(tmp_path, qdq_file, args, fragment):
    (tmp_path / "x.npy").write_bytes(b"")
    args = [a.format(qdq=qdq_file) for a in args]
    out = tmp_path / "m.espdl"
    proc = espstream("export", *[tmp_path / a if a.endswith((".onnx", ".npy")) and "/" not in a
                                 else a for a in args], "-o", out)
    assert_user_error(proc, fragment)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.espdl")]


def test_cli_cpp_needs_a_folder(tmp_path, qdq_file):
    proc = espstream("export", qdq_file, "--format", "cpp", "-o", tmp_path / "nope")
    assert_user_error(proc, "not an existing folder")
    assert list(tmp_path.iterdir()) == []


def _batch_model(batch: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).normal(size=[4, 4, 3]).astype(np.float32)
    w = numpy_helper.from_array(w, "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1])], "b",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_fixed_batch_above_one_is_refused_with_the_shape_to_give():
    from espstream.quant.data import random_data

    def calibrated(batch):
        m = _batch_model(batch)
        return calibrate_model(m, random_data(model_inputs(m), 8), report_samples=0).model

    assert export_model(calibrated(1)).graph.inputs  # batch 1 exports
    two = calibrated(2)
    with pytest.raises(UserError, match=r"input 'x' \[2, 4, 8\]: axis 0 is the batch.*"
                                         r"one sample per call; give --input-shape x:1,4,8"):
        export_model(two)

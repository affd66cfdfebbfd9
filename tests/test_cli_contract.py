"""The command-line contract every stage shares, exercised through `optimize`."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from cli_util import ROOT, assert_user_error, espstream
from onnx import helper

MODEL = ROOT / "models/kws2d.onnx"


def test_version_and_python_m():
    proc = espstream("--version")
    assert proc.returncode == 0 and b"espstream, version" in proc.stdout
    console = Path(sys.executable).parent / "espstream"
    assert subprocess.run([console, "--version"], capture_output=True).stdout == proc.stdout


def test_stage_help_shows_an_example():
    proc = espstream("optimize", "--help")
    assert proc.returncode == 0
    assert b"Example:" in proc.stdout and b"espstream optimize model.onnx" in proc.stdout


def test_pipe_stdin_to_stdout_and_report_json(tmp_path):
    report = tmp_path / "r.json"
    proc = espstream("optimize", "-", "--json", report, stdin=MODEL.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    model = onnx.load_from_string(proc.stdout)
    onnx.checker.check_model(model)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    data = json.loads(report.read_text())
    assert data["stage"] == "optimize" and data["check"]["passed"] is True
    assert data["nodes_after"] < data["nodes_before"]
    assert b"op" in proc.stderr and b"check:" in proc.stderr  # the human table


def test_quiet_silences_stderr(tmp_path):
    proc = espstream("optimize", MODEL, "-o", tmp_path / "o.onnx", "-q")
    assert proc.returncode == 0 and proc.stderr == b""
    assert (tmp_path / "o.onnx").exists()


def test_list_passes():
    proc = espstream("optimize", "--list-passes")
    names = [line.split()[0] for line in proc.stdout.decode().splitlines()]
    assert names == [
        "fold_constants", "inline_if", "fold_expand", "remove_cast", "remove_identity",
        "fuse_layernorm", "minmax_to_clip", "clip_runtime_bounds", "einsum_to_matmul", "fold_pad",
        "fold_batchnorm", "fold_scale", "batchnorm_to_affine", "merge_affine", "sum_to_add",
        "share_initializers", "eliminate_dead",
    ]


def test_refuses_binary_output_to_a_terminal():
    main, sub = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "espstream", "optimize", str(MODEL), "-q"],
            stdout=sub, stderr=subprocess.PIPE, timeout=120, cwd=ROOT,
        )
    finally:
        os.close(sub)
        os.close(main)
    assert_user_error(proc, "terminal")


def test_refuses_to_overwrite_its_input(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(MODEL.read_bytes())
    proc = espstream("optimize", path, "-o", path)
    assert_user_error(proc, "overwrite the input")
    assert path.read_bytes() == MODEL.read_bytes()


def _model_bytes(**overrides) -> bytes:
    nodes = overrides.get("nodes", [helper.make_node("Relu", ["x"], ["y"])])
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", 1, [1, 4])],
        [helper.make_tensor_value_info("y", 1, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", overrides.get("opset", 13))]
    )
    model.ir_version = 8
    return model.SerializeToString()


def _external_data_model(tmp_path: Path) -> Path:
    model = onnx.load(MODEL)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    return path


def _function_with_empty_list_attribute() -> bytes:
    """A model-local function whose Transpose has `perm` typed INTS but empty."""
    perm = onnx.AttributeProto(name="perm", type=onnx.AttributeProto.INTS)
    body = helper.make_node("Transpose", ["a"], ["b"], name="inner")
    body.attribute.append(perm)
    fn = helper.make_function("local", "F", ["a"], ["b"], [body],
                              [helper.make_opsetid("", 13)])
    graph = helper.make_graph(
        [helper.make_node("F", ["x"], ["y"], domain="local")], "g",
        [helper.make_tensor_value_info("x", 1, [1, 4])],
        [helper.make_tensor_value_info("y", 1, [4, 1])],
    )
    model = helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def _sigmoid_of_a_weight() -> bytes:
    """tutorial_tcn with one Sigmoid reading the [16, 32] fc weight: checker-valid and loads in
    onnxruntime, fails only on data (a Mul cannot broadcast it); folded by optimize, it would
    fail to load, which once passed for an internal error (found by fuzzing)."""
    from espstream.optimize import optimize_model

    m = optimize_model(onnx.load(ROOT / "models/tutorial_tcn.onnx")).model
    next(n for n in m.graph.node if n.op_type == "Sigmoid").input[0] = "fc.weight"
    return m.SerializeToString()


BAD = {
    "not_onnx": (lambda d: d.joinpath("x.onnx").write_bytes(b"hello, not a model\n" * 8),
                 "not an ONNX model"),
    "truncated": (lambda d: d.joinpath("x.onnx").write_bytes(MODEL.read_bytes()[:3000]),
                  "not an ONNX model"),
    "empty_file": (lambda d: d.joinpath("x.onnx").write_bytes(b""), "empty"),
    "fails_checker": (lambda d: d.joinpath("x.onnx").write_bytes(
        _model_bytes(nodes=[helper.make_node("Relu", ["nowhere"], ["y"])])), "onnx.checker"),
    "old_opset": (lambda d: d.joinpath("x.onnx").write_bytes(_model_bytes(opset=9)),
                  "opset 9 is older than 11"),
    "empty_graph": (lambda d: d.joinpath("x.onnx").write_bytes(_model_bytes(nodes=[])),
                    "graph is empty"),
    "missing_file": (lambda d: None, "no such file"),
    "fails_on_data_and_folded": (
        lambda d: d.joinpath("x.onnx").write_bytes(_sigmoid_of_a_weight()),
        "the input model fails in onnxruntime"),
    "empty_list_attribute": (
        lambda d: d.joinpath("x.onnx").write_bytes(_function_with_empty_list_attribute()),
        "attribute 'perm' of node 'inner' (Transpose) in function 'F' is declared as a list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_models_get_one_clear_line(tmp_path, case):
    make, fragment = BAD[case]
    make(tmp_path)
    src = tmp_path / "x.onnx"
    before = src.read_bytes() if src.exists() else None
    out = tmp_path / "out.onnx"
    proc = espstream("optimize", src, "-o", out)
    line = assert_user_error(proc, fragment)
    if case not in ("missing_file", "fails_on_data_and_folded"):
        assert str(src) in line  # load errors name the file; the check's say "the input model"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == ([src] if before is not None else [])  # no temp files
    if before is not None:
        assert src.read_bytes() == before


def test_missing_external_data(tmp_path):
    path = _external_data_model(tmp_path)
    assert_user_error(espstream("optimize", path, "-o", tmp_path / "o.onnx"), "external data")
    proc = espstream("optimize", "-", stdin=path.read_bytes())
    assert_user_error(proc, "external data")


def test_external_data_beside_the_file_is_loaded(tmp_path):
    model = onnx.load(MODEL)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    proc = espstream("optimize", path, "-o", tmp_path / "o.onnx", "-q")
    assert proc.returncode == 0, proc.stderr.decode()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--input-shape", "y:1,1,32,10"], "no input 'y'"),
        (["--input-shape", "x:1,1,32"], "rank 4"),
        (["--input-shape", "x:1,a"], "NAME:D0,D1"),
        (["--skip", "nope"], "no such pass"),
        (["--no-such-option"], "No such option"),
    ],
)
def test_bad_options(tmp_path, args, fragment):
    out = tmp_path / "o.onnx"
    proc = espstream("optimize", MODEL, "-o", out, *args)
    assert_user_error(proc, fragment)
    assert not out.exists()


def test_output_folder_missing(tmp_path):
    proc = espstream("optimize", MODEL, "-o", tmp_path / "nope" / "o.onnx")
    assert_user_error(proc, "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"garbage")
    proc = espstream("optimize", bad, "--debug")
    assert proc.returncode != 0 and b"Traceback" in proc.stderr


def test_library_prints_cannot_corrupt_a_piped_model():
    """Anything printed while a stage runs goes to stderr; only the model reaches stdout."""
    script = (
        "import sys\n"
        "from espstream import modelio\n"
        "with modelio.stdout_reserved_for_output():\n"
        "    print('chatty library warning')\n"
        "    modelio.write_bytes(b'MODEL', '-')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"MODEL"
    assert b"chatty library warning" in proc.stderr

"""The README's shell pipeline, run verbatim through bash (pipefail) in a temporary folder on the
bundled tutorial model; its .espdl checked against the stages run in Python and in onnxruntime."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_util import espstream

from espstream.convert import convert_model
from espstream.espdl import read
from espstream.optimize import optimize_model
from espstream.quant import calibrate_model, model_inputs, read_calibration_data
from espstream.stream.streamify import streamify_model
from espstream.verify import OrtRunner

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def readme_pipeline() -> str:
    """The one-line pipeline in README.md's first code block."""
    text = (ROOT / "README.md").read_text()
    lines = [ln.strip() for ln in re.findall(r"```\n(.*?)```", text, re.S)[0].splitlines()]
    (line,) = [ln for ln in lines if ln.startswith("espstream optimize") and "|" in ln]
    return line


def run_in(folder: Path, command: str) -> subprocess.CompletedProcess:
    """`bash -o pipefail -c COMMAND` in `folder`, with `espstream` meaning this interpreter's."""
    bindir = folder / ".bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "espstream"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m espstream "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=folder, env=env,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    """The README pipeline, verbatim, on m.onnx = tutorial_tcn and calib.npy = its data."""
    d = tmp_path_factory.mktemp("pipeline")
    shutil.copy(MODELS / "tutorial_tcn.onnx", d / "m.onnx")
    shutil.copy(MODELS / "tutorial_tcn.calib.npy", d / "calib.npy")
    line = readme_pipeline()
    assert line == ("espstream optimize m.onnx | espstream calibrate - -d calib.npy | "
                    "espstream streamify - --chunk 3 | espstream export - -o m.espdl")
    proc = run_in(d, line)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    return d


def test_readme_pipeline_writes_a_streaming_espdl(pipeline_folder):
    g = read((pipeline_folder / "m.espdl").read_bytes())
    assert g.streaming and g.target == "esp32p4"
    assert g.inputs[0].shape == [1, 3, 16]  # one chunk of 3 frames, channels last
    assert sum(n.op_type == "StreamingCache" for n in g.nodes) == 4
    # the same bytes as convert with the same options and data (and no test values)
    fm = onnx.load(str(pipeline_folder / "m.onnx"))
    r = convert_model(fm, pipeline_folder / "calib.npy", chunk=3, test_data=None)
    assert r.ok, r.failure()
    assert r.data == (pipeline_folder / "m.espdl").read_bytes()


def test_readme_pipeline_int8_chunked_equals_offline(pipeline_folder):
    r = convert_model(onnx.load(str(pipeline_folder / "m.onnx")), pipeline_folder / "calib.npy",
                      test_data=None)
    (pipeline_folder / "offline.espdl").write_bytes(r.data)
    proc = espstream("verify", pipeline_folder / "offline.espdl", pipeline_folder / "m.espdl",
                     "--random", "4")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "summary  after the last chunk  0" in proc.stderr.decode()


def test_readme_pipeline_with_test_values_verifies(pipeline_folder):
    """The same line with `--test-data x.npy` (what `make pipeline` runs): `espstream verify`
    on the file passes, and its test output equals the streaming fake-quant model's first call
    in onnxruntime (the two agree exactly on esp32p4)."""
    d = pipeline_folder
    shutil.copy(MODELS / "tutorial_tcn.input.npy", d / "x.npy")
    proc = run_in(d, readme_pipeline().replace("-o m.espdl", "-o t.espdl --test-data x.npy"))
    assert proc.returncode == 0, proc.stderr.decode()
    proc = run_in(d, "espstream verify t.espdl")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "ok" in proc.stderr.decode().splitlines()[-1]
    g = read((d / "t.espdl").read_bytes())
    x = np.load(d / "x.npy")
    fm = optimize_model(onnx.load(str(d / "m.onnx"))).model
    q = calibrate_model(fm, read_calibration_data(str(d / "calib.npy"), model_inputs(fm)),
                        report_samples=0).model
    s = streamify_model(q, 3).model
    feeds = {"x": x[:, :, :3]}
    for vi in s.graph.input:
        if vi.name != "x":
            dims = [dd.dim_value for dd in vi.type.tensor_type.shape.dim]
            feeds[vi.name] = np.zeros(dims, np.float32)
    y = OrtRunner(s, "streaming").run(feeds)["y"]
    e = g.outputs[0].exponents[0]
    assert np.array_equal(g.test_outputs["y"].data, np.rint(y / 2.0**e).astype(np.int8))
    ein = g.inputs[0].exponents[0]
    want_in = np.clip(np.rint(x[0, :, :3] / 2.0**ein), -128, 127).astype(np.int8).T[None]
    assert np.array_equal(g.test_inputs["x"].data, want_in)


def test_a_failing_stage_fails_the_pipeline(tmp_path):
    """pipefail: a stage that fails (no calibration data here) fails the whole line, and no
    .espdl is left behind."""
    shutil.copy(MODELS / "tutorial_tcn.onnx", tmp_path / "m.onnx")
    proc = run_in(tmp_path, readme_pipeline())  # calib.npy is missing
    assert proc.returncode == 2
    assert "calib.npy: no such file" in proc.stderr.decode()
    assert not (tmp_path / "m.espdl").exists()

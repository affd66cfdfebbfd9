"""`espstream verify` with the integer simulator: .espdl test values (Model::test()), .espdl
offline vs streaming, and `--engine int8` on QDQ ONNX models with the fake-quant agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_util import assert_user_error, espstream

from espstream.errors import CheckFailed
from espstream.espdl import read, write
from espstream.intgraph import IntGraph, Node, Tensor, ValueInfo
from espstream.verify_int8 import check_test_values, compare_ints, verify_espdl_pair

DATA = Path(__file__).parent / "data" / "esp-ppq"
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = sorted(DATA.glob("*/*/offline.espdl"))
IDS = [f"{p.parent.parent.name}-{p.parent.name}" for p in FIXTURES]


# ---- Model::test() ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURES, ids=IDS)
def test_cli_verify_espdl_test_values_pass(path: Path, tmp_path: Path) -> None:
    report = tmp_path / "v.json"
    proc = espstream("verify", path, "--json", report, "--target", path.parent.name)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "100.0%" in proc.stderr.decode()
    assert f"target {path.parent.name} (" in proc.stderr.decode()
    rep = json.loads(report.read_text())
    assert rep["ok"] is True
    [out] = rep["outputs"]
    assert out["output"] == "y" and out["identical_share"] == 1.0 and out["max_diff_lsb"] == 0


def test_cli_verify_espdl_corrupted_test_output(tmp_path: Path) -> None:
    g = read((DATA / "stream_tcn" / "c" / "offline.espdl").read_bytes())
    y = g.test_outputs["y"].data.copy()
    y[0, 5, :4] = np.clip(y[0, 5, :4].astype(int) + 3, -128, 127)  # 4 values, 3 LSB off
    y[0, 9, 0] = 127 if y[0, 9, 0] != 127 else 126
    g.test_outputs["y"] = Tensor("y", y, g.test_outputs["y"].exponents)
    bad = tmp_path / "bad.espdl"
    bad.write_bytes(write(g))
    report = tmp_path / "v.json"
    proc = espstream("verify", bad, "--json", report)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    changed = 4 + 1
    assert f"output 'y': {changed} of 1024 values differ" in err
    out = json.loads(report.read_text())["outputs"][0]
    assert out["identical"] == 1024 - changed
    assert out["max_diff_lsb"] >= 3 and out["ok"] is False


def test_cli_verify_corrupt_file_is_one_line(tmp_path: Path) -> None:
    raw = (DATA / "tutorial_tcn" / "c" / "offline.espdl").read_bytes()
    cut = tmp_path / "cut.espdl"
    cut.write_bytes(raw[: len(raw) // 2])
    assert_user_error(espstream("verify", cut), "cut.espdl")
    junk = tmp_path / "junk.espdl"
    junk.write_bytes(b"not a model at all, just text")
    assert_user_error(espstream("verify", junk), "junk.espdl")


def test_cli_verify_espdl_option_errors(tmp_path: Path) -> None:
    f = DATA / "tutorial_tcn" / "c" / "offline.espdl"
    assert_user_error(espstream("verify", f, "--engine", "float"), "only in the int8 simulator")
    np.save(tmp_path / "x.npy", np.zeros((1, 24, 16), np.float32))
    assert_user_error(espstream("verify", f, "--data", tmp_path / "x.npy"), "need a second file")
    st = DATA / "stream_tcn" / "c" / "streaming.espdl"
    assert_user_error(espstream("verify", st), "no test values")


def _int16_graph(want: list[int]) -> IntGraph:
    vis = {n: ValueInfo(n, np.dtype(np.int16), [4], [-8]) for n in ("x", "y")}
    return IntGraph(
        name="i16", nodes=[Node("Identity", "id", ["x"], ["y"])],
        inputs=[vis["x"]], outputs=[vis["y"]], value_infos=vis, target="esp32s3",
        test_inputs={"x": Tensor("x", np.array([1, 2, 3, 4], np.int16), [-8])},
        test_outputs={"y": Tensor("y", np.array(want, np.int16), [-8])},
    )  # fmt: skip


def test_int16_outputs_allow_one_lsb() -> None:
    [c] = check_test_values(_int16_graph([2, 2, 3, 3]))
    assert c.ok and c.tolerance == 1 and c.identical == 2 and c.max_lsb == 1
    [c] = check_test_values(_int16_graph([1, 2, 3, 6]))
    assert not c.ok and c.max_lsb == 2
    assert "1 of 4 values differ (75.0% identical), largest difference 2 LSB" in c.describe()


def test_compare_ints_shape_mismatch() -> None:
    c = compare_ints("y", np.zeros((1, 4), np.int8), np.zeros((1, 5), np.int8), 0)
    assert not c.ok and "shape [1, 5]" in c.describe()


# ---- offline .espdl vs streaming .espdl ----------------------------------------------------------


def test_cli_verify_esp_ppq_streaming_export_fails(tmp_path: Path) -> None:
    """ESP-PPQ's conversion (tests/test_sim_stream.py explains it): exit 1 naming the Add."""
    d = DATA / "tutorial_tcn" / "esp32p4"
    report = tmp_path / "v.json"
    proc = espstream("verify", d / "offline.espdl", d / "streaming.espdl", "--json", report)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("espstream: check failed: the streaming file cannot run: node '/Add'")
    assert "[1, 5, 32] and [1, 3, 32]" in last
    assert json.loads(report.read_text())["ok"] is False


def test_espdl_pair_exact_once_residuals_aligned() -> None:
    """The same pair with the residual Adds fed the current chunk passes, frame for frame."""
    from test_sim_stream import align_residuals

    d = DATA / "stream_tcn" / "esp32s3"
    off = read((d / "offline.espdl").read_bytes())
    st = align_residuals(read((d / "streaming.espdl").read_bytes()), 4)
    res = verify_espdl_pair(off, st, target="esp32s3")  # the offline file's own test input
    assert res.ok and res.chunk == 4 and res.frames == 64
    [o] = res.outputs
    assert (o.kind, o.compared, o.max_abs, o.exact) == ("time", 64, 0.0, 1.0)
    res = verify_espdl_pair(off, st, random=2, seed=5, target="esp32s3")
    assert res.ok and res.samples == 2


def test_espdl_pair_reports_first_differing_frame() -> None:
    """A wrong kept frame (cache of window 3 swapped for window 2) shows up from frame 4 on:
    the first chunk starts from zeros either way."""
    from test_sim_stream import align_residuals

    d = DATA / "stream_tcn" / "c"
    off = read((d / "offline.espdl").read_bytes())
    st = align_residuals(read((d / "streaming.espdl").read_bytes()), 4)
    first = next(n for n in st.nodes if n.op_type == "StreamingCache")
    assert first.attrs["window_size"] == 3
    first.attrs["window_size"] = 2  # the depthwise conv after it now sees one frame too few
    # ... so give that conv its one missing frame of zero padding back to keep shapes valid
    conv = next(n for n in st.nodes if first.outputs[0] in n.inputs and n.op_type == "Conv")
    conv.attrs["pads"] = [1, 0]
    res = verify_espdl_pair(off, st)
    assert not res.ok
    [o] = res.outputs
    assert o.first_diff == 4 and 0 < o.exact < 1


# ---- --engine int8 on QDQ ONNX -------------------------------------------------------------------


@pytest.fixture(scope="module")
def qdq_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """stream_tcn and tutorial_tcn from models/, calibrated on random data, streamed."""
    tmp = tmp_path_factory.mktemp("int8")
    out = {}
    for name, chunk, target in (("stream_tcn", 4, "esp32p4"), ("tutorial_tcn", 3, "esp32s3")):
        opt, qdq, st = (tmp / f"{name}.{k}.onnx" for k in ("opt", "qdq", "stream"))
        for args in (
            ("optimize", ROOT / "models" / f"{name}.onnx", "-o", opt),
            ("calibrate", opt, "--random", "8", "--target", target, "-o", qdq),
            ("streamify", qdq, "--chunk", str(chunk), "-o", st),
        ):
            proc = espstream(*args, "-q")
            assert proc.returncode == 0, proc.stderr.decode()
        out[name] = (qdq, st)
    return out


def test_cli_verify_engine_int8_chunked_equals_offline(qdq_models, tmp_path: Path) -> None:
    qdq, st = qdq_models["stream_tcn"]
    report = tmp_path / "v.json"
    proc = espstream("verify", qdq, st, "--engine", "int8", "--random", "3", "--json", report)
    assert proc.returncode == 0, proc.stderr.decode()
    rep = json.loads(report.read_text())
    [run] = rep["runs"]
    assert run["engine"] == "int8" and run["samples"] == 3
    [o] = run["outputs"]
    assert (o["kind"], o["compared"], o["max_abs_error"], o["exact_fraction"]) == (
        "time",
        64,
        0.0,
        1.0,
    )
    # esp32p4 rounds ties to even like onnxruntime: the fake-quant model agrees
    [a] = rep["int8_vs_fakequant"]["outputs"]
    assert a["elements"] == 3 * 16 * 64
    assert a["identical_share"] >= 0.99 and a["max_diff_lsb"] <= 1


def test_cli_verify_engine_int8_summary_output_half_up(qdq_models, tmp_path: Path) -> None:
    qdq, st = qdq_models["tutorial_tcn"]
    report = tmp_path / "v.json"
    proc = espstream("verify", qdq, st, "--engine", "int8", "--random", "2", "--json", report)
    assert proc.returncode == 0, proc.stderr.decode()
    rep = json.loads(report.read_text())
    [o] = rep["runs"][0]["outputs"]
    assert (o["kind"], o["max_abs_error"]) == ("summary", 0.0)
    [a] = rep["int8_vs_fakequant"]["outputs"]
    assert a["elements"] == 2 * 16 and 0.0 <= a["identical_share"] <= 1.0


def test_int8_engine_catches_a_stream_that_forgets(qdq_models) -> None:
    """The int8 engine is a real check: the same lowered streaming model, but with its caches
    zeroed before every chunk (a device that loses its state), fails against offline."""
    import onnx

    from espstream import verify_int8
    from espstream.verify import register_engine, verify_models

    class Forgetful(verify_int8.Int8Runner):
        def run(self, feeds):
            self.sim.reset()
            return super().run(feeds)

    class ForgetfulEngine(verify_int8.Int8Engine):
        name = "int8-forgetful"

        def load(self, model, label):
            return (
                Forgetful(model, label)
                if label == "streaming model"
                else super().load(model, label)
            )

    qdq, st = qdq_models["stream_tcn"]
    off, stream = onnx.load(str(qdq)), onnx.load(str(st))
    verify_int8.register()
    assert verify_models(off, stream, random=1, engine="int8").ok
    register_engine("int8-forgetful", ForgetfulEngine)
    res = verify_models(off, stream, random=1, engine="int8-forgetful")
    assert not res.ok
    [o] = res.outputs
    assert (
        o.first_diff is not None and o.first_diff >= 4
    )  # the first chunk starts from zeros anyway
    with pytest.raises(CheckFailed):
        res.raise_if_failed()

"""convert: every stage in one process, verified; the summary's numbers; refusals (exit 2, one
line, no file); a broken streaming model (exit 1 after the summary, no file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_util import assert_user_error, espstream
from onnx import numpy_helper

import espstream.convert as conv
from espstream.convert import convert_model, time_line
from espstream.espdl import read
from espstream.export import export_model
from espstream.optimize import optimize_model
from espstream.quant import calibrate_model, model_inputs, read_calibration_data, scheme
from espstream.stream.streamify import streamify_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FIXTURES = ROOT / "tests" / "data" / "esp-ppq"

# (model, calibration data, chunk of issue 4, int8 state bytes worked out by hand, output kind)
CASES = [
    # depthwise kernel 3 with dilations 1, 2, 1 (2 + 4 + 2 frames) and the pool (2 frames), 32 ch
    ("models/tutorial_tcn.onnx", "models/tutorial_tcn.calib.npy", 3, (2 + 4 + 2 + 2) * 32,
     "summary"),
    # depthwise kernel 3 with dilations 1, 2, 4, 8: 2 + 4 + 8 + 16 frames of 32 channels
    ("models/stream_tcn.onnx", "models/stream_tcn.calib.npy", 4, (2 + 4 + 8 + 16) * 32, "time"),
    # first Conv: 2 frames of 1 x 10 features; dilated depthwise: 4 frames of 16 ch x 5 features
    ("models/kws2d.onnx", "models/kws2d.calib.npy", 1, 2 * 10 + 4 * 16 * 5, "time"),
    ("tests/data/esp-ppq/stream_tcn/model.onnx", "tests/data/esp-ppq/stream_tcn/calib.npy", 4,
     None, "time"),
    # causal Conv kernel 3: 2 frames of 10 features (the GRU's 16-value h is a recurrent state
    # the application copies back, not a StreamingCache)
    ("models/kws_gru.onnx", "models/kws_gru.calib.npy", 4, 2 * 10, "time"),
]
STREAM_CHECKS = ["optimize", "float: streaming == offline", "fake-quant: streaming == offline",
                 "int8 (lower + simulator): streaming == offline", "int8 vs fake-quant",
                 ".espdl test values"]


def _load(rel: str) -> onnx.ModelProto:
    return onnx.load(str(ROOT / rel))


@pytest.mark.parametrize("model,data,chunk,state,kind", CASES,
                         ids=["tutorial_tcn", "stream_tcn", "kws2d", "fixture_stream_tcn",
                              "kws_gru"])
def test_streaming_models_convert_and_verify(model, data, chunk, state, kind):
    r = convert_model(_load(model), ROOT / data, chunk=chunk)
    assert r.ok, r.failure()
    assert [c.name for c in r.checks] == STREAM_CHECKS
    g = read(r.data)
    assert g.streaming and g.test_inputs
    (name, out), = r.outputs().items()
    assert out["kind"] == kind and out["delay"] == 0
    # 8-bit power-of-two quantization of these small models: 20-40 dB, int8 as good as fake-quant
    assert 20 < out["sqnr_fakequant_db"] < 45
    assert abs(out["sqnr_int8_db"] - out["sqnr_fakequant_db"]) < conv.INT8_MARGIN_DB
    if state is not None:
        assert r.state_bytes == state
    recurrent = 16 if "kws_gru" in model else 0  # the GRU's h: int8, not a StreamingCache
    assert r.state_bytes + recurrent == r.streamed.state_bytes_int8
    count, nbytes = r.parameters
    assert nbytes == r.exported.report["parameter_bytes"] and 0 < count <= nbytes
    assert list(r.seconds)[:5] == ["optimize", "streamify", "calibrate", "export", "verify.float"]
    assert all(v >= 0 for v in r.seconds.values())
    j = r.to_json()
    json.dumps(j)  # plain JSON
    assert j["file_bytes"] == len(r.data) and j["state_bytes"] == r.state_bytes
    assert j["outputs"][name]["delay"] == 0


def test_lookahead_model_converts_with_its_delay(tmp_path):
    """A lookahead conv (2 future frames) then a causal one, through the real command: the
    streaming file comes out, delay 2, every check passed, the start mask's cache counted."""
    from stream_graphs import G

    g = G(channels=3, frames=24, seed=5)
    y = g.conv(g.conv("x", 3, k=3, left=0, right=2), 3, k=3)
    src, out, rep = tmp_path / "look.onnx", tmp_path / "look.espdl", tmp_path / "r.json"
    onnx.save(g.model(y), src)
    proc = espstream("convert", src, "--random", "4", "--chunk", "4", "-o", out, "--json", rep)
    assert proc.returncode == 0, proc.stderr.decode()
    j = json.loads(rep.read_text())
    assert all(c["ok"] for c in j["checks"]) and len(j["checks"]) == len(STREAM_CHECKS)
    assert [o["delay"] for o in j["outputs"].values()] == [2]
    # caches: 2 frames of the input, 2 of the hidden tensor (3 ch each), and the start mask's
    # (window 3 - 1) frames of one value; int8, one byte each
    assert j["state_bytes"] == 2 * 3 + 2 * 3 + 2
    assert read(out.read_bytes()).streaming


@pytest.mark.parametrize("name", ["tutorial_tcn", "stream_tcn", "kws2d", "kws_gru"])
def test_offline_convert_has_no_streaming_checks(name):
    r = convert_model(_load(f"models/{name}.onnx"), MODELS / f"{name}.calib.npy")
    assert r.ok, r.failure()
    assert 20 < r.sqnr["y"]["fakequant"] < 45
    assert [c.name for c in r.checks] == ["optimize", "int8 vs fake-quant", ".espdl test values"]
    assert r.streamed is None and r.state_bytes == 0 and not read(r.data).streaming
    assert r.outputs()["y"]["delay"] is None
    assert "streamify" not in r.seconds


def test_convert_equals_the_stages_run_one_by_one():
    """Same .espdl bytes as optimize -> calibrate -> streamify -> export with the same options,
    the test values being the data's first sample."""
    path, calib = MODELS / "tutorial_tcn.onnx", MODELS / "tutorial_tcn.calib.npy"
    r = convert_model(onnx.load(str(path)), calib, chunk=3, target="esp32s3", method="minmax")
    assert r.ok, r.failure()
    fm = optimize_model(onnx.load(str(path))).model
    q = calibrate_model(fm, read_calibration_data(str(calib), model_inputs(fm)),
                        target="esp32s3", method="minmax").model
    s = streamify_model(q, 3).model
    e = export_model(s, test_data=np.load(calib)[:1])
    assert e.data == r.data
    assert r.state_bytes == e.report["cache_bytes"]
    # the fake-quant SQNR: the offline float and QDQ models in plain onnxruntime sessions, on
    # the 4 samples the checks use
    x = np.load(calib)[:4]
    ys = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
          .run(None, {"x": x[k:k + 1]})[0] for m in (fm, q) for k in range(4)]
    ref, fq = np.concatenate(ys[:4]).astype(np.float64), np.concatenate(ys[4:])
    want = 10 * np.log10(np.sum(ref**2) / np.sum((ref - fq) ** 2))
    assert r.sqnr["y"]["fakequant"] == pytest.approx(want, abs=1e-3)
    # the test input is the first chunk (3 frames) of sample 0, quantized half up (esp32s3)
    g = read(r.data)
    x = np.load(calib)[0, :, :3]  # [C, 3]
    exp = g.inputs[0].exponents[0]
    want = np.clip(np.floor(x / 2.0**exp + 0.5), -128, 127).astype(np.int8).T[None]
    assert np.array_equal(g.test_inputs["x"].data, want)


def test_sixteen_bits_random_data_and_no_test_values():
    r = convert_model(_load("models/stream_tcn.onnx"), random=6, chunk=8, target="c", bits=16,
                      test_data=None, verify_samples=2)
    assert r.ok, r.failure()
    g = read(r.data)
    assert g.target == "c" and not g.test_inputs
    assert g.inputs[0].dtype == np.int16 and g.inputs[0].shape[1] == 8  # [1, chunk, C]
    assert r.checks[-1].name == ".espdl read back"
    assert r.sqnr["y"]["fakequant"] > 60  # 16 bits
    assert r.calibrated.samples == 6


def test_test_data_file_gives_the_test_values(tmp_path):
    x = np.random.default_rng(5).standard_normal((1, 16, 64)).astype(np.float32)
    r = convert_model(_load("models/stream_tcn.onnx"), MODELS / "stream_tcn.calib.npy", chunk=4,
                      test_data=x)
    g = read(r.data)
    exp = g.inputs[0].exponents[0]
    want = np.clip(np.rint(x[0, :, :4] / 2.0**exp), -128, 127).astype(np.int8).T[None]
    assert np.array_equal(g.test_inputs["x"].data, want)  # esp32p4 rounds half to even


def test_time_line():
    line = time_line({"optimize": 0.1, "calibrate": 0.2, "verify.float": 0.25,
                      "verify.int8": 0.5})
    assert line == "1.05 s: optimize 0.10, calibrate 0.20, verify 0.75 (float 0.25, int8 0.50)"


# ---- the command line ----------------------------------------------------------------------


def _main(capsys, *args) -> tuple[int, str]:
    """Run the CLI in this process (so a test can monkeypatch a stage); (exit code, stderr)."""
    from espstream.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def test_cli_summary_json_and_same_bytes_as_the_shell_pipeline(tmp_path):
    out, rep = tmp_path / "m.espdl", tmp_path / "r.json"
    model, calib = MODELS / "stream_tcn.onnx", MODELS / "stream_tcn.calib.npy"
    proc = espstream("convert", model, "-d", calib, "--chunk", "4", "-o", out, "--json", rep)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout == b""
    for line in ("SQNR fake-quant dB", "SQNR int8 dB", "state memory: 960 bytes (4 cache(s))",
                 f"file size:    {out.stat().st_size} bytes -> {out}", "time:", "parameters:"):
        assert line in err, (line, err)
    j = json.loads(rep.read_text())
    assert j["ok"] and j["written"] and j["file_bytes"] == out.stat().st_size
    assert j["outputs"]["y"]["delay"] == 0 and j["state_bytes"] == 960
    assert set(j["stages"]) == {"optimize", "calibrate", "streamify", "export"}
    es = f"{sys.executable} -m espstream"
    pipe = (f"{es} optimize {model} | {es} calibrate - -d {calib} | {es} streamify - --chunk 4 "
            f"| {es} export - -o {tmp_path / 'p.espdl'} --test-data {calib}")
    p = subprocess.run(["bash", "-o", "pipefail", "-c", pipe], capture_output=True, timeout=300,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr.decode()
    assert (tmp_path / "p.espdl").read_bytes() == out.read_bytes()


def _qdq_and_streaming(tmp_path: Path) -> tuple[Path, Path]:
    fm = optimize_model(_load("models/tutorial_tcn.onnx")).model
    q = calibrate_model(fm, read_calibration_data(str(MODELS / "tutorial_tcn.calib.npy"),
                                                  model_inputs(fm)), report_samples=0).model
    qp, sp = tmp_path / "q.onnx", tmp_path / "s.onnx"
    onnx.save(q, qp)
    onnx.save(streamify_model(fm, 3).model, sp)
    return qp, sp


def _nan_data(tmp_path: Path) -> Path:
    a = np.load(MODELS / "tutorial_tcn.calib.npy")
    a[2, 3, 4] = np.nan
    np.save(tmp_path / "nan.npy", a)
    return tmp_path / "nan.npy"


TUT, TUT_CALIB = "models/tutorial_tcn.onnx", "models/tutorial_tcn.calib.npy"
BAD = [
    ("no data", [TUT], "give calibration data"),
    ("data and random", [TUT, "-d", TUT_CALIB, "--random", "4"], "not both"),
    ("chunk 0", [TUT, "-d", TUT_CALIB, "--chunk", "0"], "'--chunk': 0 is not in the range"),
    ("chunk not an int", [TUT, "-d", TUT_CALIB, "--chunk", "2.5"], "'2.5' is not a valid int"),
    ("chunk beyond the data", [TUT, "-d", TUT_CALIB, "--chunk", "48"], "chunks of 48"),
    ("chunk that cannot be checked", [TUT, "-d", TUT_CALIB, "--chunk", "5"],
     "choose a chunk that divides the data's 24 frames (1, 2, 3, 4, 6, 8, 12, 24)"),
    ("bits", [TUT, "-d", TUT_CALIB, "--bits", "4"], "'4' is not one of '8', '16'"),
    ("data of another model", [TUT, "-d", "models/kws2d.calib.npy"],
     "has shape [32, 1, 32, 10], but the model's input 'x' is [1, 16, 24]"),
    ("NaN data", [TUT, "-d", "NAN"], "sample 2: contains NaN"),
    ("quantized model", ["QDQ", "-d", TUT_CALIB], "already quantized"),
    ("streaming model", ["STREAM", "-d", TUT_CALIB], "already a streaming model"),
    ("not an onnx file", [TUT_CALIB, "-d", TUT_CALIB], "not an ONNX model"),
    ("test data and no test values", [TUT, "-d", TUT_CALIB, "--test-data", TUT_CALIB,
                                      "--no-test-values"], "not both"),
    ("random on a model with a dynamic time axis", ["DYN", "--random", "4"],
     "--random needs fixed dimensions"),
    # the data fixes the batch for calibration, but the .espdl needs it too; the fix is named
    ("data on a model with a dynamic batch", ["BATCH", "-d", "models/stream_tcn.calib.npy"],
     "graph input 'x' has shape ['batch', 16, 64]: ESP-DL needs fixed input shapes: fix them "
     "before calibrating with --input-shape x:1,16,64 (optimize and convert take it)"),
]


@pytest.mark.parametrize("case,args,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_exit_2_with_one_line_and_no_file(tmp_path, capsys, case, args, fragment):
    subs = {"NAN": lambda: _nan_data(tmp_path)}
    if "QDQ" in args or "STREAM" in args:
        q, s = _qdq_and_streaming(tmp_path)
        subs.update(QDQ=lambda: q, STREAM=lambda: s)
    if "DYN" in args:
        m = _load("models/stream_tcn.onnx")
        m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "T"
        onnx.save(m, tmp_path / "dyn.onnx")
        subs["DYN"] = lambda: tmp_path / "dyn.onnx"
    if "BATCH" in args:
        m = _load("models/stream_tcn.onnx")
        for vi in (m.graph.input[0], m.graph.output[0]):
            vi.type.tensor_type.shape.dim[0].dim_param = "batch"
        onnx.save(m, tmp_path / "batch.onnx")
        subs["BATCH"] = lambda: tmp_path / "batch.onnx"
    args = [subs[a]() if a in subs else (ROOT / a if a.startswith(("models/", "tests/")) else a)
            for a in args]
    out = tmp_path / "out" / "m.espdl"
    out.parent.mkdir()
    code, err = _main(capsys, "convert", *args, "-o", out)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[-1].startswith("espstream: error: ") and fragment in lines[-1], err
    assert not [ln for ln in lines if ln.startswith("espstream: error") or "Traceback" in ln][:-1]
    assert not any(out.parent.iterdir())  # no .espdl, no temporary file


def test_bad_input_through_the_real_command(tmp_path):
    out = tmp_path / "m.espdl"
    proc = espstream("convert", MODELS / "tutorial_tcn.onnx", "--chunk", "3", "-o", out)
    assert_user_error(proc, "give calibration data with -d/--data PATH, or --random N")
    proc = espstream("convert", MODELS / "tutorial_tcn.onnx", "--random", "2", "-o",
                     tmp_path / "missing" / "m.espdl")
    assert_user_error(proc, "does not exist")
    assert not any(tmp_path.iterdir())


def _flip_time_kernels(model: onnx.ModelProto) -> onnx.ModelProto:
    """A wrong streaming model: every conv kernel reversed along time (3-D weights)."""
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 3 and a.shape[-1] > 1:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a[..., ::-1]), t.name))
    return model


def test_broken_streaming_model_fails_after_the_summary_and_writes_nothing(
        tmp_path, capsys, monkeypatch):
    real = conv.streamify_model

    def broken(model, chunk, **kw):
        r = real(model, chunk, **kw)
        _flip_time_kernels(r.model)
        return r

    monkeypatch.setattr(conv, "streamify_model", broken)
    out, rep = tmp_path / "m.espdl", tmp_path / "r.json"
    code, err = _main(capsys, "convert", MODELS / "stream_tcn.onnx", "-d",
                      MODELS / "stream_tcn.calib.npy", "--chunk", "4", "-o", out, "--json", rep)
    assert code == 1, err
    lines = err.strip().splitlines()
    last = lines[-1]
    assert last.startswith("espstream: check failed: float: streaming == offline: chunk 4:")
    assert "fake-quant: streaming == offline" in last and f"{out} was not written" in last
    # the summary came first, with each streaming check marked
    summary = "\n".join(lines[:-1])
    assert "state memory:" in summary and "time:" in summary
    failed = [ln.split("  ")[0] for ln in lines if "FAILED" in ln and "convert:" not in ln]
    assert failed == STREAM_CHECKS[1:4]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    j = json.loads(rep.read_text())
    assert not j["ok"] and not j["written"] and "streaming == offline" in j["failure"]


def test_int8_far_from_fake_quant_fails(monkeypatch):
    """Check 5 catches an integer model that lost accuracy the fake-quant model has."""
    from espstream import verify_int8

    class Off(verify_int8.Int8Runner):
        def run(self, feeds):
            out = super().run(feeds)
            return {k: v + 0.5 * np.abs(v).max() for k, v in out.items()}

    monkeypatch.setattr(verify_int8, "Int8Runner", Off)
    r = convert_model(_load("models/kws2d.onnx"), MODELS / "kws2d.calib.npy")
    assert not r.ok
    (bad,) = [c for c in r.checks if not c.ok]
    assert bad.name == "int8 vs fake-quant" and "output 'y': int8" in bad.detail


@pytest.mark.parametrize("target", ["esp32s3", "c"])
def test_half_up_targets_pass_the_int8_check(target):
    """On the half-up targets the simulator and onnxruntime round differently (a few LSBs):
    within the margin, as documented."""
    r = convert_model(_load("models/stream_tcn.onnx"), MODELS / "stream_tcn.calib.npy",
                      target=target, verify_samples=2)
    assert r.ok, r.failure()
    agree = next(c for c in r.checks if c.name == "int8 vs fake-quant").report["agreement"]
    assert agree["outputs"][0]["max_diff_lsb"] > 0  # they do differ
    assert scheme.get_target(target).rounding == "half_up"


def test_python_api_refuses_like_the_cli():
    from espstream.errors import UserError

    m = _load("models/tutorial_tcn.onnx")
    with pytest.raises(UserError, match="not both"):
        convert_model(m)
    with pytest.raises(UserError, match="--chunk -1"):
        convert_model(m, random=2, chunk=-1)
    with pytest.raises(UserError, match="unknown target"):
        convert_model(m, random=2, target="esp32h2")


@pytest.mark.parametrize("target,bits", [
    ("esp32p4", 8),
    pytest.param("esp32p4", 16, marks=pytest.mark.slow),
    pytest.param("esp32s3", 8, marks=pytest.mark.slow),
    pytest.param("esp32s3", 16, marks=pytest.mark.slow),
    pytest.param("c", 8, marks=pytest.mark.slow),
    pytest.param("c", 16, marks=pytest.mark.slow),
])
def test_kws_gru_convert_chunk_every_target_and_width(tmp_path, target, bits):
    """`espstream convert --chunk 4` of the bundled conv + GRU keyword spotter: every check ok,
    the GRU state a recurrent pair that inspect shows (the application copies it back)."""
    out, rep = tmp_path / "k.espdl", tmp_path / "r.json"
    proc = espstream("convert", MODELS / "kws_gru.onnx", "-d", MODELS / "kws_gru.calib.npy",
                     "--chunk", "4", "--target", target, "--bits", str(bits), "-o", out,
                     "--json", rep)
    assert proc.returncode == 0, proc.stderr.decode()
    j = json.loads(rep.read_text())
    assert len(j["checks"]) == len(STREAM_CHECKS)
    assert all(c["ok"] for c in j["checks"]), j["checks"]
    exact = next(c for c in j["checks"]
                 if "(lower + simulator): streaming == offline" in c["check"])
    assert "max |err| 0 " in exact["detail"], exact["detail"]
    assert j["outputs"]["y"]["sqnr_fakequant_db"] > (30 if bits == 8 else 60)
    shown = espstream("inspect", out)
    assert shown.returncode == 0
    assert b"the application copies output /gru/GRU.h.next_state to input /gru/GRU.h.state" in (
        shown.stdout + shown.stderr), shown.stdout.decode()


def _vad_data(tmp_path: Path) -> Path:
    """vad_lstm's calibration sequences with its explicit state inputs at zero (a stream's
    start): the offline model the streaming one must equal."""
    x = np.load(MODELS / "vad_lstm.calib.npy")
    zeros = np.zeros((len(x), 1, 16), np.float32)  # [samples, *shape[1:]], as x
    path = tmp_path / "vad.npz"
    np.savez(path, x=x, h=zeros, c=zeros)
    return path


@pytest.mark.parametrize("target,bits", [
    ("esp32s3", 8),
    pytest.param("esp32p4", 8, marks=pytest.mark.slow),
    pytest.param("esp32p4", 16, marks=pytest.mark.slow),
    pytest.param("esp32s3", 16, marks=pytest.mark.slow),
    pytest.param("c", 8, marks=pytest.mark.slow),
    pytest.param("c", 16, marks=pytest.mark.slow),
])
def test_vad_lstm_explicit_state_convert_chunk(tmp_path, target, bits):
    """`espstream convert --chunk 4` of the bundled LSTM VAD with explicit h / c inputs and hn /
    cn outputs: the model's own (h, hn), (c, cn) become the recurrent state pairs (no new state
    names), every check ok, int exact against offline with the state fed back."""
    out, rep = tmp_path / "v.espdl", tmp_path / "r.json"
    proc = espstream("convert", MODELS / "vad_lstm.onnx", "-d", _vad_data(tmp_path),
                     "--chunk", "4", "--target", target, "--bits", str(bits), "-o", out,
                     "--json", rep)
    assert proc.returncode == 0, proc.stderr.decode()
    j = json.loads(rep.read_text())
    assert len(j["checks"]) == len(STREAM_CHECKS) and all(c["ok"] for c in j["checks"]), (
        j["checks"])
    exact = next(c for c in j["checks"]
                 if "(lower + simulator): streaming == offline" in c["check"])
    assert "y max |err| 0 " in exact["detail"], exact["detail"]
    assert j["outputs"]["y"]["sqnr_fakequant_db"] > (30 if bits == 8 else 60)
    g = read(out.read_bytes())
    pairs = {(p["input"], p["output"]) for p in
             json.loads(g.metadata["espstream.recurrent_states"])}
    assert pairs == {("h", "hn"), ("c", "cn")}
    shown = espstream("inspect", out)
    text = (shown.stdout + shown.stderr).decode()
    assert "copies output hn to input h" in text and "copies output cn to input c" in text


def test_vad_lstm_states_filled_by_input_value_equal_the_npz(tmp_path):
    """`-d x.npy --input-value h=0 --input-value c=0` (the states at a stream's start, not in
    the data) writes the same file as the .npz that holds those zeros."""
    files = []
    for i, data in enumerate((["-d", _vad_data(tmp_path)],
                              ["-d", MODELS / "vad_lstm.calib.npy", "--input-value", "h=0",
                               "--input-value", "c=0"])):
        out = tmp_path / f"v{i}.espdl"
        proc = espstream("convert", MODELS / "vad_lstm.onnx", *data, "--chunk", "4", "-o", out,
                         "-q")
        assert proc.returncode == 0, proc.stderr.decode()
        files.append(out.read_bytes())
    assert files[0] == files[1]


@pytest.mark.parametrize("stage", ["convert", "calibrate"])
def test_input_value_with_data_bad_names(tmp_path, stage):
    """-d with --input-value: an unknown name, or every input named, is one line, no file."""
    out = tmp_path / ("v.espdl" if stage == "convert" else "q.onnx")
    npy = MODELS / "vad_lstm.calib.npy"
    for values, fragment in ((["z=0"], "--input-value z: the model has no input 'z'"),
                             (["x=0", "h=0", "c=0"], "names every input of the model")):
        flags = [a for v in values for a in ("--input-value", v)]
        assert_user_error(espstream(stage, MODELS / "vad_lstm.onnx", "-d", npy, *flags,
                                    "-o", out), fragment)
        assert not out.exists()


def test_vad_lstm_explicit_state_stage_by_stage_cli(tmp_path):
    """Issue 14 item 5b on the command line, the explicit h / c of vad_lstm carried through:
    (1) as a hand-written streaming model (32 frames a call): calibrate --state h:hn --state
    c:cn on longer sequences, export, verify of its test values; (2) as an offline model:
    calibrate, streamify --chunk 4, verify QDQ vs streaming (int8 engine), export both, and
    verify OFFLINE.espdl STREAMING.espdl, every output (y, hn, cn) exact."""
    t = tmp_path
    opt = t / "o.onnx"
    assert espstream("optimize", MODELS / "vad_lstm.onnx", "-o", opt).returncode == 0
    seqs = t / "seqs.npz"
    np.savez(seqs, x=np.random.default_rng(7).standard_normal((8, 16, 128)).astype(np.float32))
    steps = [
        ["calibrate", opt, "-d", seqs, "--state", "h:hn", "--state", "c:cn", "-o", t / "hq.onnx"],
        ["export", t / "hq.onnx", "-o", t / "h.espdl", "--test-random"],
        ["verify", t / "h.espdl"],
        ["calibrate", opt, "-d", _vad_data(t), "-o", t / "q.onnx"],
        ["streamify", t / "q.onnx", "--chunk", "4", "-o", t / "qs.onnx"],
        ["verify", t / "q.onnx", t / "qs.onnx", "-d", _vad_data(t), "--engine", "int8",
         "--json", t / "v.json"],
        ["export", t / "q.onnx", "-o", t / "off.espdl"],
        ["export", t / "qs.onnx", "-o", t / "st.espdl"],
        ["verify", t / "off.espdl", t / "st.espdl", "--random", "3", "--json", t / "p.json"],
    ]
    for args in steps:
        proc = espstream(*args)
        assert proc.returncode == 0, (args[0], proc.stderr.decode()[-2000:])
    shown = (lambda p: (p.stdout + p.stderr).decode())(espstream("inspect", t / "h.espdl"))
    assert "copies output hn to input h" in shown and "copies output cn to input c" in shown
    for rep in ("v.json", "p.json"):
        j = json.loads((t / rep).read_text())
        outs = {o["output"]: o for r in j["runs"] for o in r["outputs"]}
        assert set(outs) == {"y", "hn", "cn"}, outs
        assert all(o["ok"] and o["compared"] and o["max_abs_error"] == 0
                   for o in outs.values()), outs

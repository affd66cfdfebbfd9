"""`convert --offline-too` (espstream/offline_pair.py): the offline and streaming files as ESP-DL's
streaming tutorial (`app_main.cpp`) uses them, its loop replayed here in the simulator: the
offline test input cut into `get_bytes()`-sized chunks, the streaming model's last output
compared with the offline output's trailing bytes and exponent (`TensorBase::equal`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_util import assert_user_error, espstream

from espstream import offline_pair
from espstream.convert import convert_model, offline_path
from espstream.errors import UserError
from espstream.espdl import read
from espstream.sim import Simulator

ROOT = Path(__file__).resolve().parents[1]


def tutorial_loop(off_bytes: bytes, st_bytes: bytes) -> tuple[bool, int]:
    """app_main.cpp's comparison: (equal, number of chunks)."""
    off, st = read(off_bytes), read(st_bytes)
    [name] = [v.name for v in off.inputs]
    x = off.test_inputs[name].data
    y_off = Simulator(off).run({name: x})
    st_in = st.inputs[0]
    flat = np.ascontiguousarray(x).reshape(-1)
    size = int(np.prod(st_in.shape))
    chunks = flat.size // size
    sim = Simulator(st)
    for k in range(chunks):  # memcpy(model_input_ptr, test_input_ptr + i * size, size)
        out = sim.run({name: flat[k * size:(k + 1) * size].reshape(st_in.shape)})
    [oname] = [v.name for v in off.outputs]
    last = out[oname].reshape(-1)
    tail = np.ascontiguousarray(y_off[oname]).reshape(-1)[-last.size:]
    same_exp = off.value_info(oname).exponents == st.value_info(oname).exponents
    return bool(same_exp and np.array_equal(last, tail)), chunks


@pytest.mark.parametrize(("model", "chunk"), [("tutorial_tcn", 3), ("stream_tcn", 4)])
def test_offline_too_pair_passes_the_tutorial_loop(model, chunk, tmp_path):
    out = tmp_path / "m.espdl"
    proc = espstream("convert", ROOT / "models" / f"{model}.onnx", "-d",
                     ROOT / "models" / f"{model}.calib.npy", "--chunk", chunk, "--offline-too",
                     "-o", out, "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr.decode()
    off = Path(offline_path(str(out)))
    assert off.name == "m.offline.espdl" and off.exists()
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["offline_pair"]["ok"] and "offline pair" in [c["check"] for c in rep["checks"]]
    equal, chunks = tutorial_loop(off.read_bytes(), out.read_bytes())
    assert equal and chunks > 1
    a, b = read(off.read_bytes()), read(out.read_bytes())
    assert [v.exponents for v in a.inputs + a.outputs] == \
        [v.exponents for v in b.inputs + b.outputs]
    proc = espstream("verify", off, out)
    assert proc.returncode == 0, proc.stderr.decode()


def test_delay_is_stated_and_recorded(tmp_path):
    """A lookahead conv: delay 2 in the summary and in espstream.delay; the tutorial's
    last-chunk byte comparison does not hold then, which is what the note warns about."""
    from stream_graphs import G

    g = G(channels=3, frames=24, seed=5)
    y = g.conv(g.conv("x", 3, k=3, left=0, right=2), 3, k=3)
    src, out = tmp_path / "look.onnx", tmp_path / "look.espdl"
    onnx.save(g.model(y), src)
    proc = espstream("convert", src, "--random", "4", "--chunk", "4", "--offline-too", "-o", out)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "is delayed by 2 frame(s): the application skips the first 2 streamed frames" in err
    st = read(out.read_bytes())
    assert offline_pair.delays(st) == {st.outputs[0].name: 2}
    equal, _ = tutorial_loop(Path(offline_path(str(out))).read_bytes(), out.read_bytes())
    assert not equal


def test_splittable_refuses_what_the_loop_cannot_cut():
    r = convert_model(onnx.load(ROOT / "models" / "tutorial_tcn.onnx"),
                      ROOT / "models" / "tutorial_tcn.calib.npy", chunk=3, offline_too=True)
    assert r.ok, r.failure()
    off, st = r.offline.graph, r.exported.graph
    assert offline_pair.splittable(off, st)[0]
    t = off.test_inputs[off.inputs[0].name]
    t.data = t.data[:, :-1]  # one frame short of a whole number of chunks
    ok, why = offline_pair.splittable(off, st)
    assert not ok and "not a whole number of chunks of 3" in why
    st.outputs[0].exponents = [st.outputs[0].exponents[0] + 1]
    ok, why = offline_pair.shared_exponents(off, st)
    assert not ok and "exponents differ" in why


def test_offline_too_refusals(tmp_path):
    m = onnx.load(ROOT / "models" / "tutorial_tcn.onnx")
    with pytest.raises(UserError, match="give --chunk N"):
        convert_model(m, random=2, offline_too=True)
    with pytest.raises(UserError, match="drop --no-test-values"):
        convert_model(m, random=2, chunk=3, offline_too=True, test_data=None)
    assert_user_error(espstream("convert", ROOT / "models" / "tutorial_tcn.onnx", "--random",
                                "2", "--chunk", "3", "--offline-too", "-o", "-"),
                      "not stdout")

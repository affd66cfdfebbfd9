"""ESP-DL 3.3's targets (espstream/targets.py): the names, their arithmetic, and which target a
file is simulated for (given, recorded, or told by the layout only where it leaves one).

ESP-DL's own streaming tutorial files (tests/data/espdl-tutorial, copied from the ESP-DL
v3.3.9 mirror, examples/tutorial/how_to_deploy_streaming_model/test_streaming_model/main/
models/<target>/) record no target and both have blocked per-tensor filters: they must be
given their target, and with it pass (offline test values, and streaming vs offline).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_util import assert_user_error, espstream

from espstream import targets
from espstream.errors import UserError
from espstream.espdl import read, write
from espstream.intgraph import IntGraph, Node, Tensor, ValueInfo
from espstream.sim import Simulator

TUTORIAL = Path(__file__).parent / "data" / "espdl-tutorial"
PPQ = Path(__file__).parent / "data" / "esp-ppq"


def test_every_esp_dl_target_maps_onto_one_arithmetic():
    want = {"esp32p4": "esp32p4", "esp32s31": "esp32p4", "esp32s3": "esp32s3", "esp32": "c",
            "esp32s2": "c", "esp32c2": "c", "esp32c3": "c", "esp32c5": "c", "esp32c6": "c",
            "c": "c"}
    assert {n: targets.arithmetic(n) for n in targets.NAMES} == want
    assert targets.chip("esp32s31").rounding == "half_even" and targets.chip("esp32s31").isa \
        == "PIE v2"
    assert targets.chip("esp32s3").rounding == "half_up" and not targets.chip("esp32s3").per_channel
    assert {targets.chip(n).layout for n in ("esp32", "esp32c6")} == {"plain"}
    with pytest.raises(UserError, match="unknown target 'esp32h2'"):
        targets.arithmetic("esp32h2")


def test_simulator_accepts_esp_dl_names():
    """esp32s31 rounds like esp32p4, esp32c3 like c: a tie (3 >> 1 = 1.5) tells them apart."""
    g = IntGraph("r", nodes=[Node("RequantizeLinear", "rq", ["x"], ["y"])],
                 inputs=[ValueInfo("x", np.dtype(np.int8), [1, 2], [0])],
                 outputs=[ValueInfo("y", np.dtype(np.int8), [1, 2], [1])])
    g.value_infos = {v.name: v for v in g.inputs + g.outputs}
    x = np.array([[3, 5]], np.int8)  # 1.5 -> 2 (even / up), 2.5 -> 2 (even) or 3 (up)
    assert Simulator(g, target="esp32s31").run({"x": x})["y"].tolist() == [[2, 2]]
    assert Simulator(g, target="esp32c3").run({"x": x})["y"].tolist() == [[2, 3]]


def _graph_with_filter(per_channel: bool, blocked: bool) -> IntGraph:
    from espstream.espdl import layout

    w = np.ones((1, 2, 16), np.int8)
    node = Node("Conv", "c", ["x", "w"], ["y"], {"group": 1, "quant_type": "S8"})
    use = layout.filter_uses([node], {"w": Tensor("w", w)})["w"]
    doc = layout.LAYOUT_PREFIX + layout.filter_layout("esp32p4" if blocked else "c", w.shape,
                                                      use)
    g = IntGraph("f", nodes=[node], target="esp32p4" if blocked else "c")
    g.initializers["w"] = Tensor("w", w, [0] * 16 if per_channel else [0], doc)
    return g


@pytest.mark.parametrize(("per_channel", "blocked", "guess"), [
    (True, True, "esp32p4"), (False, False, "c"), (False, True, None)])
def test_the_layout_tells_only_where_one_arithmetic_fits(per_channel, blocked, guess):
    g = read(write(_graph_with_filter(per_channel, blocked)))
    assert g.target == guess
    if guess is None:
        with pytest.raises(UserError, match="give --target esp32s3 or --target esp32p4"):
            targets.resolve(g)
        assert targets.resolve(g, "esp32s3").reason == "given with --target"
    else:
        r = targets.resolve(g)
        assert r.target == guess and r.reason.startswith("guessed from the layout")
    if blocked:  # the plain C path cannot read blocked filters
        with pytest.raises(UserError, match="--target esp32c6: .* cannot be for it"):
            targets.resolve(g, "esp32c6")
    else:
        with pytest.raises(UserError, match="cannot be for it"):
            targets.resolve(g, "esp32s31")


def test_recorded_target_wins_and_contradictions_are_refused():
    g = _graph_with_filter(False, True)
    g.metadata["espstream.target"] = "esp32s31"
    back = read(write(g))
    r = targets.resolve(back)
    assert back.target == r.target == "esp32s31" and "recorded" in r.reason
    assert targets.resolve(back, "esp32p4").target == "esp32p4"  # same arithmetic
    with pytest.raises(UserError, match="records target esp32s31"):
        targets.resolve(back, "esp32s3")
    g.metadata["espstream.target"] = "esp32c3"  # plain-C target on blocked filters
    with pytest.raises(UserError, match="records target esp32c3, but its filters are blocked"):
        read(write(g))


def test_own_exports_record_their_target(tmp_path):
    """espstream's exports carry espstream.target, so no guess is needed even for S3."""
    from test_export import fixture_qdq

    from espstream.export import export_model

    data = export_model(fixture_qdq("tutorial_tcn", "esp32s3"), test_random=True).data
    g = read(data)
    assert g.metadata["espstream.target"] == "esp32s3" and g.target == "esp32s3"
    p = tmp_path / "m.espdl"
    p.write_bytes(data)
    proc = espstream("verify", p)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "target esp32s3 (PIE v1, ties up): recorded in the file" in proc.stderr.decode()


# ---- ESP-DL's streaming tutorial files --------------------------------------------------------


@pytest.mark.parametrize("target", ["esp32p4", "esp32s3"])
def test_tutorial_offline_file_passes_on_its_target(target, tmp_path):
    path = TUTORIAL / target / "model.espdl"
    rep = tmp_path / "v.json"
    proc = espstream("verify", path, "--target", target, "--json", rep)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert f"target {target} (" in err and "given with --target" in err
    report = json.loads(rep.read_text())
    assert report["ok"] and report["target"] == target
    [out] = report["outputs"]
    assert out["identical"] == out["elements"] == 16


@pytest.mark.parametrize("target", ["esp32p4", "esp32s3"])
def test_tutorial_pair_passes_on_its_target(target, tmp_path):
    d = TUTORIAL / target
    rep = tmp_path / "v.json"
    proc = espstream("verify", d / "model.espdl", d / "streaming_model.espdl", "--target",
                     target, "--json", rep)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert f"target {target} (" in err
    report = json.loads(rep.read_text())
    assert report["ok"] and report["target_choice"]["target"] == target
    [run] = report["runs"]
    assert run["chunk"] == 3 and run["frames"] == 24


def test_tutorial_p4_file_fails_as_s3_and_is_not_guessed():
    """The issue's report: read as esp32s3, 5 of the P4 file's 16 values are 1 LSB off."""
    path = TUTORIAL / "esp32p4" / "model.espdl"
    proc = espstream("verify", path, "--target", "esp32s3")
    assert proc.returncode == 1
    assert "5 of 16 values differ" in proc.stderr.decode()
    assert_user_error(espstream("verify", path), "does not record its target",
                      "give --target esp32s3 or --target esp32p4")
    assert_user_error(espstream("verify", path, "--target", "esp32c3"), "cannot be for it")


def test_pair_takes_the_target_one_file_tells():
    """A streaming file may be told by the other file of its pair."""
    off = read((PPQ / "tutorial_tcn" / "c" / "offline.espdl").read_bytes())
    st = read((PPQ / "tutorial_tcn" / "c" / "streaming.espdl").read_bytes())
    r = targets.resolve_pair(off, st, None)
    assert r.target == "c"
    s3 = read((TUTORIAL / "esp32s3" / "model.espdl").read_bytes())
    with pytest.raises(UserError, match="cannot be for it"):
        targets.resolve_pair(off, s3, None)


def test_inspect_states_the_target(tmp_path):
    path = TUTORIAL / "esp32p4" / "streaming_model.espdl"
    proc = espstream("inspect", path, "--target", "esp32p4", "--json", tmp_path / "i.json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "target esp32p4 (PIE v2, ties to even): given with --target" in proc.stderr.decode()
    proc = espstream("inspect", path, "--json", tmp_path / "j.json")
    assert proc.returncode == 0
    info = json.loads((tmp_path / "j.json").read_text())
    assert info["target"] is None and "give --target" in info["target_choice"]["reason"]


@pytest.mark.parametrize(("name", "layout_of", "per_channel"), [
    ("esp32s31", ("esp32p4",), True), ("esp32c3", ("c",), False)])
def test_convert_for_an_esp_dl_name_records_it(name, layout_of, per_channel, tmp_path):
    """calibrate / export take any ESP-DL name: its arithmetic decides, the name is recorded."""
    import onnx

    from espstream.convert import convert_model

    root = Path(__file__).resolve().parents[1]
    r = convert_model(onnx.load(root / "models" / "tutorial_tcn.onnx"),
                      root / "models" / "tutorial_tcn.calib.npy", chunk=3, target=name)
    assert r.ok, r.failure()
    g = read(r.data)
    assert g.metadata["espstream.target"] == name == g.target
    assert g.layout_targets == layout_of
    assert any(len(t.exponents) > 1 for t in g.initializers.values()) == per_channel
    p = tmp_path / "m.espdl"
    p.write_bytes(r.data)
    proc = espstream("verify", p)
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"target {name} (" in proc.stderr.decode()

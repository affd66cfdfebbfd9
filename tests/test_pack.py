"""`espstream pack` against ESP-DL's own packer: the bytes in tests/data/pack/ were written by
`esp-dl/fbs_loader/pack_espdl_models.py` (tools/make_pack_fixtures.sh; the script is not run
here), and espstream must write the same bytes for the same inputs; packed files are then read
by inspect / verify / the simulator, SHA-256 checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cli_util import assert_user_error, espstream

from espstream.errors import UserError
from espstream.espdl import pack as packing
from espstream.espdl import read

DATA = Path(__file__).parent / "data"
PACK = DATA / "pack"
P4 = DATA / "espdl-tutorial" / "esp32p4"
OFF, ST = P4 / "model.espdl", P4 / "streaming_model.espdl"

# (fixture, inputs, extra `espstream pack` options): what the script was run with
CASES = [
    ("tutorial.pdl3.espdl", [ST, OFF], []),
    ("tutorial.pdl2.espdl", [ST, OFF], ["--format", "pdl2"]),
    ("single.pdl3.espdl", [OFF], []),
    ("odd_v.pdl3.espdl", [PACK / "in" / "odd.espdl", OFF],
     ["--package-version", "espstream-1.2"]),
    ("old.pdl1.espdl", [PACK / "in" / "b_old.espdl", PACK / "in" / "a_old.espdl"],
     ["--format", "pdl1"]),
]


@pytest.mark.parametrize(("fixture", "inputs", "opts"), CASES, ids=[c[0] for c in CASES])
def test_cli_pack_equals_esp_dl_packer(fixture, inputs, opts, tmp_path):
    out = tmp_path / "models.espdl"
    proc = espstream("pack", *inputs, "-o", out, *opts)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == (PACK / fixture).read_bytes()


def test_pdl3_layout_by_hand():
    """The fields of the script's PDL3 file, read independently of espstream's reader."""
    import struct

    b = (PACK / "tutorial.pdl3.espdl").read_bytes()
    assert b[:4] == b"PDL3" and b[4:20] == b"v1.0" + b"\0" * 12
    size, = struct.unpack_from("<I", b, 20)
    assert size == len(b)
    zeroed = b[:24] + b"\0" * 32 + b[56:]
    assert hashlib.sha256(zeroed).digest() == b[24:56]
    n, = struct.unpack_from("<I", b, 56)
    entries = [struct.unpack_from("<III", b, 60 + 12 * i) for i in range(n)]
    names = [b[o:o + k].decode() for _, o, k in entries]
    assert names == ["model.espdl", "streaming_model.espdl"]  # sorted by path, as given
    assert b[entries[0][0]:entries[0][0] + OFF.stat().st_size] == OFF.read_bytes()
    assert all(d % 16 == 0 for d, _, _ in entries)


def test_unpack_members_are_the_inputs():
    pkg = packing.unpack((PACK / "tutorial.pdl3.espdl").read_bytes())
    assert pkg.format == "pdl3" and pkg.version == "v1.0"
    assert [m.data for m in pkg.members] == [OFF.read_bytes(), ST.read_bytes()]
    pkg2 = packing.unpack((PACK / "tutorial.pdl2.espdl").read_bytes())
    assert pkg2.format == "pdl2" and pkg2.version is None and pkg2.names == pkg.names
    odd = packing.unpack((PACK / "odd_v.pdl3.espdl").read_bytes()).member("odd.espdl")
    assert odd.data == (PACK / "in" / "odd.espdl").read_bytes() + b"\0" * 11  # padded to 64


def test_read_and_simulate_a_member():
    data = (PACK / "tutorial.pdl3.espdl").read_bytes()
    g = read(data, model="model.espdl")
    assert g == read(OFF.read_bytes())
    with pytest.raises(UserError, match="holds 2 models: model.espdl, streaming_model.espdl"):
        read(data)
    with pytest.raises(UserError, match="no model of that name"):
        read(data, model="nope")
    one = read((PACK / "single.pdl3.espdl").read_bytes())  # one member: no name needed
    assert one == g
    from espstream.sim import load

    sim = load(PACK / "tutorial.pdl3.espdl", target="esp32p4", model="model.espdl")
    out = sim.run({n: t.data for n, t in g.test_inputs.items()})
    assert (out["164"] == g.test_outputs["164"].data).all()


def test_cli_verify_and_inspect_packed(tmp_path):
    pk = PACK / "tutorial.pdl3.espdl"
    proc = espstream("verify", pk, pk, "--model", "model.espdl", "--model",
                     "streaming_model.espdl", "--target", "esp32p4")
    assert proc.returncode == 0, proc.stderr.decode()
    proc = espstream("verify", pk, "--model", "model.espdl", "--target", "esp32p4")
    assert proc.returncode == 0, proc.stderr.decode()
    proc = espstream("inspect", pk, "--model", "streaming_model.espdl", "--json",
                     tmp_path / "i.json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "packed PDL3 version v1.0, SHA-256 ok, 2 model(s)" in proc.stderr.decode()
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["member"] == "streaming_model.espdl"
    assert info["package"]["sha256"] == pk.read_bytes()[24:56].hex()
    assert_user_error(espstream("verify", pk, "--target", "esp32p4"), "holds 2 models",
                      "--model NAME")
    proc = espstream("inspect", pk, "--json", tmp_path / "p.json")  # no --model: the members
    assert proc.returncode == 0, proc.stderr.decode()
    assert "show one model with --model NAME" in proc.stderr.decode()
    info = json.loads((tmp_path / "p.json").read_text())
    assert info["format"] == "espdl-package"
    assert [m["name"] for m in info["package"]["models"]] == ["model.espdl",
                                                              "streaming_model.espdl"]
    assert_user_error(espstream("inspect", OFF, "--model", "x"), "a single model")


def test_names_and_refusals(tmp_path):
    data, names = packing.pack_files([str(OFF), str(ST)], ["b", "a"])
    assert names == ["b", "a"]  # names follow their files; order stays the sorted paths
    assert packing.unpack(data).names == ["b", "a"]
    with pytest.raises(UserError, match="called 'x'"):
        packing.pack_files([str(OFF), str(ST)], ["x", "x"])
    with pytest.raises(UserError, match="ASCII"):
        packing.pack_files([str(OFF)], ["modèle"])
    with pytest.raises(UserError, match="one name per file"):
        packing.pack_files([str(OFF), str(ST)], ["x"])
    with pytest.raises(UserError, match="--format pdl1: it packs EDL1 files"):
        packing.pack_files([str(OFF)], fmt="pdl1")
    with pytest.raises(UserError, match="at most 15"):
        packing.pack_files([str(OFF)], version="v" * 16)
    out = tmp_path / "o.espdl"
    assert_user_error(espstream("pack", PACK / "tutorial.pdl3.espdl", "-o", out),
                      "is itself a packed file")
    assert not out.exists()


def test_corrupt_packages_are_one_error():
    good = (PACK / "tutorial.pdl3.espdl").read_bytes()
    flipped = bytearray(good)
    flipped[5000] ^= 1
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        packing.unpack(bytes(flipped))
    with pytest.raises(UserError, match="shorter than its 60-byte header"):
        packing.unpack(good[:40])
    with pytest.raises(UserError, match="truncated PDL3 file: package_size"):
        packing.unpack(good[:-16])
    with pytest.raises(UserError, match="truncated packed file"):
        packing.unpack((PACK / "tutorial.pdl2.espdl").read_bytes()[:30000])


def _mutations():
    from hypothesis import strategies as st

    return st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1,
                    max_size=6)


@pytest.mark.parametrize("fixture", ["tutorial.pdl2.espdl", "old.pdl1.espdl"])
def test_mutated_headers_are_user_errors(fixture):
    """Byte changes in the header and entry table of a package without a digest: unpack and
    read either succeed or raise UserError, nothing else (hypothesis)."""
    from hypothesis import given, settings

    base = (PACK / fixture).read_bytes()

    @settings(max_examples=150, deadline=None)
    @given(_mutations())
    def run(changes):
        b = bytearray(base)
        for at, v in changes:
            if at < len(b):
                b[at] = v
        try:
            pkg = packing.unpack(bytes(b))
            for m in pkg.members:
                if pkg.format != "pdl1":
                    read(bytes(b), model=m.name)
        except UserError:
            pass

    run()

"""Encrypted .espdl files (ESP-DL mode 1, espstream/espdl/crypt.py) against ESP-PPQ's writer:
tests/data/encrypted/model.enc.espdl is ESP-DL's esp32p4 tutorial model encrypted by ESP-PPQ
1.3.12's own `helper.save(..., encrypt_data=True)`, with the key it printed
(tools/make_crypt_fixture.py made both once; ESP-PPQ is not imported here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_util import assert_user_error, espstream

from espstream.errors import UserError
from espstream.espdl import crypt, read

DATA = Path(__file__).parent / "data"
ENC = DATA / "encrypted" / "model.enc.espdl"
KEY_TEXT = DATA / "encrypted" / "model.key.txt"
PLAIN = DATA / "espdl-tutorial" / "esp32p4" / "model.espdl"


def test_esp_ppq_file_decrypts_to_the_model():
    key = crypt.parse_key(KEY_TEXT.read_bytes())
    assert len(key) == 16 and key[:2] == b"\x85\x6a"
    enc = ENC.read_bytes()
    assert enc[:4] == b"EDL2" and enc[4:8] == b"\x01\0\0\0"
    assert enc[16:64] != PLAIN.read_bytes()[16:64]  # really encrypted
    assert crypt.decrypt(enc, key) == PLAIN.read_bytes()
    assert read(enc, key=key) == read(PLAIN.read_bytes())


def test_our_encryption_equals_esp_ppq_bytes():
    key = crypt.parse_key(KEY_TEXT.read_bytes())
    assert crypt.encrypt(PLAIN.read_bytes(), key) == ENC.read_bytes()


def test_cli_verify_and_inspect_with_the_key(tmp_path):
    proc = espstream("verify", ENC, "--key", KEY_TEXT, "--target", "esp32p4")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "100.0%" in proc.stderr.decode()
    proc = espstream("inspect", ENC, "--key", KEY_TEXT, "--json", tmp_path / "i.json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "mode 1 (encrypted, decrypted with the key)" in proc.stderr.decode()
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["encrypted"] is True and info["header"]["mode"] == 1
    assert_user_error(espstream("inspect", ENC), "is encrypted", "--key KEYFILE")
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(bytes(16))
    assert_user_error(espstream("verify", ENC, "--key", wrong, "--target", "esp32p4"),
                      "wrong key")


def test_wrong_keys_never_give_a_model():
    enc = ENC.read_bytes()
    rng = np.random.default_rng(3)
    for _ in range(30):
        key = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        with pytest.raises(UserError, match="wrong key"):
            read(enc, key=key)


@pytest.mark.parametrize("text", [
    bytes(range(16)),
    b"000102030405060708090a0b0c0d0e0f\n",
    b"0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, "
    b"0x0e, 0x0f,\n",
    b"{0x00,0x01,0x02,0x03,0x04,0x05,0x06,0x07,0x08,0x09,0x0a,0x0b,0x0c,0x0d,0x0e,0x0f}",
])
def test_key_file_forms(text):
    assert crypt.parse_key(text) == bytes(range(16))


@pytest.mark.parametrize("text", [b"", bytes(15), b"00" * 15, b"0x01, 0x02", b"0x00, " * 17,
                                  b"hello 0x00" + b", 0x00" * 15])
def test_not_a_key(text):
    with pytest.raises(UserError, match="not an AES-128 key"):
        crypt.parse_key(text)


def test_export_encrypt_round_trip_and_pack(tmp_path):
    """export --encrypt-key writes mode 1; inspect / verify read it with the key; pack keeps an
    encrypted member as it is and verify reads it from the package with --model and --key."""
    import onnx
    from test_export import fixture_qdq

    q = tmp_path / "m.qdq.onnx"
    onnx.save(fixture_qdq("tutorial_tcn", "esp32s3"), q)
    key = tmp_path / "k.key"
    key.write_text("00112233445566778899aabbccddeeff\n")
    enc, plain = tmp_path / "m.espdl", tmp_path / "p.espdl"
    proc = espstream("export", q, "-o", enc, "--encrypt-key", key, "--test-random", "--name",
                     "m")
    assert proc.returncode == 0, proc.stderr.decode()
    assert espstream("export", q, "-o", plain, "--test-random", "--name", "m").returncode == 0
    e, p = enc.read_bytes(), plain.read_bytes()
    assert e[4:8] == b"\x01\0\0\0" and len(e) == len(p) and e[16:] != p[16:]
    assert crypt.decrypt(e, bytes.fromhex("00112233445566778899aabbccddeeff")) == p
    proc = espstream("verify", enc, "--key", key)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "recorded in the file" in proc.stderr.decode()  # the target is inside the payload
    assert_user_error(espstream("verify", enc), "is encrypted")
    pk = tmp_path / "both.espdl"
    assert espstream("pack", enc, plain, "-o", pk).returncode == 0
    proc = espstream("verify", pk, "--model", "m.espdl", "--key", key)
    assert proc.returncode == 0, proc.stderr.decode()
    assert_user_error(espstream("verify", pk, "--model", "m.espdl"), "model 'm.espdl'",
                      "is encrypted")
    assert espstream("verify", pk, "--model", "p.espdl").returncode == 0
    cpp = tmp_path / "cpp"
    cpp.mkdir()
    assert_user_error(espstream("export", q, "--format", "cpp", "-o", cpp, "--encrypt-key",
                                key), "--encrypt-key encrypts .espdl files")
    assert list(cpp.iterdir()) == []

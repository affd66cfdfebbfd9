"""ESP-DL's encrypted `.espdl` files (header mode 1), written and read as its loader reads them.

The scheme (ESP-DL v3.3.9 `esp-dl/fbs_loader/src/fbs_loader.cpp` `fbs_aes_crypt_ctr`, ESP-PPQ
1.3.12 `esp_ppq/parser/espdl/helper.py` `aes_encryptor` / `save`):

1. AES-128 in CTR mode; the key is 16 bytes, given to `dl::Model` / `FbsLoader::load` at run
   time; the initial counter block is fixed: bytes 0x10, 0x11, ..., 0x1F.
2. What is encrypted: the FlatBuffers payload only, `length` bytes (the header's length
   field) starting after the 16-byte EDL2 header. The header stays plain, with mode = 1; the
   zero padding espstream adds after the payload (to a multiple of 16) is not encrypted and
   the loader does not read it.
3. CTR has no integrity check: a wrong key decrypts to noise. espstream therefore checks the
   decrypted payload with the FlatBuffers verifier and reports a failure as a wrong key, one
   error, never a model made of noise.

Key files (`--encrypt-key` / `--key`): 16 raw bytes, or text holding the key as 32 hex
digits, or as the C array ESP-PPQ prints (`0x01, 0x23, ...`, 16 values).
"""

from __future__ import annotations

import re
import struct

from espstream.errors import UserError

NONCE = bytes(range(0x10, 0x20))
KEY_BYTES = 16
_HEADER = struct.Struct("<4sIII")


def _ctr(data: bytes, key: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    c = Cipher(algorithms.AES(key), modes.CTR(NONCE)).encryptor()  # CTR: the same both ways
    return c.update(data) + c.finalize()


def parse_key(raw: bytes, label: str = "key file") -> bytes:
    """The 16-byte key a key file holds (module docstring)."""
    if len(raw) == KEY_BYTES:
        return bytes(raw)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is not None:
        items = re.findall(r"0[xX]([0-9a-fA-F]{1,2})", text)
        if len(items) == KEY_BYTES and not re.sub(r"0[xX][0-9a-fA-F]{1,2}|[\s,{}]", "", text):
            return bytes(int(h, 16) for h in items)
        compact = re.sub(r"\s", "", text)
        if re.fullmatch(r"[0-9a-fA-F]{32}", compact):
            return bytes.fromhex(compact)
    raise UserError(f"{label}: not an AES-128 key; give 16 raw bytes, 32 hex digits or "
                    "16 values like 0x1f, 0x2e, ... (ESP-PPQ's printout)")


def read_key(path: str) -> bytes:
    from espstream.modelio import read_bytes

    return parse_key(read_bytes(path, "key file"), path)


def is_encrypted(data: bytes) -> bool:
    return len(data) >= 16 and bytes(data[:4]) == b"EDL2" and struct.unpack_from(
        "<I", data, 4)[0] == 1


def encrypt(edl2: bytes, key: bytes) -> bytes:
    """A plain EDL2 file -> the same file encrypted (mode 1) with `key`."""
    magic, mode, length, zero = _HEADER.unpack_from(edl2, 0)
    if magic != b"EDL2" or mode != 0:
        raise UserError("only a plain (mode 0) EDL2 file can be encrypted")
    body = bytes(edl2[16:16 + length])
    pad = b"\0" * (-length % 16)
    return _HEADER.pack(magic, 1, length, zero) + _ctr(body, key) + pad


def decrypt(edl2: bytes, key: bytes | None, label: str = "the file") -> bytes:
    """An encrypted (mode 1) EDL2 file -> the plain (mode 0) file, checked (rule 3)."""
    from espstream.espdl.verifier import verify

    if key is None:
        raise UserError(f"{label} is encrypted (ESP-DL mode 1, AES-128-CTR); give its key "
                        "with --key KEYFILE")
    if len(data := bytes(edl2)) < 16:
        raise UserError(f"{label}: truncated .espdl header")
    magic, mode, length, zero = _HEADER.unpack_from(data, 0)
    if 16 + length > len(data):
        raise UserError(f"truncated .espdl file: the header announces a {length}-byte payload, "
                        f"the file holds {len(data) - 16} bytes after the header")
    plain = _ctr(data[16:16 + length], key)
    try:
        verify(plain)
    except (UserError, struct.error, IndexError, ValueError, OverflowError):
        raise UserError(f"{label}: wrong key: the decrypted payload is not an ESP-DL model "
                        "(AES-CTR cannot tell a wrong key otherwise)") from None
    return _HEADER.pack(magic, 0, length, zero) + plain + data[16 + length:]

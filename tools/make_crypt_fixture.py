"""Make tests/data/encrypted/: ESP-PPQ 1.3.12's own encrypted .espdl (its `helper.save` with
encrypt_data=True, the writer `espdl_exporter` calls) of ESP-DL's esp32p4 tutorial model, and
the key ESP-PPQ prints for it, for tests/test_crypt.py.

Run once with ESP-PPQ's interpreter, from the repository root:
    benchmarks/.venv-ppq/bin/python tools/make_crypt_fixture.py
ESP-PPQ draws the key with Python's `random`; the seed below makes the key reproducible.
"""

import random
import struct
from pathlib import Path

from esp_ppq.parser.espdl import helper

SRC = Path("tests/data/espdl-tutorial/esp32p4/model.espdl")
OUT = Path("tests/data/encrypted")

data = SRC.read_bytes()
magic, mode, length, _ = struct.unpack_from("<4sIII", data, 0)
assert magic == b"EDL2" and mode == 0
payload = data[16:16 + length]  # what ESP-PPQ serializes before saving
OUT.mkdir(parents=True, exist_ok=True)
random.seed(17)
key_text = helper.save(payload, str(OUT / "model.enc.espdl"), encrypt_data=True)
(OUT / "model.key.txt").write_text(key_text.strip() + "\n")  # as ESP-PPQ logs it
print(key_text)

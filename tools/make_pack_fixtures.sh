#!/bin/sh
# Makes tests/data/pack/: the bytes ESP-DL's own packer writes, for tests/test_pack.py to compare
# `espstream pack` with. Run once from the repository root; needs the ESP-DL git mirror (v3.3.9,
# commit 12c0616d) and any python3. The packer is plain Python (argparse, hashlib, struct).
set -eu
MIRROR=${ESPDL_GIT:-/work/.mirror/espressif+esp-dl/repo}
OUT=tests/data/pack
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
git -C "$MIRROR" show HEAD:esp-dl/fbs_loader/pack_espdl_models.py > "$T/pack_espdl_models.py"
mkdir -p "$OUT/in"
cp tests/data/espdl-tutorial/esp32p4/model.espdl tests/data/espdl-tutorial/esp32p4/streaming_model.espdl "$OUT/in/"
# small synthetic members: an EDL2 file whose length is not a multiple of 16 (ESP-PPQ writes
# them unpadded; the packer pads them) and two EDL1 files (12-byte header, ESP-DL 1.x) for PDL1
python3 - "$OUT/in" <<'PY'
import struct, sys
d = sys.argv[1]
body = bytes(range(37))
open(f"{d}/odd.espdl", "wb").write(b"EDL2" + struct.pack("<III", 0, len(body), 0) + body)
for name, n in (("a_old.espdl", 21), ("b_old.espdl", 8)):
    body = bytes((7 * i) % 256 for i in range(n))
    open(f"{d}/{name}", "wb").write(b"EDL1" + struct.pack("<II", 0, len(body)) + body)
PY
P="python3 $T/pack_espdl_models.py"
cd "$OUT/in"
$P -m streaming_model.espdl model.espdl -o ../tutorial.pdl3.espdl > /dev/null
$P -m streaming_model.espdl model.espdl -o ../tutorial.pdl2.espdl -f PDL2 > /dev/null
$P -m model.espdl -o ../single.pdl3.espdl > /dev/null
$P -m odd.espdl model.espdl -o ../odd_v.pdl3.espdl --package_version espstream-1.2 > /dev/null
$P -m b_old.espdl a_old.espdl -o ../old.pdl1.espdl -f PDL2 > /dev/null  # EDL1 inputs -> PDL1
cd - > /dev/null
rm "$OUT/in/model.espdl" "$OUT/in/streaming_model.espdl"  # the test reads tests/data/espdl-tutorial
sha256sum "$OUT"/*.espdl "$OUT"/in/*.espdl

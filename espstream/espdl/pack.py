"""ESP-DL's packed multi-model files (PDL1, PDL2, PDL3): write them as ESP-DL's own packer
(`esp-dl/fbs_loader/pack_espdl_models.py`) does, byte for byte, and read them back checked.

The formats (all integers uint32 little-endian; `fbs_loader.hpp` documents them):

1. PDL3 (the packer's default since ESP-DL 3.3): `PDL3`, package_version (16 bytes, ASCII,
   NUL-padded, at most 15 characters), package_size (the whole package), package_sha256 (32
   bytes), model_num, then per model (data_offset, name_offset, name_length), the names one
   after another with no terminator, zero padding to a multiple of 16, then the members'
   EDL2 files, each zero-padded to a multiple of 16. The header is 60 bytes.
   package_sha256 = SHA-256 of package[0:package_size] with the digest field taken as zeros.
2. PDL2: as PDL3 without version, size and digest (header `PDL2`, model_num: 8 bytes).
3. PDL1: the same as PDL2 for EDL1 members (12-byte header, ESP-DL 1.x / 2.x), with no
   padding anywhere. espstream writes only EDL2 files, so it packs PDL1 from EDL1 files as
   bytes and cannot read their payloads.
4. Member order: the packer sorts the given paths (as strings) and names each member after
   its file name (`model.espdl`); `pack_files` does the same, `--name` renames members.
   Names must be ASCII (the packer writes them with struct 'b'), non-empty and distinct.

Reading (`unpack`) checks every offset against the file, the PDL3 size and digest, and that
each member is a whole EDL file; anything wrong is one UserError.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

from espstream.errors import UserError

FORMATS = ("pdl3", "pdl2", "pdl1")
PDL3_HEADER = 60
PDL3_SHA_OFFSET = 24
PDL3_VERSION_MAX = 15
DEFAULT_VERSION = "v1.0"
_U32 = struct.Struct("<I")


def is_packed(data: bytes) -> bool:
    return bytes(data[:3]) == b"PDL"


@dataclass
class Member:
    name: str
    data: bytes  # the member's whole EDL file (header included, padding as packed)
    offset: int = 0


@dataclass
class Package:
    format: str  # 'pdl1', 'pdl2' or 'pdl3'
    members: list[Member] = field(default_factory=list)
    version: str | None = None  # PDL3
    size: int | None = None  # PDL3 package_size
    sha256: str | None = None  # PDL3 digest (hex), checked

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def member(self, name: str | None) -> Member:
        """The member called `name`; without a name, the only one (ESP-DL would load the
        first; espstream asks, so that a check never runs on a model by accident)."""
        if name is None:
            if len(self.members) == 1:
                return self.members[0]
            raise UserError(f"the packed file ({self.format.upper()}) holds "
                            f"{len(self.members)} models: {', '.join(self.names)}; choose one "
                            "with --model NAME")
        for m in self.members:
            if m.name == name:
                return m
        raise UserError(f"--model {name}: the packed file holds no model of that name; it has "
                        f"{', '.join(self.names) or 'none'}")

    def to_json(self) -> dict:
        return {"format": self.format.upper(), "version": self.version, "size": self.size,
                "sha256": self.sha256,
                "models": [{"name": m.name, "offset": m.offset, "bytes": len(m.data)}
                           for m in self.members]}


# ---- writing -------------------------------------------------------------------------------


def _check_name(name: str) -> bytes:
    if not name:
        raise UserError("--name: a packed model needs a non-empty name")
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise UserError(f"--name {name!r}: ESP-DL's packer writes names as ASCII; use ASCII "
                        "characters only") from None
    return raw


def _member_format(data: bytes, label: str) -> str:
    """'EDL1' or 'EDL2', after checking the member's container header against its size."""
    magic = bytes(data[:4])
    if magic not in (b"EDL1", b"EDL2"):
        if magic[:3] == b"PDL":
            raise UserError(f"{label}: is itself a packed file; pack the single models")
        raise UserError(f"{label}: not an .espdl model (magic {magic!r}, expected b'EDL2')")
    head = 12 if magic == b"EDL1" else 16
    if len(data) < head:
        raise UserError(f"{label}: truncated .espdl header ({len(data)} bytes)")
    mode, length = struct.unpack_from("<II", data, 4)
    if mode not in (0, 1):
        raise UserError(f"{label}: unknown .espdl mode {mode} (0 plain, 1 encrypted)")
    if head + length > len(data):
        raise UserError(f"{label}: truncated .espdl file: the header announces {length} bytes, "
                        f"the file holds {len(data) - head} after the header")
    return magic.decode()


def pack(members: list[tuple[str, bytes]], fmt: str = "pdl3",
         version: str = DEFAULT_VERSION) -> bytes:
    """(name, EDL file bytes) in order -> the packed file (module docstring, rules 1-3)."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if not members:
        raise UserError("pack: give at least one .espdl file")
    names = [_check_name(n) for n, _ in members]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"two models would be called {sorted(dup)[0].decode()!r} in the "
                        "package (ESP-DL loads members by name); rename one with --name")
    kinds = {_member_format(d, n) for n, d in members}
    want = "EDL1" if fmt == "pdl1" else "EDL2"
    if kinds != {want}:
        other = sorted(kinds - {want})[0]
        raise UserError(f"--format {fmt}: it packs {want} files, and a member is {other} "
                        f"({'use pdl2 or pdl3' if fmt == 'pdl1' else 'use pdl1'})")
    bins = [bytes(d) + (b"\0" * (-len(d) % 16) if want == "EDL2" else b"")
            for _, d in members]
    head = PDL3_HEADER if fmt == "pdl3" else 8
    name_offset = head + 12 * len(members)
    names_len = sum(len(n) for n in names)
    data_offset = name_offset + names_len
    if fmt != "pdl1":
        data_offset += -data_offset % 16
    entries, n_off, d_off = b"", name_offset, data_offset
    for raw, b in zip(names, bins, strict=True):
        entries += struct.pack("<III", d_off, n_off, len(raw))
        n_off += len(raw)
        d_off += len(b)
    body = entries + b"".join(names) + b"\0" * (data_offset - name_offset - names_len)
    body += b"".join(bins)
    if fmt != "pdl3":
        return (b"PDL1" if fmt == "pdl1" else b"PDL2") + _U32.pack(len(members)) + body
    v = _check_version(version)
    size = head + len(body)
    out = bytearray(b"PDL3" + v + _U32.pack(size) + b"\0" * 32 + _U32.pack(len(members)) + body)
    out[PDL3_SHA_OFFSET:PDL3_SHA_OFFSET + 32] = hashlib.sha256(bytes(out)).digest()
    return bytes(out)


def _check_version(version: str) -> bytes:
    try:
        raw = version.encode("ascii")
    except UnicodeEncodeError:
        raise UserError(f"--package-version {version!r}: ASCII only") from None
    if len(raw) > PDL3_VERSION_MAX:
        raise UserError(f"--package-version {version!r}: at most {PDL3_VERSION_MAX} characters")
    return raw + b"\0" * (16 - len(raw))


def pack_files(paths: list[str], names: list[str] | None = None, fmt: str = "pdl3",
               version: str = DEFAULT_VERSION) -> tuple[bytes, list[str]]:
    """Pack files as `pack_espdl_models.py -m PATHS...` does: sorted by path, named after the
    file (or after `names`, given in the order of `paths`). Returns (bytes, member names)."""
    from espstream.modelio import read_bytes

    if names and len(names) != len(paths):
        raise UserError(f"--name given {len(names)} times for {len(paths)} files; give one "
                        "name per file, in the order of the files")
    named = list(zip(paths, names or [Path(p).name for p in paths], strict=True))
    named.sort(key=lambda pn: pn[0])  # the packer sorts the paths it is given
    members = [(n, read_bytes(p, ".espdl file")) for p, n in named]
    return pack(members, fmt, version), [n for _, n in named]


# ---- reading -------------------------------------------------------------------------------


def _u32(data: bytes, at: int, what: str) -> int:
    if at + 4 > len(data):
        raise UserError(f"truncated packed file: {what} at byte {at} is past its end "
                        f"({len(data)} bytes)")
    return _U32.unpack_from(data, at)[0]


def unpack(data: bytes) -> Package:
    """A packed file's members, every offset and (PDL3) the size and SHA-256 checked."""
    data = bytes(data)
    magic = data[:4]
    fmt = {b"PDL1": "pdl1", b"PDL2": "pdl2", b"PDL3": "pdl3"}.get(magic)
    if fmt is None:
        raise UserError(f"not a packed .espdl file: magic {magic!r}")
    pkg = Package(fmt)
    end = len(data)
    if fmt == "pdl3":
        if len(data) < PDL3_HEADER:
            raise UserError(f"truncated PDL3 file: {len(data)} bytes is shorter than its "
                            f"{PDL3_HEADER}-byte header")
        raw_v = data[4:20]
        if b"\0" not in raw_v:
            raise UserError("corrupt PDL3 header: package_version is not NUL-terminated")
        try:
            pkg.version = raw_v.split(b"\0", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            raise UserError("corrupt PDL3 header: package_version is not ASCII") from None
        size = _u32(data, 20, "package_size")
        if size > len(data):
            raise UserError(f"truncated PDL3 file: package_size is {size} bytes, the file "
                            f"holds {len(data)}")
        if size < PDL3_HEADER:
            raise UserError(f"corrupt PDL3 header: package_size {size} is smaller than the "
                            "header")
        stored = data[PDL3_SHA_OFFSET:PDL3_SHA_OFFSET + 32]
        zeroed = data[:PDL3_SHA_OFFSET] + b"\0" * 32 + data[PDL3_SHA_OFFSET + 32:size]
        got = hashlib.sha256(zeroed).digest()
        if got != stored:
            raise UserError(f"PDL3 SHA-256 mismatch: the header says {stored.hex()}, the "
                            f"package hashes to {got.hex()}; the file is corrupt or was "
                            "changed after packing")
        pkg.size, pkg.sha256, end = size, got.hex(), size
        count_at, entry_at = 56, PDL3_HEADER
    else:
        count_at, entry_at = 4, 8
    n = _u32(data, count_at, "model_num")
    if n == 0:
        raise UserError(f"the packed file ({fmt.upper()}) holds no model")
    if entry_at + 12 * n > end:
        raise UserError(f"truncated packed file: {n} model entries need "
                        f"{entry_at + 12 * n} bytes, it holds {end}")
    spans = []
    for i in range(n):
        d_off, n_off, n_len = struct.unpack_from("<III", data, entry_at + 12 * i)
        if n_off + n_len > end or n_len == 0:
            raise UserError(f"corrupt packed file: model {i}'s name (offset {n_off}, "
                            f"{n_len} bytes) is outside the file")
        try:
            name = data[n_off:n_off + n_len].decode("ascii")
        except UnicodeDecodeError:
            raise UserError(f"corrupt packed file: model {i}'s name is not ASCII") from None
        spans.append((name, d_off))
    head = 12 if fmt == "pdl1" else 16
    for name, d_off in spans:
        if d_off + head > end:
            raise UserError(f"truncated packed file: model '{name}' starts at byte {d_off}, "
                            f"past the end ({end} bytes)")
        want = b"EDL1" if fmt == "pdl1" else b"EDL2"
        if data[d_off:d_off + 4] != want:
            raise UserError(f"corrupt packed file: model '{name}' at byte {d_off} does not "
                            f"start with {want!r}")
        length = _U32.unpack_from(data, d_off + 8)[0]
        stop = d_off + head + length
        if stop > end:
            raise UserError(f"truncated packed file: model '{name}' needs bytes up to {stop}, "
                            f"the package ends at {end}")
        if fmt != "pdl1":
            stop = min(stop + (-(stop - d_off) % 16), end)
        pkg.members.append(Member(name, data[d_off:stop], d_off))
    if len(set(pkg.names)) != len(pkg.names):
        dup = next(x for x in pkg.names if pkg.names.count(x) > 1)
        raise UserError(f"the packed file names two models '{dup}'; ESP-DL would only find "
                        "the first")
    return pkg

"""Any `.espdl` file ESP-DL loads -> one plain EDL2 model: packed files (PDL1/2/3,
`espstream.espdl.pack`) pick a member, encrypted ones (mode 1, `espstream.espdl.crypt`) are
decrypted with the key. `read`, `inspect`, `verify` and `espstream.sim.load` go through here.

1. A packed file: the member `model` names (`--model NAME`); without a name, the only member,
   else an error listing the names. PDL3's SHA-256 is checked first.
2. An encrypted model (alone or as a member): decrypted with `key`; no key, or a key that
   does not decrypt to a valid payload, is one error.
3. A plain single model with `model` given is refused (there is nothing to choose from).
"""

from __future__ import annotations

from dataclasses import dataclass

from espstream.errors import UserError


@dataclass
class Opened:
    data: bytes  # a plain (mode 0) EDL2 file
    package: object | None = None  # espstream.espdl.pack.Package when the file was packed
    member: str | None = None
    encrypted: bool = False

    def to_json(self) -> dict:
        out: dict = {"encrypted": self.encrypted}
        if self.package is not None:
            out["package"] = self.package.to_json()
            out["member"] = self.member
        return out


def open_model(data: bytes, model: str | None = None, key: bytes | None = None,
               label: str = "the file") -> Opened:
    """Rules 1-3 of the module docstring."""
    from espstream.espdl import crypt, pack

    data = bytes(data)
    out = Opened(data)
    if pack.is_packed(data):
        pkg = pack.unpack(data)
        m = pkg.member(model)
        out.package, out.member, out.data = pkg, m.name, m.data
        if pkg.format == "pdl1":
            raise UserError(f"model '{m.name}' is an old EDL1 file (PDL1 package), which "
                            "espstream cannot read; re-export it as EDL2")
        label = f"model '{m.name}' of {label}"
    elif model is not None:
        raise UserError(f"--model {model}: the file is a single model, not a packed file")
    if crypt.is_encrypted(out.data):
        out.data = crypt.decrypt(out.data, key, label)
        out.encrypted = True
    return out


def load_graph(path: str, model: str | None = None, key: str | bytes | None = None):
    """Read an IntGraph from a path ('-': stdin); `key` a key file path or the key bytes.
    Errors name the path."""
    from espstream.espdl import crypt
    from espstream.espdl.reader import read
    from espstream.modelio import read_bytes

    k = crypt.read_key(key) if isinstance(key, str) else key
    data = read_bytes(path, ".espdl file")  # its errors name the path already
    try:
        return read(data, model=model, key=k)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None

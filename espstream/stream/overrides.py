"""`--overrides FILE.json`: what to do with tensors no rule covers.

The file is one JSON object:

    {
      "tensors": {
        "x":        {"axis": 2},
        "/blk/out": {"axis": 1},
        "/feat":    {"window": 16},
        "/aux":     {"delay": 2}
      }
    }

Per tensor, any of:
1. `axis` (int): the tensor's time axis. On a graph input it is the same as `--axis x:2`. On a
   node's output it declares the node frame-wise: whatever its op, the output has its time axis
   at `axis`, the inputs' stride, and the largest of the inputs' delays (inputs are aligned).
2. `window` (int W > 0): every consumer of the tensor sees its last W frames, kept by a cache;
   the tensor becomes a window summary (recomputed each call, equal to offline after the last
   chunk when the offline sequence had W frames there). Use it in front of a global pooling, a
   Reduce or Softmax over time, a Flatten of the whole sequence.
3. `delay` (int D > 0): the tensor's consumers see it D frames later (a delay cache), e.g. to
   line a branch up with a signal outside the model.
Names are ONNX tensor names (see `espstream streamify --json` or Netron). Unknown names or keys
are errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from espstream.errors import UserError

KEYS = {"axis", "window", "delay"}


@dataclass
class Overrides:
    tensors: dict[str, dict[str, int]] = field(default_factory=dict)

    def get(self, name: str) -> dict[str, int]:
        return self.tensors.get(name, {})

    def to_json(self) -> dict[str, Any]:
        return {"tensors": self.tensors}


def parse(data: Any, label: str = "overrides") -> Overrides:
    """Validate an already-loaded JSON object."""
    from espstream.limits import MAX_CHUNK

    if data is None:
        return Overrides()
    if isinstance(data, Overrides):
        return data
    if not isinstance(data, dict) or set(data) - {"tensors"}:
        raise UserError(f'{label}: expected {{"tensors": {{NAME: {{...}}}}}}')
    tensors = data.get("tensors", {})
    if not isinstance(tensors, dict):
        raise UserError(f"{label}: 'tensors' must map tensor names to objects")
    out: dict[str, dict[str, int]] = {}
    for name, spec in tensors.items():
        if not isinstance(spec, dict) or not spec:
            raise UserError(f"{label}: tensor {name!r}: expected an object with {sorted(KEYS)}")
        bad = set(spec) - KEYS
        if bad:
            raise UserError(
                f"{label}: tensor {name!r}: unknown key(s) {sorted(bad)}; valid: {sorted(KEYS)}"
            )
        for k, v in spec.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise UserError(f"{label}: tensor {name!r}: {k} must be an integer")
            if k in ("window", "delay") and not 0 < v <= MAX_CHUNK:
                raise UserError(f"{label}: tensor {name!r}: {k} must be positive, between 1 and "
                                f"{MAX_CHUNK}")
            if k == "axis" and not -8 <= v < 8:
                raise UserError(f"{label}: tensor {name!r}: axis {v} is out of range (-8..7)")
        out[name] = dict(spec)
    return Overrides(out)


def load(path: str) -> Overrides:
    from espstream.limits import check_json_depth
    from espstream.modelio import read_bytes

    raw = read_bytes(path, "overrides JSON")
    check_json_depth(raw, path)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return parse(data, path)

"""espstream's own metadata (`espstream.*` keys of an ONNX model or an `.espdl` file), checked
once, where the file is read, so that no stage meets a forged or corrupted value.

Rules:

1. Each key espstream writes must hold what espstream writes (`SCHEMA`): valid JSON of the stated
   type where the value is JSON (nested at most `limits.MAX_JSON_DEPTH` deep), one of the stated
   words where it is a word; integers lie in the stated ranges.
2. A name in `espstream.states` or `espstream.recurrent_states` is a graph input (the state in)
   and a graph output (the state out); an axis in `espstream.time_axes` is below the rank of the
   graph input or output it names, where that one has a known rank.
3. A streaming model (with any of `espstream.time_axes`, `.states`, `.delay`, `.warmup`) records
   its `espstream.chunk`.
4. Keys espstream does not know are left alone (another tool's, or a later version's).
Every refusal is one `UserError`: the file, the key and what it should hold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from espstream.errors import UserError
from espstream.limits import MAX_CHUNK, MAX_DIM, MAX_JSON_DEPTH, json_depth

WARM_ALL = 1 << 40  # streamify's "every frame" warm-up (espstream.stream.axes.WARM_ALL)
MAX_AXIS = 63  # numpy arrays have at most 64 dimensions
STREAMING = ("espstream.time_axes", "espstream.states", "espstream.delay", "espstream.warmup")
TARGETS = ("esp32p4", "esp32s31", "esp32s3", "esp32", "esp32s2", "esp32c2", "esp32c3",
           "esp32c5", "esp32c6", "c")


class _Bad(Exception):
    """What a value should hold (the message of the UserError)."""


def _int(v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _Bad(f"an integer between {lo} and {hi}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _Bad("a non-empty name")
    return v


def _obj_of(check: Callable[[Any], Any], what: str) -> Callable[[Any], None]:
    def f(v: Any) -> None:
        if not isinstance(v, dict):
            raise _Bad(f"a JSON object of {what}")
        for k, x in v.items():
            try:
                check(x)
            except _Bad:
                raise _Bad(f"a JSON object of {what} ({k!r} holds {_show(x)})") from None
    return f


def _list_of(check: Callable[[Any], Any], what: str) -> Callable[[Any], None]:
    def f(v: Any) -> None:
        if not isinstance(v, list):
            raise _Bad(f"a JSON list of {what}")
        for x in v:
            try:
                check(x)
            except _Bad:
                raise _Bad(f"a JSON list of {what} (one is {_show(x)})") from None
    return f


def _pair(v: Any) -> None:
    if not (isinstance(v, list) and len(v) == 2):
        raise _Bad("[input, output]")
    _str(v[0])
    _str(v[1])


def _recurrent(v: Any) -> None:
    if not isinstance(v, dict):
        raise _Bad("{input, output, exponent, dtype}")
    _str(v.get("input"))
    _str(v.get("output"))
    if v.get("exponent") is not None:
        _int(v["exponent"], -128, 127)
    if v.get("dtype") is not None:
        _str(v["dtype"])


def _perm(v: Any) -> None:
    if not isinstance(v, list) or sorted(v) != list(range(len(v))) or \
            any(isinstance(x, bool) for x in v):
        raise _Bad("a permutation of 0..rank-1")


def _stage(v: Any) -> None:
    if not isinstance(v, dict):
        raise _Bad("a JSON object {index, count, ...}")
    try:
        count = _int(v.get("count"), 1, 1 << 16)
        _int(v.get("index"), 0, count - 1)
        for k in ("latency_steps", "macs"):
            if k in v:
                _int(v[k], 0, 1 << 62)
        for k in ("inputs_from_previous", "outputs_to_next"):
            if k in v:
                _list_of(_str, "names")(v[k])
    except _Bad as e:
        raise _Bad(f"a JSON object {{index, count, ...}} ({e})") from None


def _word(*words: str) -> Callable[[str], None]:
    def f(v: str) -> None:
        if v not in words:
            raise _Bad("one of " + ", ".join(words))
    return f


def _float_text(v: str) -> None:
    try:
        x = float(v)
    except ValueError:
        raise _Bad("a number") from None
    if not math.isfinite(x):
        raise _Bad("a finite number")


def _axis(v: Any) -> int:
    return _int(v, 0, MAX_AXIS)


def _frames(v: Any) -> int:
    return _int(v, 0, MAX_DIM)


#: key -> (JSON value?, check)
SCHEMA: dict[str, tuple[bool, Callable[[Any], Any]]] = {
    "espstream.chunk": (True, lambda v: _int(v, 1, MAX_CHUNK)),
    "espstream.time_axes": (True, _obj_of(_axis, "axes (0..63)")),
    "espstream.states": (True, _list_of(_pair, "[state input, state output] pairs")),
    "espstream.delay": (True, _obj_of(_frames, f"frame counts (0..{MAX_DIM})")),
    "espstream.warmup": (True, _obj_of(lambda v: _int(v, 0, WARM_ALL),
                                       f"frame counts (0..{WARM_ALL})")),
    "espstream.recurrent_states": (True, _list_of(_recurrent, "{input, output, exponent, dtype}")),
    "espstream.layout": (True, _obj_of(_perm, "axis permutations")),
    "espstream.gate_exponents": (True, _obj_of(lambda v: _int(v, -128, 127), "exponents")),
    "espstream.int16": (True, _list_of(_str, "layer names")),
    "espstream.stage": (True, _stage),
    "espstream.target": (False, _word(*TARGETS)),
    "espstream.bits": (False, _word("8", "16")),
    "espstream.rounding": (False, _word("half_even", "half_up")),
    "espstream.per_channel": (False, _word("true", "false")),
    "espstream.percentile": (False, _float_text),
}


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check(meta: Mapping[str, str], inputs: Mapping[str, int | None],
          outputs: Mapping[str, int | None]) -> None:
    """Rules 1-3 for one file's metadata; `inputs` / `outputs` map the graph's input and output
    names to their rank (None where unknown). Raises UserError."""
    values: dict[str, Any] = {}
    for key, (is_json, fn) in SCHEMA.items():
        if key not in meta:
            continue
        raw = meta[key]
        try:
            if is_json:
                if json_depth(raw) > MAX_JSON_DEPTH:
                    raise _Bad(f"JSON nested at most {MAX_JSON_DEPTH} deep")
                try:
                    value = json.loads(raw)
                except ValueError:
                    raise _Bad("valid JSON") from None
            else:
                value = raw
            fn(value)
        except _Bad as e:
            raise UserError(f"metadata {key} is not {e} (it holds {_show(raw)}); the file was "
                            "not written by espstream or was changed since") from None
        values[key] = value
    if any(k in values for k in STREAMING) and "espstream.chunk" not in values:
        raise UserError("metadata espstream.chunk is missing from a streaming model (it has "
                        + ", ".join(k for k in STREAMING if k in values) + ")")
    pairs = [tuple(p) for p in values.get("espstream.states", [])]
    pairs += [(r["input"], r["output"]) for r in values.get("espstream.recurrent_states", [])]
    for a, b in pairs:
        if a not in inputs or b not in outputs:
            raise UserError(f"metadata: the state pair [{a!r}, {b!r}] does not name a graph "
                            "input and a graph output")
    for name, ax in values.get("espstream.time_axes", {}).items():
        rank = inputs.get(name, outputs.get(name))
        if rank is not None and ax >= rank:
            raise UserError(f"metadata espstream.time_axes: axis {ax} of {name!r} is out of "
                            f"range for its rank {rank}")

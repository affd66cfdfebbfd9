"""Sizes a file or a flag may ask for, checked before anything is allocated.

Rules:

1. A file read whole (model, data, report) holds at most `MAX_FILE_BYTES`; an endless or huge
   stream (``/dev/zero``, ``/dev/urandom``) is cut there and refused.
2. An array made from sizes in a file or a flag (an ``.npy`` header, an ``.npz`` member as
   inflated, a tensor's dimensions, a cache window) holds at most `MAX_ELEMENTS` elements and
   `MAX_ARRAY_BYTES` bytes; every dimension is a non-negative integer below `MAX_DIM`; a
   StreamingCache keeps at most `MAX_WINDOW` frames.
3. Counts given on the command line (--random, --chunk, --samples, --batch, --seed) lie in the
   stated ranges.
4. JSON is nested at most `MAX_JSON_DEPTH` deep.
Every refusal is one line naming the limit.
"""

from __future__ import annotations

import math

from espstream.errors import UserError

MAX_FILE_BYTES = 2 << 30  # protobuf refuses a larger ONNX model anyway
MAX_ARRAY_BYTES = 4 << 30
MAX_ELEMENTS = 1 << 30
MAX_DIM = 1 << 31
MAX_RANDOM = 1 << 20
MAX_CHUNK = 1 << 20
MAX_WINDOW = 1 << 20  # frames a StreamingCache keeps (an .espdl file's or an ONNX model's)
MAX_SEED = 2**32 - 1
MAX_JSON_DEPTH = 64


def check_count(value: int | None, flag: str, lo: int, hi: int) -> None:
    """Rule 3: `lo <= value <= hi` for a command-line count."""
    if value is not None and not lo <= value <= hi:
        raise UserError(f"{flag} {value}: must be between {lo} and {hi}")


def check_shape(shape, itemsize: int, what: str) -> None:
    """Rule 2 for an array about to be made."""
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what}: the shape {shape!r} is not a list of integers") from None
    for d in dims:
        if d < 0 or d >= MAX_DIM:
            raise UserError(f"{what}: dimension {d} of shape {tuple(dims)} is out of range "
                            f"(0..{MAX_DIM - 1})")
    n = math.prod(dims)
    if n > MAX_ELEMENTS:
        raise UserError(f"{what}: shape {tuple(dims)} holds {n} elements, over the limit of "
                        f"{MAX_ELEMENTS}")
    if n * max(int(itemsize), 1) > MAX_ARRAY_BYTES:
        raise UserError(f"{what}: shape {tuple(dims)} needs {n * max(itemsize, 1)} bytes, over "
                        f"the limit of {MAX_ARRAY_BYTES} bytes")


def check_file_size(n: int, what: str) -> None:
    """Rule 1."""
    if n > MAX_FILE_BYTES:
        raise UserError(f"{what}: more than {MAX_FILE_BYTES} bytes, over the limit for an input")


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of brackets outside strings (rule 4), without recursion."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def check_json_depth(text: str | bytes, what: str) -> None:
    """Rule 4."""
    if json_depth(text) > MAX_JSON_DEPTH:
        raise UserError(f"{what}: JSON nested more than {MAX_JSON_DEPTH} deep")

"""Human tables on stderr and JSON reports written beside the model."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from espstream import log
from espstream.modelio import write_bytes


def write_json(path: str | None, data: dict[str, Any]) -> None:
    """Write a machine-readable report atomically; '-' is not allowed (stdout carries the model)."""
    if not path:
        return
    text = json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n"
    write_bytes(text.encode(), path, binary=False)


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=False)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(out)


def bar(value: float, lo: float, hi: float, width: int = 20) -> str:
    """A text bar for `value` between `lo` and `hi`."""
    if hi <= lo:
        return ""
    frac = min(max((value - lo) / (hi - lo), 0.0), 1.0)
    n = int(round(frac * width))
    return "#" * n + "." * (width - n)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    log.info(table(headers, rows))

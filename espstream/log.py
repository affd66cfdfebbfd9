"""Human-facing messages on stderr, silenced by `-q`; errors are printed by the CLI itself."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """Nothing printed inside: for a check run first to refuse a bad file before any line, and
    again (with its warnings) once it is known to pass."""
    global _quiet
    saved, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = saved


def info(msg: str = "") -> None:
    if not _quiet:
        print(msg, file=sys.stderr)


def warn(msg: str) -> None:
    if not _quiet:
        print(f"espstream: warning: {msg}", file=sys.stderr)


def progress_enabled() -> bool:
    """Progress bars only for a person watching: not with -q, not into a file or pipe."""
    return not _quiet and sys.stderr.isatty()

"""The real stdout while a CLI command runs.

While a command runs, sys.stdout points at stderr so that no library's print can corrupt a model
piped to the next stage; the real stdout is kept here for the model itself. This module imports
nothing heavy: the CLI loads it before it knows which command runs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

_real_stdout = None


@contextlib.contextmanager
def stdout_reserved_for_output() -> Iterator[None]:
    """Stray prints go to stderr; `modelio.write_bytes(..., '-')` still reaches stdout."""
    global _real_stdout
    saved, _real_stdout = _real_stdout, sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout, _real_stdout = _real_stdout, saved


def real_stdout():
    """The process's stdout (None when it was closed at start), never the stderr stand-in."""
    return _real_stdout if _real_stdout is not None else sys.__stdout__

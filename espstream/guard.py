"""Library exceptions that only a user's input (or machine) can cause, turned into `UserError`.

Rules:

1. A corrupt archive (zipfile.BadZipFile, zlib.error: a bad CRC or deflate stream) -> "corrupt
   archive".
2. MemoryError -> the input needs more memory than the machine has; RecursionError -> the input
   is nested too deep.
3. An OSError carrying a path (too long a name, no space left, read-only file system) -> its
   reason and the path.
Anything else stays an internal error (exit 3): it is a bug of ours.
"""

from __future__ import annotations

import zipfile
import zlib

from espstream.errors import UserError, first_line


def _clean(text: str) -> str:
    return " ".join(text.split())[:300]


def as_user_error(e: BaseException) -> UserError | None:
    """The `UserError` an input-caused library exception stands for, else None."""
    if isinstance(e, zipfile.BadZipFile | zlib.error):
        return UserError(f"corrupt archive ({_clean(first_line(e))})")
    if isinstance(e, MemoryError):
        return UserError("the input needs more memory than this machine has; give a smaller "
                         "input")
    if isinstance(e, RecursionError):
        return UserError("the input is nested too deep")
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = f"{_clean(str(e.filename))[:120]}: " if e.filename else ""
        return UserError(f"{where}{e.strerror.lower()}")
    return None

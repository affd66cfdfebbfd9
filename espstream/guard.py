"""Library exceptions that only a user's input (or machine) can cause, turned into `UserError`.

Rules:

1. A corrupt archive (zipfile.BadZipFile, zlib.error: a bad CRC or deflate stream) -> "corrupt
   archive".
2. MemoryError -> the input needs more memory than the machine has; RecursionError -> the input
   is nested too deep.
3. An OSError carrying a path (too long a name, no space left, read-only file system) -> its
   reason and the path.
4. Any other exception, when an ONNX model the command read (`modelio.loaded_models`) does not
   run in onnxruntime: that model is malformed (onnx.checker passes models whose kernels do
   not fit their inputs), and the message says which and why.
Anything else stays an internal error (exit 3): it is a bug of ours.
"""

from __future__ import annotations

import sys
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
    return _malformed_input()


def _malformed_input() -> UserError | None:
    """Rule 4."""
    modelio = sys.modules.get("espstream.modelio")  # no model was read if it was never imported
    if modelio is None:
        return None
    for label, model in modelio.loaded_models():
        from espstream.optimize.check import onnxruntime_failure

        why = onnxruntime_failure(model)
        if why is not None:
            return UserError(f"{label}: the model is malformed: it does not run in onnxruntime "
                             f"({_clean(why)})")
    return None

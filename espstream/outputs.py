"""Where a command may write, and writing every output of a command together or not at all.

Rules:

1. An existing character device or FIFO (``/dev/null``, a pipe, ``/dev/stdout`` through its
   symlink) is written through, never renamed over; any other non-regular file (block device,
   socket) is refused. Symlinks are followed, so the file renamed over is the link's target.
2. An output that is one of the command's inputs (same file, or same resolved path) is refused,
   and so are two outputs of one command naming the same file: before any work where the
   command names its outputs (`check_outputs`), and in any case when a second one is written
   to a file already written inside the same `transaction()`.
3. A path too long for the file system, or in a folder that does not exist or cannot be written,
   is refused before any work (a probe temporary file is made and removed).
4. While a command runs inside `transaction()`, each regular-file output is written to a
   temporary file beside it; the renames happen only when the command ends without error, so
   outputs land together or not at all (a report never says a model was written when it was
   not). On error, interrupt or SIGTERM every temporary file is removed: each one is known
   from the moment it exists (signals are held while it is made and registered, and while the
   renames run), and `cleanup()` removes whatever is left.
5. An output that is a pipe (stdout or a FIFO) counts as delivered only once the reader has
   taken every byte: a reader that closes its end with bytes unread (``| head -c 10``) did not
   get the model, which is an error. A reader that keeps the pipe open but does not read for
   `DELIVERY_WAIT` seconds is trusted to read later (the bytes stay in the pipe).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from espstream.errors import UserError

STDIO = "-"

_pending: list[tuple[str, str]] | None = None  # (temporary file, target) while in transaction()
_temps: set[str] = set()  # every temporary file that exists now (rule 4)
DELIVERY_WAIT = 10.0  # seconds (rule 5)
_held = 0  # depth of _signals_held()
_deferred: list[int] = []  # signals that came while held


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A signal handler that asks `defer_signal` first waits until the block ends (the signal
    is raised again then): a temporary file is never made without being registered, nor a set
    of renames cut half way. (A flag, not a signal mask: any thread may receive the signal.)"""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if _held == 0 and _deferred:
            signum = _deferred[-1]
            _deferred.clear()
            signal.raise_signal(signum)


def defer_signal(signum: int) -> bool:
    """For a signal handler: True, and `signum` kept for the end of the held block, while
    temporary files are being made, registered or renamed."""
    if _held:
        _deferred.append(signum)
        return True
    return False


def _resolved(path: str) -> Path:
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path!r}: not a usable path ({e})") from None


def _stat(p: Path) -> os.stat_result | None:
    try:
        return os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None  # (a missing folder is then refused by name)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise UserError(f"{_short(str(p))}: file name too long") from None
        raise UserError(f"{_short(str(p))}: cannot use this path ({e.strerror})") from None


def _short(path: str) -> str:
    path = path.replace("\n", "\\n").replace("\r", "\\r")
    return path if len(path) <= 120 else path[:60] + "..." + path[-40:]


def is_write_through(path: str) -> bool:
    """True if `path` is an existing character device or FIFO (rule 1)."""
    st = _stat(_resolved(path))
    return st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode))


def check_output(path: str, *inputs: str | None) -> None:
    """Rules 1-3 for one output path against the command's input paths."""
    if path == STDIO:
        return
    label = _short(path)
    if "\0" in path:
        raise UserError(f"{label}: a file name cannot hold a NUL character")
    out = _resolved(path)
    st = _stat(out)
    for inp in inputs:
        if not inp or inp == STDIO:
            continue
        ip = _resolved(inp)
        same = ip == out
        if not same and st is not None:
            ist = _stat(ip)
            same = ist is not None and (ist.st_dev, ist.st_ino) == (st.st_dev, st.st_ino)
        if same and not (st is not None and stat.S_ISCHR(st.st_mode)):
            raise UserError(f"{label}: the output would overwrite the input {_short(inp)}; "
                            "choose another path")
    if st is not None:
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            return  # written through (rule 1)
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"{label}: is a folder; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{label}: not a regular file, a character device or a FIFO; "
                            "refusing to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"{label}: the folder {_short(str(parent))} does not exist")
    if len(out.name.encode(errors="surrogateescape")) > 255:
        raise UserError(f"{label}: file name too long")
    # Permissions do not tell (root ignores them; /proc refuses new files even to root): try
    # the temporary file the write will need, now, before any work is done.
    with _signals_held():  # (a signal must not leave the probe behind)
        try:
            fd, probe = tempfile.mkstemp(prefix=".espstream.", suffix=".tmp", dir=parent)
        except OSError as e:
            raise UserError(f"{label}: cannot write in {_short(str(parent))} "
                            f"({e.strerror})") from None
        os.close(fd)
        _unlink(probe)


def check_outputs(outputs: list[str | None], inputs: list[str | None]) -> None:
    """Rules 1-3 for every output of a command, and no two outputs the same file (rule 2)."""
    seen: dict[Path, str] = {}
    for o in outputs:
        if not o or o == STDIO:
            continue
        check_output(o, *inputs)
        r = _resolved(o)
        if r in seen and not is_write_through(o):
            also = f" (also as {_short(seen[r])})" if seen[r] != o else ""
            raise UserError(f"{_short(o)}: named twice as an output{also}; give each output "
                            "its own path")
        seen[r] = o


def write_file(data: bytes, path: str) -> None:
    """Write `data` to a file path: through a device / FIFO, else atomically (rule 4)."""
    check_output(path)
    if is_write_through(path):
        try:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                wait_delivered(f.fileno(), _short(path))
        except BrokenPipeError:
            raise UserError(f"{_short(path)}: the reader closed the pipe before the output was "
                            "written") from None
        except OSError as e:
            raise UserError(f"{_short(path)}: cannot write ({e.strerror})") from None
        return
    target = _resolved(path)  # a symlink's target is replaced, not the link
    if _pending is not None and any(t == str(target) for _, t in _pending):
        raise UserError(f"{_short(path)}: written twice by one command (two of its outputs "
                        "name this file); give each output its own path")
    try:
        with _signals_held():
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:100]}.", suffix=".tmp",
                                       dir=target.parent)
            _temps.add(tmp)
    except OSError as e:
        raise UserError(f"{_short(path)}: cannot write there ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if _pending is not None:
            _pending.append((tmp, str(target)))
            return
        with _signals_held():
            os.replace(tmp, target)
            _temps.discard(tmp)
    except OSError as e:
        _unlink(tmp)
        raise UserError(f"{_short(path)}: cannot write ({e.strerror})") from None
    except BaseException:
        _unlink(tmp)
        raise


@contextlib.contextmanager
def transaction(commit_on: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Rule 4: outputs written inside are renamed into place together when the block ends
    without error (or with one of `commit_on`, e.g. a failed check whose report is kept)."""
    global _pending
    if _pending is not None:  # nested: the outer transaction commits
        yield
        return
    _pending = []
    try:
        yield
    except commit_on:
        _commit()
        raise
    except BaseException:
        _rollback()
        raise
    else:
        _commit()
    finally:
        _pending = None


def _commit() -> None:
    pending = list(_pending or [])
    with _signals_held():
        for i, (tmp, target) in enumerate(pending):
            try:
                os.replace(tmp, target)
                _temps.discard(tmp)
            except OSError as e:
                for t, _ in pending[i:]:
                    _unlink(t)
                raise UserError(f"{_short(target)}: cannot write ({e.strerror})") from None
        _pending.clear()


def _rollback() -> None:
    with _signals_held():
        for tmp, _ in _pending or []:
            _unlink(tmp)
        if _pending is not None:
            _pending.clear()


def cleanup() -> None:
    """Remove every temporary file still there (the CLI's last act, on any ending)."""
    with _signals_held():
        for tmp in list(_temps):
            _unlink(tmp)


def wait_delivered(fd: int, label: str, timeout: float | None = None) -> None:
    """Rule 5 for a pipe `fd` whose last byte was just written (anything else returns at once).
    Raises UserError when the reader closed its end with bytes unread."""
    import array
    import fcntl
    import select
    import termios
    import time

    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        poll = select.poll()
        poll.register(fd, 0)  # POLLERR (no reader left) is reported whatever is asked
    except (OSError, ValueError):
        return

    def unread() -> int:
        n = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, n)
        return n[0]

    deadline = time.monotonic() + (DELIVERY_WAIT if timeout is None else timeout)
    try:
        while (left := unread()) > 0:
            if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(20)):
                left = unread()
                if left > 0:
                    raise UserError(f"{label}: the reader closed the pipe with {left} bytes of "
                                    "the output unread")
                return
            if time.monotonic() > deadline:
                return
    except OSError:
        return


def _unlink(path: str) -> None:
    _temps.discard(path)
    try:
        os.unlink(path)
    except OSError:
        pass

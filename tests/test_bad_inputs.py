"""Malformed inputs through the real CLI (issue 7, robustness): every case of
`tests/bad_inputs/manifest.json` (made by `tests/bad_inputs/make.py`) must give

1. the expected exit status (2) and exactly one stderr line, `espstream: error: ...`, holding
   the case's message fragment (no traceback, no warning, no stage report before it);
2. no partial output: nothing on stdout, the output path absent, nothing (no temporary file,
   no folder) left in the scratch folder the case writes to;
3. every input unchanged: the bytes of every file in `tests/bad_inputs/` are the same before and
   after, and no file appears there.

The cases run in parallel subprocesses once per session (each is a fresh `python -m espstream`);
the parametrized tests then judge each one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_util import espstream

HERE = Path(__file__).resolve().parent / "bad_inputs"
CASES = json.loads((HERE / "manifest.json").read_text())["cases"]
STAGES = {"optimize", "calibrate", "streamify", "verify", "export", "inspect", "convert",
          "pack", "app"}


def snapshot() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(HERE.iterdir()) if p.is_file()}


def _subst(text: str | None, out: Path) -> str | None:
    return None if text is None else text.replace("{in}", str(HERE)).replace("{out}", str(out))


@pytest.fixture(scope="module")
def runs():
    """Run every case (4 at a time); yields {id: (CompletedProcess, scratch folder)}."""
    root = Path(tempfile.mkdtemp(prefix="espstream-bad-"))
    before = snapshot()

    def run(case):
        out = root / case["id"]
        out.mkdir()
        return case["id"], (espstream(*[_subst(a, out) for a in case["args"]], timeout=300), out)

    with ThreadPoolExecutor(4) as pool:
        results = dict(pool.map(run, CASES))
    results["__inputs__"] = (before, snapshot())
    yield results
    shutil.rmtree(root, ignore_errors=True)


def test_manifest_covers_every_stage():
    assert len(CASES) >= 30
    assert len({c["id"] for c in CASES}) == len(CASES)
    assert {c["args"][0] for c in CASES} == STAGES
    for c in CASES:  # every file a case reads exists (a typo would make it a 'no such file')
        for a in c["args"][1:]:
            if a.startswith("{in}/") and "/" not in a[len("{in}/"):] and c["id"] not in (
                    "optimize_missing_input",):
                assert (HERE / a[len("{in}/"):]).is_file(), (c["id"], a)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, runs):
    proc, out = runs[case["id"]]
    err = proc.stderr.decode()
    assert proc.returncode == case["exit"] == 2, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("espstream: error: "), err
    assert case["message"] in lines[0], (case["message"], lines[0])
    assert "Traceback" not in err and "internal error" not in err
    assert proc.stdout == b""  # no model (or part of one) on stdout either
    output = _subst(case["output"], out)
    if output is not None:
        assert not Path(output).exists()
    assert list(out.iterdir()) == []  # no temporary file, no folder left behind
    before, after = runs["__inputs__"]
    assert after == before  # inputs unchanged, nothing added beside them


def _load_make():
    spec = importlib.util.spec_from_file_location("bad_inputs_make", HERE / "make.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Files made by espstream's own stages (and the malformed copies of them) follow those stages'
# output; the rest are fixed bytes that make.py must reproduce exactly.
FROM_STAGES = ("tiny.qdq.onnx", "tiny.espdl", "qdq_truncated.onnx", "optimize_espdl_given")


def test_make_is_deterministic_and_committed(tmp_path):
    make = _load_make()
    make.main(tmp_path)
    made = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name for p in HERE.iterdir() if p.is_file() and p.suffix != ".py"}
    assert set(made) == committed
    assert made["manifest.json"] == (HERE / "manifest.json").read_bytes()
    for name, data in made.items():
        if name.startswith("espdl_") or name in FROM_STAGES:
            continue
        assert data == (HERE / name).read_bytes(), name

"""Malformed inputs through the real CLI (issue 7, robustness): every case of
`tests/bad_inputs/manifest.json` (made by `tests/bad_inputs/make.py`) must give

1. the expected exit status (2) and exactly one stderr line, `espstream: error: ...`, holding
   the case's message fragment (no traceback, no warning, no stage report before it);
2. no partial output: nothing on stdout, the output path absent, nothing (no temporary file,
   no folder) left in the scratch folder the case writes to;
3. every input unchanged: the bytes of every file in `tests/bad_inputs/` are the same before and
   after, and no file appears there.

The cases run once per session, 3 at a time, each in a child forked from one fresh interpreter
that imported espstream and its libraries (`bad_inputs/forkserver.py`: the CLI's own `main`, as
`python -m espstream` runs it, without paying the import for each case); under `make test-all`
(`slow`) every case also runs as a real `python -m espstream` subprocess. Device nodes
(``{dev}/zero``, ``{dev}/urandom``, ``{dev}/null``) are made with os.mknod in a temporary
folder, never the real /dev; they must still be the same device nodes afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_util import ROOT, espstream

HERE = Path(__file__).resolve().parent / "bad_inputs"
CASES = json.loads((HERE / "manifest.json").read_text())["cases"]
STAGES = {"optimize", "calibrate", "streamify", "verify", "export", "inspect", "convert",
          "pack", "app"}


def snapshot() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(HERE.iterdir()) if p.is_file()}


#: character devices a case may name as {dev}/NAME: (major, minor) as on Linux
DEVICES = {"zero": (1, 5), "urandom": (1, 9), "null": (1, 3)}


def _subst(text: str | None, out: Path, dev: Path | None = None) -> str | None:
    if text is None:
        return None
    text = text.replace("{in}", str(HERE)).replace("{out}", str(out))
    return text.replace("{dev}", str(dev)) if dev is not None else text


def _make_devices(folder: Path) -> str | None:
    """The DEVICES as nodes in `folder`; the reason they cannot be made, or None."""
    for name, (major, minor) in DEVICES.items():
        try:
            os.mknod(folder / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        except PermissionError:
            return "os.mknod of a character device needs root"
    return None


def _device_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.lstat().st_mode, p.lstat().st_rdev) for p in sorted(folder.iterdir())}


def _uses_devices(case) -> bool:
    return any("{dev}" in a for a in case["args"])


class _Proc:
    def __init__(self, rc: int, stdout: bytes, stderr: bytes) -> None:
        self.returncode, self.stdout, self.stderr = rc, stdout, stderr


def run_forked(commands: list[tuple[str, list[str]]], jobs: int = 3) -> dict[str, _Proc]:
    """{id: result} of each (id, espstream args), through bad_inputs/forkserver.py."""
    import base64

    request = "".join(json.dumps({"id": i, "args": a, "cwd": str(ROOT), "timeout": 300}) + "\n"
                      for i, a in commands)
    proc = subprocess.run([sys.executable, str(HERE / "forkserver.py"), "--jobs", str(jobs)],
                          input=request.encode(), capture_output=True, cwd=ROOT, timeout=3600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out = {}
    for line in proc.stdout.decode().splitlines():
        r = json.loads(line)
        out[r["id"]] = _Proc(r["rc"], base64.b64decode(r["stdout"]), base64.b64decode(r["stderr"]))
    assert set(out) == {i for i, _ in commands}
    return out


def _run_cases(runner) -> dict:
    root = Path(tempfile.mkdtemp(prefix="espstream-bad-"))
    dev = root / "__devices__"
    dev.mkdir()
    no_devices = _make_devices(dev)
    devices_before = _device_state(dev)
    before = snapshot()
    commands, outs = [], {}
    for case in CASES:
        out = root / case["id"]
        out.mkdir()
        outs[case["id"]] = out
        if not (no_devices and _uses_devices(case)):
            commands.append((case["id"], [_subst(a, out, dev) for a in case["args"]]))
    procs = runner(commands)
    results = {i: (procs.get(i), out) for i, out in outs.items()}
    results["__inputs__"] = (before, snapshot())
    results["__devices__"] = (no_devices, devices_before, _device_state(dev))
    return results, root


@pytest.fixture(scope="module")
def runs():
    """Run every case; yields {id: (result, scratch folder)}."""
    results, root = _run_cases(run_forked)
    yield results
    shutil.rmtree(root, ignore_errors=True)


def test_manifest_covers_every_stage():
    assert len(CASES) >= 30
    assert len({c["id"] for c in CASES}) == len(CASES)
    assert {c["args"][0] for c in CASES} == STAGES
    for c in CASES:  # every file a case reads exists (a typo would make it a 'no such file')
        for a in c["args"][1:]:
            name = a[len("{in}/"):]
            if len(name) > 255:  # the too-long-name cases
                continue
            if a.startswith("{in}/") and "/" not in name and c["id"] not in (
                    "optimize_missing_input", "m_optimize_input_name_newline",
                    "m_calibrate_data_name_escape"):
                assert (HERE / a[len("{in}/"):]).is_file(), (c["id"], a)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, runs):
    judge(case, runs)


def judge(case, runs) -> None:
    proc, out = runs[case["id"]]
    no_devices, dev_before, dev_after = runs["__devices__"]
    assert dev_after == dev_before  # every device node still the same node
    if proc is None:
        pytest.skip(f"{case['id']} needs device nodes: {no_devices}")
    err = proc.stderr.decode()
    assert proc.returncode == case["exit"] == 2, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("espstream: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # no blank line either
    assert "\x1b" not in err and "\r" not in err, err  # no colour codes, no carriage return
    assert case["message"] in lines[0], (case["message"], lines[0])
    assert "Traceback" not in err and "internal error" not in err
    assert proc.stdout == b""  # no model (or part of one) on stdout either
    output = _subst(case["output"], out, Path("/nonexistent-devices"))
    if output is not None:
        assert not Path(output).exists()
    assert list(out.iterdir()) == []  # no temporary file, no folder left behind
    before, after = runs["__inputs__"]
    assert after == before  # inputs unchanged, nothing added beside them


@pytest.fixture(scope="module")
def real_runs():
    """Every case as a real `python -m espstream` subprocess (3 at a time)."""
    def runner(commands):
        def one(c):
            return c[0], espstream(*c[1], timeout=300)

        with ThreadPoolExecutor(3) as pool:
            return dict(pool.map(one, commands))

    results, root = _run_cases(runner)
    yield results
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_real_process(case, real_runs):
    judge(case, real_runs)


def _load_make():
    spec = importlib.util.spec_from_file_location("bad_inputs_make", HERE / "make.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Files made by espstream's own stages (and the malformed copies of them: espdl_*, m_*) follow
# those stages' output; the rest are fixed bytes that make.py must reproduce exactly.
FROM_STAGES = ("tiny.qdq.onnx", "tiny.espdl", "qdq_truncated.onnx", "optimize_espdl_given")


def test_make_is_deterministic_and_committed(tmp_path):
    make = _load_make()
    make.main(tmp_path)
    made = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name for p in HERE.iterdir() if p.is_file() and p.suffix != ".py"}
    assert set(made) == committed
    assert made["manifest.json"] == (HERE / "manifest.json").read_bytes()
    for name, data in made.items():
        if name.startswith(("espdl_", "m_")) or name in FROM_STAGES:
            continue
        assert data == (HERE / name).read_bytes(), name


# ---- the process: signals, pipes, closed standard streams (real subprocesses) ----------------


def _popen(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "espstream", *args], cwd=ROOT,
                            stderr=subprocess.PIPE, **kw)


@pytest.mark.parametrize("sig, code, word", [(15, 143, "terminated"), (2, 130, "interrupted")])
def test_signal_during_a_write_leaves_no_temporary_file(tmp_path, sig, code, word):
    """SIGTERM / SIGINT while the model is being written to a pipe nobody reads (the JSON
    report already in its temporary file): exit 143 / 130, one line, nothing left beside the
    report's path."""
    import fcntl
    import signal as sg
    import time

    r, w = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):  # a small pipe: the 30 kB model blocks in write()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    folder = tmp_path / "out"
    folder.mkdir()
    p = _popen("optimize", "models/stream_tcn.onnx", "-q", "--no-check", "--json",
               str(folder / "r.json"), stdout=w)
    os.close(w)
    try:
        def report_pending():  # (not the probe check_output makes and removes at once)
            return [f for f in folder.iterdir() if f.name.startswith(".r.json.")]

        deadline = time.monotonic() + 120
        while not report_pending() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        assert len(report_pending()) == 1, list(folder.iterdir())
        time.sleep(0.1)
        p.send_signal(sg.Signals(sig))
        err = p.stderr.read()
        assert p.wait(timeout=60) == code, err
    finally:
        os.close(r)
        if p.poll() is None:
            p.kill()
    assert err == f"espstream: error: {word}\n".encode()
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("model", ["tests/bad_inputs/tiny.onnx", "models/stream_tcn.onnx"])
def test_reader_closing_the_pipe_early_is_an_error(model):
    """`espstream optimize M | head -c 10`: not delivered, so not exit 0, whether the model
    fits in the pipe (small) or not."""
    p = _popen("optimize", model, "-q", "--no-check", stdout=subprocess.PIPE)
    assert len(os.read(p.stdout.fileno(), 10)) == 10  # unbuffered, as head -c 10 reads
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 2, err
    assert err.count("\n") == 1 and err.startswith("espstream: error: stdout: the reader "
                                                   "closed the pipe"), err


def test_reader_taking_everything_is_success():
    p = _popen("optimize", "tests/bad_inputs/tiny.onnx", "-q", "--no-check",
               stdout=subprocess.PIPE)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and err == b"" and len(out) > 1000


def test_fifo_reader_closing_early_is_an_error(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    p = _popen("export", str(HERE / "tiny.qdq.onnx"), "-q", "-o", str(fifo))
    fd = os.open(fifo, os.O_RDONLY)
    assert len(os.read(fd, 10)) == 10
    os.close(fd)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 2, err
    assert err.count("\n") == 1 and "the reader closed the pipe" in err, err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pipe"]


@pytest.mark.parametrize("fd, args, message", [
    (1, ("optimize", "tests/bad_inputs/tiny.onnx", "-q", "--no-check"),
     "stdout is closed; give -o FILE"),
    (0, ("optimize", "-q", "--no-check"), "no ONNX model given: stdin is closed"),
    (0, ("inspect",), "stdin is closed"),
    (1, ("inspect", "tests/bad_inputs/tiny.espdl", "-q", "--json", "-"), "stdout is closed"),
    (1, ("ops",), "stdout is closed"),
])
def test_closed_standard_stream(fd, args, message):
    """With stdout closed the model goes nowhere else (not to stderr); with stdin closed the
    input is missing: exit 2, one line."""
    proc = subprocess.run([sys.executable, "-m", "espstream", *args], cwd=ROOT,
                          capture_output=fd != 1, stderr=subprocess.PIPE if fd == 1 else None,
                          preexec_fn=lambda: os.close(fd), timeout=120)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert err == f"espstream: error: {message}\n" or (
        err.count("\n") == 1 and message in err), err


def test_closed_stderr_still_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "espstream", "optimize",
                           str(HERE / "onnx_truncated.onnx"), "-o", str(tmp_path / "o")],
                          cwd=ROOT, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2),
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == b""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.02 * i for i in range(1, 41)])
def test_sigterm_at_any_moment(tmp_path, delay):
    """SIGTERM at any moment of a convert (start-up imports included): killed before the
    handler exists (-15), or one line and exit 143, or done (0); never a crash, a traceback or
    a temporary file left."""
    import signal as sg
    import time

    p = _popen("convert", "models/stream_tcn.onnx", "--random", "4", "--chunk", "4", "-q",
               "--verify-samples", "1", "-o", str(tmp_path / "o.espdl"), "--json",
               str(tmp_path / "o.json"), stdout=subprocess.PIPE)
    time.sleep(delay)
    p.send_signal(sg.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode in (-15, 143, 0), err
    left = sorted(x.name for x in tmp_path.iterdir())
    if p.returncode == 143:
        assert err == b"espstream: error: terminated\n" and left == []
    elif p.returncode == -15:
        assert err == b"" and left in ([], ["o.espdl", "o.json"])
    else:
        assert left == ["o.espdl", "o.json"]

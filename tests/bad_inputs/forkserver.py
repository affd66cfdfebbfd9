"""Run many `espstream` command lines fast: import espstream and its libraries once, then fork
one child per command line, which runs `espstream.cli.main` as `python -m espstream` would.

Used by `tests/test_bad_inputs.py` (a fresh interpreter per test session, so no test's state
leaks into a case). Protocol: one JSON request per stdin line, {"id", "args", "cwd", "timeout"};
after stdin ends, one JSON result per line on stdout as each child ends, {"id", "rc", "stdout",
"stderr"} (outputs base64). A child still running at its timeout is killed (rc -9). At most
`--jobs` children run at once.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import tempfile
import time


def _warm() -> None:
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnx_graphsurgeon  # noqa: F401
    import onnxruntime  # noqa: F401

    import espstream.cli  # noqa: F401
    import espstream.convert  # noqa: F401
    import espstream.espdl  # noqa: F401
    import espstream.export  # noqa: F401
    import espstream.inspect  # noqa: F401
    import espstream.modelio  # noqa: F401
    import espstream.optimize  # noqa: F401
    import espstream.quant  # noqa: F401
    import espstream.stream.streamify  # noqa: F401
    import espstream.verify  # noqa: F401
    import espstream.verify_int8  # noqa: F401


def _child(args: list[str], cwd: str, out_fd: int, err_fd: int) -> None:
    code = 1
    try:
        os.chdir(cwd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", closefd=False, buffering=1,  # noqa: SIM115
                                           errors="backslashreplace")
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)
        sys.argv = ["espstream", *args]
        from espstream.cli import main

        main(args)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # what `python -m` would print
        import traceback

        traceback.print_exc()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001, S110
            pass
    os._exit(code)


def main() -> None:
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 3
    sys.path.insert(0, os.getcwd())
    _warm()
    requests = [json.loads(line) for line in sys.stdin if line.strip()]
    running: dict[int, tuple[dict, object, object, float]] = {}
    out = sys.stdout

    def finish(pid: int, status: int) -> None:
        req, fo, fe, _ = running.pop(pid)
        fo.seek(0)
        fe.seek(0)
        rc = os.waitstatus_to_exitcode(status) if status is not None else -9
        out.write(json.dumps({"id": req["id"], "rc": rc,
                              "stdout": base64.b64encode(fo.read()).decode(),
                              "stderr": base64.b64encode(fe.read()).decode()}) + "\n")
        out.flush()
        fo.close()
        fe.close()

    while requests or running:
        while requests and len(running) < jobs:
            req = requests.pop(0)
            fo, fe = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            pid = os.fork()
            if pid == 0:
                _child(req["args"], req["cwd"], fo.fileno(), fe.fileno())
            running[pid] = (req, fo, fe, time.monotonic() + req.get("timeout", 300))
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            finish(pid, status)
            continue
        now = time.monotonic()
        for p, (_, _, _, deadline) in list(running.items()):
            if now > deadline:
                os.kill(p, signal.SIGKILL)
                os.waitpid(p, 0)
                finish(p, None)
        time.sleep(0.005)


if __name__ == "__main__":
    main()

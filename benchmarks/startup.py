"""Start-up time of the espstream command against a bare Python process, in one run.

    .venv/bin/python benchmarks/startup.py [--repeat 7] [--out benchmarks/results/startup.json]

Each command runs `repeat` times, interleaved with the others so that load on the machine falls on
all of them alike; the figure is the median wall time of the whole process. The children may
write and read bytecode caches (PYTHONDONTWRITEBYTECODE is removed from their environment), as an
installed package has them (pip compiles them at install), and each command has one untimed
warm-up run: where the environment forbids writing them, an editable checkout would compile all
of espstream's sources on every start (about 0.2 s of `convert`'s start here, by cProfile).
Goals (issue 18): `espstream --version` within 0.3 s of `python -c pass`, `espstream inspect`
of a bundled model within 0.8 s. Also reported: the import time of ml_dtypes (onnx imports it
on every start; its 0.7.0 release is why pyproject.toml keeps it below 0.7).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ES = [PY, "-m", "espstream"]


def commands(tmp: Path) -> dict[str, list[str]]:
    return {
        "python -c pass": [PY, "-c", "pass"],
        "import ml_dtypes": [PY, "-c", "import ml_dtypes"],
        "espstream --version": [*ES, "--version"],
        "espstream inspect model.onnx": [*ES, "inspect", str(ROOT / "models/tutorial_tcn.onnx")],
        "espstream inspect model.espdl": [*ES, "inspect", str(tmp / "m.espdl")],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/startup.json"))
    args = ap.parse_args()
    tmp = Path(ROOT / "out")
    tmp.mkdir(exist_ok=True)
    subprocess.run([*ES, "convert", str(ROOT / "models/tutorial_tcn.onnx"), "-o",
                    str(tmp / "m.espdl"), "--random", "4", "-q"], check=True)
    cmds = commands(tmp)
    warm_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for cmd in cmds.values():  # warm-up: bytecode caches written
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       env=warm_env)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.repeat):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True, env=warm_env)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["python -c pass"]
    import ml_dtypes

    result = {
        "repeat": args.repeat,
        "ml_dtypes": ml_dtypes.__version__,
        "median_s": med,
        "bytecode": "cached (PYTHONDONTWRITEBYTECODE removed for the children, one warm-up run)",
        "over_python_s": {k: v - base for k, v in med.items()},
        "headline": {
            "--version over python -c pass (s, goal <= 0.3)":
                round(med["espstream --version"] - base, 3),
            "inspect .onnx over python -c pass (s, goal <= 0.8)":
                round(med["espstream inspect model.onnx"] - base, 3),
            "inspect .espdl over python -c pass (s, goal <= 0.8)":
                round(med["espstream inspect model.espdl"] - base, 3),
        },
    }
    for k, v in med.items():
        print(f"{k:<32} {v:6.3f} s  (+{v - base:.3f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

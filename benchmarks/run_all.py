"""Run every benchmark script in this folder and gather their JSON into benchmarks/results.json.

    .venv/bin/python benchmarks/run_all.py [--only NAME ...]

Each script is run in its own process with `--out benchmarks/results/NAME.json`; a script that
fails is recorded with its exit status and the tail of its stderr, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="script names without .py")
    args = parser.parse_args()
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    (HERE / "results").mkdir(exist_ok=True)
    summary: dict[str, dict] = {}
    for script in scripts:
        out = HERE / "results" / f"{script.stem}.json"
        print(f"== {script.name}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), "--out", str(out)], text=True,
                              stderr=subprocess.PIPE)
        entry: dict = {"seconds": round(time.perf_counter() - start, 2),
                       "exit_status": proc.returncode}
        if proc.returncode == 0 and out.exists():
            entry["results"] = json.loads(out.read_text())
        else:
            entry["stderr_tail"] = proc.stderr.strip().splitlines()[-5:]
            print(proc.stderr, file=sys.stderr)
        summary[script.stem] = entry
    (HERE / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    for name, entry in summary.items():
        state = "ok" if entry["exit_status"] == 0 else f"FAILED ({entry['exit_status']})"
        print(f"{name:<22} {state:<12} {entry['seconds']:>8.1f} s")
    print(f"wrote {HERE / 'results.json'}")
    return 0 if all(e["exit_status"] == 0 for e in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

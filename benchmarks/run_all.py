"""Run every benchmark script in this folder and gather their JSON into benchmarks/results.json.

    .venv/bin/python benchmarks/run_all.py [--only NAME ...]

Each script is run in its own process with `--out benchmarks/results/NAME.json`; a script that
fails is recorded with its exit status and the tail of its stderr, and the others still run.
Scripts in HELPERS are parts of another benchmark, not benchmarks (ppq_side.py runs in the ESP-PPQ
environment for convert_vs_ppq.py) and are not run here.

At the end: a status table, then each script's headline figures: the top-level "headline" dict of
its JSON (key: value, one a line); a script without one gets a line pointing at its JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELPERS = {"run_all", "ppq_side"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="script names without .py")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: gather the scripts' existing results/*.json")
    args = parser.parse_args()
    scripts = sorted(p for p in HERE.glob("*.py") if p.stem not in HELPERS)
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    (HERE / "results").mkdir(exist_ok=True)
    summary: dict[str, dict] = {}
    for script in scripts:
        out = HERE / "results" / f"{script.stem}.json"
        if args.collect:
            if out.exists():
                summary[script.stem] = {"seconds": None, "exit_status": 0,
                                        "results": json.loads(out.read_text())}
            continue
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
        took = "collected" if entry["seconds"] is None else f"{entry['seconds']:>8.1f} s"
        print(f"{name:<22} {state:<12} {took}")
    print_headlines(summary)
    print(f"wrote {HERE / 'results.json'}")
    return 0 if all(e["exit_status"] == 0 for e in summary.values()) else 1


def print_headlines(summary: dict[str, dict]) -> None:
    """Each script's "headline" dict, if its JSON has one."""
    for name, entry in summary.items():
        results = entry.get("results")
        head = results.get("headline") if isinstance(results, dict) else None
        if not isinstance(head, dict) or not head:
            if entry["exit_status"] == 0:
                print(f"\n{name}: (no headline in its JSON; see benchmarks/results/{name}.json)")
            continue
        print(f"\n{name}:")
        width = min(max(len(str(k)) for k in head), 40)
        for key, value in head.items():
            print(f"  {str(key):<{width}}  {_short(value)}")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


if __name__ == "__main__":
    sys.exit(main())

"""ESP-DL's operator test configurations, exported with ESP-PPQ (with test values) for the suite.

    benchmarks/.venv-ppq/bin/python tools/ops_suite/generate.py OP_CFG.toml -o tests/data/ops-suite
        [--ops Conv Add ...] [--timeout 180] [--jobs 2] [--espdl-commit SHA]

Reads ESP-DL's `tools/ops_test/config/op_cfg.toml` (never committed here), keeps per operator the
configurations `choose.select` names (the smallest one per distinct code path) made smaller by
`choose.shrink` where their sizes are free, builds each as a small float model
(`models.build`), writes it as `<op>/<config>/model.onnx` (a torch model exported the way
`espdl_quantize_torch` exports it: opset 18, constant folding, the TorchScript exporter) and runs
`espdl_quantize_onnx(..., export_test_values=True)` on it for the targets esp32s3, esp32p4 and
`c`, 8 and 16 bits (as far as the configuration's `quant_bits` allows), writing
`<op>/<config>/<target>_<bits>.espdl`. ESP-PPQ's settings are those of ESP-DL's own generator
(`QuantizationSettingFactory.espdl_setting()`, dispatcher "allin", the configuration's
`dispatch_table`, the meta section's `calib_steps` random calibration samples, batch 1), except
the int16 lookup tables: ESP-DL's generator asks for `int16_lut_step=1` (a 65536-entry, 128 KB
table per int16 activation, even a ReLU); the suite keeps ESP-PPQ's default step (a 257-entry
table, or the step ESP-PPQ's LUT fusion stamps on the operator), which ESP-DL reads as well.
Seeds: every configuration's weights, calibration samples and test input come from
`torch.manual_seed(crc32("<op>/<config>"))`, the same for all its exports.

The exports run in worker processes (one operator per worker, `--jobs` at a time); an export
that takes longer than `--timeout` seconds is killed, recorded as a failure, and a new worker
goes on with the next one. Every failure of ESP-PPQ (an exception, a refusal, a timeout, a crash
of the process) is recorded in `manifest.json` with the first line of its error: it is a fact
about the anchor, not hidden. What ESP-PPQ prints goes to `--log` (default: a temporary file,
its path printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import choose  # noqa: E402

TARGETS = ("esp32s3", "esp32p4", "c")
BITS = {"int8": 8, "int16": 16}


def config_id(cfg: dict, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg["export_name_prefix"]).strip("_")
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def plan(toml_path: Path, only: list[str] | None) -> tuple[dict, list[dict]]:
    """The meta section and one job per kept configuration."""
    with open(toml_path, "rb") as f:
        data = tomllib.load(f)
    meta = data.get("meta", {})
    jobs = []
    for op, spec in data["ops_test"].items():
        if only and op not in only:
            continue
        cfgs = spec.get("cfg", [])
        taken: set[str] = set()
        ids = [config_id(c, taken) for c in cfgs]
        bits = [BITS[b] for b in spec.get("quant_bits", []) if b in BITS]
        for index, cfg, members in choose.select(op, cfgs):
            jobs.append({
                "op": op,
                "config": ids[index],
                "config_index": index,
                "source_config": choose.shrink(op, cfg),
                "stands_for": [ids[i] for i in members],
                "bits": bits,
                "config_targets": spec.get("targets"),
                "test_func": spec.get("test_func"),
                "package": spec.get("package"),
            })
    return meta, jobs


def first_line(e: BaseException | str) -> str:
    text = str(e) if not isinstance(e, str) else e
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else "(no message)"
    if isinstance(e, BaseException):
        head = f"{type(e).__name__}: {head}"
    return head[:300]


# ---- the worker (inside benchmarks/.venv-ppq) ----------------------------------------------


def _emit(out, **msg) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


def worker(out_dir: Path, meta: dict, tasks: list[dict]) -> None:
    """Runs export tasks; progress on the real stdout, everything ESP-PPQ prints on stderr."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # ESP-PPQ and torch print on stdout: send it to the log
    import numpy as np  # noqa: F401
    import onnx
    import torch
    from esp_ppq import QuantizationSettingFactory
    from esp_ppq.api import espdl_quantize_onnx, get_target_platform

    import models

    torch.set_num_threads(1)
    calib_steps = int(meta.get("calib_steps", 8))
    built: dict[str, str] = {}

    for t in tasks:
        key = t["key"]
        job = t["job"]
        cfg = job["source_config"]
        case_dir = out_dir / job["op"] / job["config"]
        seed = zlib.crc32(f"{job['op']}/{job['config']}".encode())
        _emit(proto, start=key)
        try:
            onnx_path = case_dir / "model.onnx"
            if job["config"] not in built:
                case_dir.mkdir(parents=True, exist_ok=True)
                torch.manual_seed(seed)
                model, in_shapes = models.build(job["op"], cfg)
                if isinstance(model, onnx.ModelProto):
                    onnx.save(model, str(onnx_path))
                else:
                    args = tuple(torch.zeros(s) for s in in_shapes)
                    torch.onnx.export(
                        model, args, str(onnx_path), opset_version=18,
                        do_constant_folding=True, dynamo=False,
                        input_names=[f"x{i}" if len(in_shapes) > 1 else "x"
                                     for i in range(len(in_shapes))])
                built[job["config"]] = str(onnx_path)
            in_shapes = choose.shapes(cfg, job["op"])
            target, bits = t["target"], t["bits"]
            setting = QuantizationSettingFactory.espdl_setting()
            setting.dispatcher = "allin"
            names = {n.name for n in onnx.load(str(onnx_path)).graph.node}
            for name, nb in cfg.get("dispatch_table", {}).items():
                if name not in names:
                    raise RuntimeError(f"dispatch_table names node {name!r}, not in the model "
                                       f"(nodes: {sorted(names)})")
                setting.dispatching_table.append(name, get_target_platform(target, nb))
            torch.manual_seed(seed)
            calib = [[torch.randn(s[1:]) for s in in_shapes] for _ in range(calib_steps)]
            if len(in_shapes) == 1:
                calib = [c[0].unsqueeze(0) for c in calib]
                collate = None
            else:
                calib = [[x.unsqueeze(0) for x in c] for c in calib]
                collate = None
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "model.onnx"
                shutil.copyfile(onnx_path, src)  # ESP-PPQ rewrites its input (onnxsim)
                dst = Path(tmp) / "out.espdl"
                torch.manual_seed(seed)
                espdl_quantize_onnx(
                    onnx_import_file=str(src), espdl_export_file=str(dst),
                    calib_dataloader=calib, calib_steps=calib_steps,
                    input_shape=in_shapes if len(in_shapes) > 1 else in_shapes[0],
                    target=target, num_of_bits=bits, collate_fn=collate, setting=setting,
                    device="cpu", error_report=False, skip_export=False,
                    export_test_values=True, export_config=True, verbose=0,
                    metadata_props={"target": target})
                if not dst.exists():
                    raise RuntimeError("ESP-PPQ returned without writing the .espdl file")
                shutil.copyfile(dst, case_dir / f"{target}_{bits}.espdl")
            _emit(proto, done=key, ok=True)
        except Exception as e:  # noqa: BLE001 - every failure of the anchor is recorded
            _emit(proto, done=key, ok=False, error=first_line(e))


# ---- the driver ------------------------------------------------------------------------------


def _pump(stream, q: queue.Queue) -> None:
    for ln in stream:
        q.put(ln)
    q.put(None)


class Runner:
    """Feeds one operator's tasks to a worker process; kills it on a timeout or a crash and
    starts a new one on the remaining tasks."""

    def __init__(self, out_dir: Path, meta: dict, timeout: float, log) -> None:
        self.out_dir, self.meta, self.timeout, self.log = out_dir, meta, timeout, log

    def run(self, tasks: list[dict]) -> dict[str, dict]:
        results: dict[str, dict] = {}
        pending = list(tasks)
        while pending:
            spec = json.dumps({"out": str(self.out_dir), "meta": self.meta, "tasks": pending})
            proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=self.log, text=True)
            proc.stdin.write(spec)
            proc.stdin.close()
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            current, started = None, time.monotonic()
            while True:
                spent = 0.0 if current is None else time.monotonic() - started
                wait = self.timeout - spent
                # the first task also pays for the worker's imports
                try:
                    line = lines.get(timeout=max(wait, 0.1) + (60 if not results else 0))
                except queue.Empty:
                    proc.kill()
                    proc.wait()
                    if current is not None:
                        results[current] = {
                            "ok": False, "error": f"timeout: no result after {self.timeout:.0f} s"}
                    break
                if line is None:  # the worker ended
                    proc.wait()
                    if current is not None:
                        results[current] = {"ok": False, "error": f"the exporting process died "
                                            f"(exit code {proc.returncode})"}
                    break
                msg = json.loads(line)
                if "start" in msg:
                    current, started = msg["start"], time.monotonic()
                else:
                    results[msg["done"]] = {"ok": msg["ok"], "error": msg.get("error")}
                    current = None
            done = set(results)
            if current is None and all(t["key"] in done for t in pending):
                break
            pending = [t for t in pending if t["key"] not in done]
        return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="ESP-DL's tools/ops_test/config/op_cfg.toml")
    ap.add_argument("-o", "--out", default="tests/data/ops-suite")
    ap.add_argument("--ops", nargs="+", help="only these operators (the manifest keeps the rest)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per export")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes at a time")
    ap.add_argument("--espdl-commit", help="esp-dl commit of the config (default: a 40-hex "
                    "commit named in a README.md next to it)")
    ap.add_argument("--log", help="where ESP-PPQ's output goes (default: a temporary file)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(sys.stdin.read())
        worker(Path(spec["out"]), spec["meta"], spec["tasks"])
        return 0
    if not args.config:
        ap.error("the path of op_cfg.toml is required")

    toml_path = Path(args.config)
    out_dir = Path(args.out).resolve()
    meta, jobs = plan(toml_path, args.ops)
    commit = args.espdl_commit
    readme = toml_path.parent / "README.md"
    if not commit and readme.exists():
        m = re.search(r"\b[0-9a-f]{40}\b", readme.read_text())
        commit = m.group(0) if m else None

    manifest_path = out_dir / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() and args.ops else None
    for op in sorted({j["op"] for j in jobs}):
        shutil.rmtree(out_dir / op, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    tasks_by_op: dict[str, list[dict]] = {}
    for j in jobs:
        for target in TARGETS:
            for bits in j["bits"]:
                key = f"{j['op']}/{j['config']}/{target}_{bits}"
                tasks_by_op.setdefault(j["op"], []).append(
                    {"key": key, "job": j, "target": target, "bits": bits})

    log_path = Path(args.log) if args.log else Path(tempfile.mkstemp(suffix=".log",
                                                                     prefix="ops-suite-")[1])
    print(f"ops-suite: {len(jobs)} configurations, "
          f"{sum(len(v) for v in tasks_by_op.values())} exports; ESP-PPQ log: {log_path}",
          flush=True)
    results: dict[str, dict] = {}
    lock = threading.Lock()
    ops = list(tasks_by_op)
    t0 = time.monotonic()

    with open(log_path, "w") as log:
        def drain():
            runner = Runner(out_dir, meta, args.timeout, log)
            while True:
                with lock:
                    if not ops:
                        return
                    op = ops.pop(0)
                res = runner.run(tasks_by_op[op])
                with lock:
                    results.update(res)
                    bad = sum(1 for r in res.values() if not r["ok"])
                    print(f"  {op}: {len(res) - bad}/{len(res)} exported "
                          f"({time.monotonic() - t0:.0f} s)", flush=True)

        threads = [threading.Thread(target=drain) for _ in range(max(1, args.jobs))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    files, failures = [], []
    for tasks in tasks_by_op.values():
        for t in tasks:
            j, r = t["job"], results.get(t["key"], {"ok": False, "error": "not run"})
            rel = f"{j['op']}/{j['config']}/{t['target']}_{t['bits']}.espdl"
            entry = {"op": j["op"], "config": j["config"], "target": t["target"],
                     "bits": t["bits"]}
            if r["ok"]:
                files.append({"path": rel, **entry,
                              "target_in_config": (j["config_targets"] is None
                                                   or t["target"] in j["config_targets"]),
                              "config_index": j["config_index"]})
            else:
                failures.append({**entry, "error": r["error"]})
    configs = [{k: j[k] for k in ("op", "config", "config_index", "stands_for", "bits",
                                  "config_targets", "test_func", "package", "source_config")}
               | {"onnx": f"{j['op']}/{j['config']}/model.onnx"} for j in jobs]
    if old is not None:  # a partial run (--ops): keep the other operators' records
        keep = {j["op"] for j in jobs}
        files = [f for f in old["files"] if f["op"] not in keep] + files
        failures = [f for f in old["failures"] if f["op"] not in keep] + failures
        configs = [c for c in old["configs"] if c["op"] not in keep] + configs
    versions = _versions()
    manifest = {
        "about": "ESP-DL tools/ops_test configurations exported by ESP-PPQ with test values; "
                 "made by tools/ops_suite/generate.py (see README.md)",
        "espdl_commit": commit,
        "config_file": "tools/ops_test/config/op_cfg.toml",
        "versions": versions,
        "targets": list(TARGETS),
        "meta": meta,
        "configs": sorted(configs, key=lambda c: (c["op"], c["config_index"])),
        "files": sorted(files, key=lambda f: f["path"]),
        "failures": sorted(failures, key=lambda f: (f["op"], f["config"], f["target"], f["bits"])),
    }
    manifest_path.write_text(dump_manifest(manifest))
    print(f"ops-suite: {len(files)} files, {len(failures)} failures -> {manifest_path} "
          f"({time.monotonic() - t0:.0f} s)")
    return 0


def dump_manifest(manifest: dict) -> str:
    """JSON with one line per configuration, file and failure (small, and diffs well)."""
    parts = []
    for k, v in manifest.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            rows = ",\n  ".join(json.dumps(x, separators=(",", ":")) for x in v)
            parts.append(f"{json.dumps(k)}: [\n  {rows}\n ]")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("esp-ppq", "torch", "onnx", "onnxsim", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


if __name__ == "__main__":
    sys.exit(main())

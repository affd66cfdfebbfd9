"""ESP-DL's own operator test suite, replayed in the simulator (issue 13).

tests/data/ops-suite/ holds, for the configurations of ESP-DL's tools/ops_test/config/op_cfg.toml
that tools/ops_suite/generate.py keeps, the `.espdl` files ESP-PPQ 1.3.12 exports with test
values for esp32s3, esp32p4 and c, int8 and int16 (see its README.md and manifest.json). ESP-DL's
CI runs such files on the chips and asserts `model->test() == ESP_OK`: exact for int8, +-1 for
int16. Here the simulator runs each file's test inputs and must give its test outputs, to the
same tolerance (the share of int16 values that are exact is reported too).

What the simulator does not do yet is listed in XFAIL, each with its reason: such cases are
strict expected failures, so a case that starts to pass fails the run until its entry goes (the
count of covered operators can only grow). `test_summary` prints the table per operator
(`pytest -s tests/test_ops_suite.py -k summary`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from espstream.espdl import read
from espstream.sim import Simulator

# Log's file runs np.log on negative test inputs (ESP-PPQ fed it standard-normal values)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DATA = Path(__file__).parent / "data" / "ops-suite"
MANIFEST = json.loads((DATA / "manifest.json").read_text()) if (DATA / "manifest.json").exists() \
    else {"files": [], "failures": [], "configs": []}
FILES = MANIFEST["files"]

NOT_SIMULATED = "the simulator does not implement ESP-DL's {} (UserError: not supported)"
# (op, bits or None, target or None, config substring / tuple of config names / None, reason).
# First match wins.
XFAIL: list[tuple[str, int | None, str | None, str | tuple | None, str]] = []


def xfail_reason(f: dict) -> str | None:
    for op, bits, target, sub, reason in XFAIL:
        if op == f["op"] and bits in (None, f["bits"]) and target in (None, f["target"]) \
                and (sub is None or (sub in f["config"] if isinstance(sub, str)
                                     else f["config"] in sub)):
            return reason
    return None


#: path -> (ok, values compared, values exact, message), filled by test_file for the summary
RESULTS: dict[str, tuple[bool, int, int, str]] = {}


def check(f: dict) -> tuple[bool, int, int, str]:
    """Run one file; (within tolerance, values, exact values, what differs)."""
    g = read((DATA / f["path"]).read_bytes())
    assert g.test_inputs and g.test_outputs, "the file has no test values"
    out = Simulator(g, target=f["target"]).run({n: t.data for n, t in g.test_inputs.items()})
    tol = 0 if f["bits"] == 8 else 1
    total = exact = 0
    worst = []
    ok = True
    for name, want in g.test_outputs.items():
        got = out[name]
        if got.shape != want.data.shape:
            return False, 0, 0, f"output {name}: shape {got.shape}, file says {want.data.shape}"
        if got.dtype != want.data.dtype:
            return False, 0, 0, f"output {name}: {got.dtype}, file says {want.data.dtype}"
        if got.dtype.kind == "f":
            # Model::test on the chip: |got - want| <= 2e-5, NaN equal to NaN
            g64, w64 = got.astype(np.float64), want.data.astype(np.float64)
            both_nan = np.isnan(g64) & np.isnan(w64)
            d = np.where(both_nan, 0.0, np.abs(g64 - w64))
            d = np.where(np.isnan(d), np.inf, d)
            ftol = 2e-5
        else:
            d = np.abs(got.astype(np.int64) - want.data.astype(np.int64))
            ftol = tol
        total += d.size
        exact += int(np.count_nonzero(d == 0))
        off = int(np.count_nonzero(d > ftol))
        if off:
            ok = False
            worst.append(f"{name}: {off}/{d.size} values off by more than {ftol} (max {d.max()})")
    return ok, total, exact, "; ".join(worst)


def _param(f: dict):
    reason = xfail_reason(f)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(f, id=f["path"].removesuffix(".espdl"), marks=marks)


@pytest.mark.parametrize("f", [_param(f) for f in FILES])
def test_file(f: dict) -> None:
    try:
        res = check(f)
    except Exception as e:
        RESULTS[f["path"]] = (False, 0, 0, f"{type(e).__name__}: {str(e).splitlines()[0]}")
        raise
    RESULTS[f["path"]] = res
    ok, total, exact, msg = res
    assert ok, msg


def test_manifest_is_consistent() -> None:
    """Every listed file exists, every committed file is listed, every XFAIL entry is used."""
    if not FILES:
        pytest.skip("no ops-suite data")
    listed = {f["path"] for f in FILES}
    on_disk = {str(p.relative_to(DATA)) for p in DATA.glob("*/*/*.espdl")}
    assert listed == on_disk
    ops = {f["op"] for f in FILES}
    stale = [e for e in XFAIL if not any(xfail_reason(f) == e[4] for f in FILES)]
    assert not stale, f"XFAIL entries that match no file: {stale}"
    assert not {e[0] for e in XFAIL} - ops


def test_summary() -> None:
    """Per operator: files, passing, expected failures, int16 exact share (printed)."""
    if not FILES:
        pytest.skip("no ops-suite data")
    per_op: dict[str, dict] = defaultdict(lambda: {"files": 0, "pass": 0, "xfail": 0,
                                                   "n16": 0, "exact16": 0, "reasons": set()})
    for f in FILES:
        if f["path"] not in RESULTS:  # run alone: compute
            try:
                RESULTS[f["path"]] = check(f)
            except Exception as e:
                RESULTS[f["path"]] = (False, 0, 0, f"{type(e).__name__}: {e}")
        ok, total, exact, _ = RESULTS[f["path"]]
        row = per_op[f["op"]]
        row["files"] += 1
        reason = xfail_reason(f)
        if reason:
            row["xfail"] += 1
            row["reasons"].add(reason)
        elif ok:
            row["pass"] += 1
        if f["bits"] == 16 and ok:
            row["n16"] += total
            row["exact16"] += exact
    covered = sorted(op for op, r in per_op.items() if r["pass"])
    lines = [f"{'operator':20} {'files':>5} {'pass':>5} {'xfail':>5}  int16 exact (passing files)"]
    for op in sorted(per_op):
        r = per_op[op]
        share = (f"{100 * r['exact16'] / r['n16']:.2f}% ({r['n16'] - r['exact16']} of "
                 f"{r['n16']} off by 1)") if r["n16"] else "-"
        lines.append(f"{op:20} {r['files']:5} {r['pass']:5} {r['xfail']:5}  {share}")
    n16 = sum(r["n16"] for r in per_op.values())
    e16 = sum(r["exact16"] for r in per_op.values())
    configs = {(f["op"], f["config"]) for f in FILES}
    lines.append(f"operators with passing files: {len(covered)} of {len(per_op)}; configurations "
                 f"with files {len(configs)}; files {len(FILES)}; targets "
                 f"{', '.join(sorted({f['target'] for f in FILES}))}; int16 exact share "
                 f"{100 * e16 / max(n16, 1):.3f}% ({n16 - e16} of {n16} values off by 1); "
                 f"ESP-PPQ failures "
                 f"{len(MANIFEST['failures'])}")
    print("\n" + "\n".join(lines))
    # a file that is neither expected to fail nor passing is a failure of test_file already;
    # here: no operator is silently absent
    assert all(r["pass"] + r["xfail"] <= r["files"] for r in per_op.values())


def test_registry_claims_match_the_suite() -> None:
    """An ESP-DL operator the registry says is checked by ESP-DL's golden values appears in a
    file expected to pass (int8 exact, int16 +-1: what ESP-DL's CI asserts); every operator
    such files hold is claimed as pinned (golden or an ESP-PPQ fixture), so `espstream ops`
    says what is really checked."""
    from espstream.ops import registry

    if not FILES:
        pytest.skip("no ops-suite data")
    pinned: set[str] = set()
    for f in FILES:
        if xfail_reason(f) is None:
            pinned |= {n.op_type for n in read((DATA / f["path"]).read_bytes()).nodes}
    claims = {s.espdl: s.checked for s in registry.all_sims()}
    golden = {op for op, c in claims.items() if c == registry.ESPDL_GOLDEN}
    assert golden - pinned == set(), "claimed golden without a passing int8 file"
    assert {op for op in pinned if claims.get(op) == registry.NUMPY_ORACLE} == set()
    assert pinned - set(claims) == set(), "files hold operators the simulator lacks"

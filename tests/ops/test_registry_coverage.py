"""The registry is the one table of what espstream supports: every operator it lists is
claimed by its module's test file, as a case run through calibrate, export and the simulator
(`CASES`) or as refused at a named stage (`NOT_LOWERED`); README's operator table is generated
from it; `espstream ops` prints it."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from espstream.ops import registry

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
STREAM_ONLY = ("quantize", "float_pointwise")


def _test_module(name: str):
    path = HERE / f"test_{name}.py"
    assert path.exists(), f"operator module {name} has no test file {path.name}"
    spec = importlib.util.spec_from_file_location(f"ops_cov_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("module", sorted({s.module for s in registry.all_ops()}))
def test_every_operator_has_a_test(module: str) -> None:
    specs = [s for s in registry.all_ops() if s.module == module]
    mod = _test_module(module)
    if module in STREAM_ONLY:
        assert all(s.calibrate is None or s.onnx == "ReduceMean" for s in specs)
        return
    claimed = set(mod.CASES) | set(mod.NOT_LOWERED)
    full = {s.onnx for s in specs if s.calibrate and s.lower
            and all(registry.sim(e) is not None for e in s.espdl)}
    untested = full - set(mod.CASES)
    assert not untested, f"{module}: no run through every stage for {sorted(untested)}"
    missing = {s.onnx for s in specs} - claimed
    assert not missing, f"{module}: operators without a test: {sorted(missing)}"
    assert not set(mod.NOT_LOWERED) & full, "an operator that runs every stage is listed as refused"


def test_every_simulated_operator_belongs_to_a_module() -> None:
    modules = {p.stem for p in (ROOT / "espstream" / "ops").glob("*.py")}
    assert all(s.module in modules for s in registry.all_sims())
    assert {"Conv", "Gemm", "Add", "AveragePool", "Swish", "StreamingCache"} <= {
        s.espdl for s in registry.all_sims() if s.checked == registry.ESPPPQ_FIXTURE}


def test_readme_operator_table_is_the_registry() -> None:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- ops-table -->\n(.*?)<!-- /ops-table -->", text, re.S)
    assert m, "README.md has no generated operator table"
    assert m.group(1) == readme_table(), ("README's operator table is not the registry's: "
                                          "python tests/ops/test_registry_coverage.py --write")


def readme_table() -> str:
    rows = ["| ONNX | module | calibrate | ESP-DL | simulator checked by | streamify |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in registry.table():
        if not (r["calibrate"] or r["espdl"]):
            continue
        checked = ", ".join(r["checked_against"]) or ("-" if not r["espdl"] else "not simulated")
        rows.append(f"| {r['onnx']} | {r['module']} | {r['calibrate'] or '-'} | "
                    f"{', '.join(r['espdl']) or '-'} | {checked} | {r['streamify']} |")
    return "\n".join(rows) + "\n"


def test_ops_command_prints_and_writes_json(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "espstream", "ops", "--json", "-"],
                         capture_output=True, text=True, check=True).stdout
    table = json.loads(out)
    names = {r["onnx"] for r in table["operators"]}
    assert {"Conv", "GRU", "espstream.StreamingCache"} <= names
    assert len(names) == len(registry.all_ops())
    text = subprocess.run([sys.executable, "-m", "espstream", "ops"], capture_output=True,
                          text=True, check=True).stdout
    assert text.splitlines()[0].startswith("ONNX") and "Conv" in text


def test_ops_command_refuses_an_unwritable_json_path(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE.parent))
    from cli_util import assert_user_error, espstream

    target = tmp_path / "missing" / "ops.json"
    assert_user_error(espstream("ops", "--json", str(target)), "does not exist")
    assert not target.parent.exists()


if __name__ == "__main__":
    if "--write" in sys.argv:  # regenerate README.md's table after adding an operator
        readme = ROOT / "README.md"
        text = re.sub(r"(<!-- ops-table -->\n).*?(<!-- /ops-table -->)",
                      lambda m: m.group(1) + readme_table() + m.group(2), readme.read_text(),
                      flags=re.S)
        readme.write_text(text)
    else:
        print(readme_table(), end="")

"""The one table of what espstream knows about each operator.

Every module of `espstream.ops` (one per operator or small family) registers, for the ONNX
operators it handles, an `OpSpec`: its calibration rule, its streaming rule (and the facts about
its values that streaming needs), its lowering to ESP-DL nodes; and, for the ESP-DL operators it
writes, a `SimSpec`: how the simulator computes them. The stage drivers (`quant.plan`,
`stream.rules`, `lower`, `sim`) walk the graph and dispatch through this table; the one-line
refusals and `espstream ops` read it too.

Rules:
1. Modules are found, not listed: every module of the package whose name does not start with
   `_` is imported once, on the first lookup, in name order. Adding an operator touches its
   module (and its test file), nothing else.
2. One ONNX operator (domain, type) and one ESP-DL operator type are registered once; a second
   registration is an error at import time.
3. A stage that finds no rule for an operator refuses it with every unsupported node of the model
   named in one line (the drivers build that line from `unsupported`).
4. `checked` says what pins a simulated operator's arithmetic: "esp-ppq fixture" (files ESP-PPQ
   made, reproduced bit for bit), "espdl golden" (values ESP-DL's own tests check on the chips),
   or "numpy oracle" (a NumPy reading of ESP-DL's sources only).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: what pins a simulated operator's arithmetic (rule 4)
ESPPPQ_FIXTURE = "esp-ppq fixture"
ESPDL_GOLDEN = "espdl golden"
NUMPY_ORACLE = "numpy oracle"


@dataclass(frozen=True)
class OpSpec:
    """What the stages know about one ONNX operator.

    calibrate: `f(pc, node, float_outs)`, the plan rule (`espstream.quant.plan`); None: refused.
    stream: `f(ctx, node)`, the streaming rule (`espstream.stream.rules`); None: the generic
        rule (a node reading a time axis without a rule is refused).
    stream_first: the streaming rule runs before the check for shapes computed from the data
        (Reshape replaces such a shape; ops that mix every frame refuse first).
    zero_keeping / nonneg / keep_sign: for the pointwise streaming rule: f(0) == 0 (pre-start
        zeros stay zeros), the output is never negative, the output has the input's sign.
    lower: `f(lw, node)`, the lowering (`espstream.lower`); None: refused by `export`.
    espdl: the ESP-DL operator(s) the lowering writes.
    bits: the integer widths the lowering handles.
    stream_rule: one line for `espstream ops`: what the streaming rule does.
    """

    onnx: str
    module: str
    domain: str = ""
    calibrate: Callable[..., None] | None = None
    calibrate_rule: str = ""
    stream: Callable[..., None] | None = None
    stream_rule: str = ""
    stream_first: bool = False
    zero_keeping: bool = False
    nonneg: bool = False
    keep_sign: bool = False
    lower: Callable[..., None] | None = None
    espdl: tuple[str, ...] = ()
    bits: tuple[int, ...] = (8, 16)


@dataclass(frozen=True)
class SimSpec:
    """How the simulator computes one ESP-DL operator: `compile(sim, node) -> fn(args) -> outs`.

    lut: when ESP-DL's module replaces its own arithmetic by the file's `lut` table: "" never
        (the attribute is ignored), "s8" in 8-bit nodes only (what most activation modules'
        deserializers do), "always" (the LUT module itself, and Gelu).
    """

    espdl: str
    module: str
    compile: Callable[..., Callable[[list], list]]
    checked: str = NUMPY_ORACLE
    lut: str = ""


@dataclass
class _Registry:
    ops: dict[tuple[str, str], OpSpec] = field(default_factory=dict)
    sims: dict[str, SimSpec] = field(default_factory=dict)
    # lowering rules that claim a node before its operator's rule (patterns over several nodes)
    lower_patterns: list[Callable[..., bool]] = field(default_factory=list)
    # how the simulator computes a node whose `lut` table ESP-DL uses (`SimSpec.lut`)
    table_lookup: Callable[..., Callable[[list], list]] | None = None
    loaded: bool = False


_REG = _Registry()


def register(spec: OpSpec) -> OpSpec:
    key = (spec.domain, spec.onnx)
    if key in _REG.ops:
        raise RuntimeError(f"operator {spec.onnx} is registered twice ({_REG.ops[key].module}, "
                           f"{spec.module})")
    _REG.ops[key] = spec
    return spec


def register_sim(spec: SimSpec) -> SimSpec:
    if spec.espdl in _REG.sims:
        raise RuntimeError(f"ESP-DL operator {spec.espdl} is simulated twice")
    _REG.sims[spec.espdl] = spec
    return spec


def register_lower_pattern(fn: Callable[..., bool]) -> Callable[..., bool]:
    """`fn(lw, node) -> bool`: True when it lowered (or absorbed) `node` itself."""
    _REG.lower_patterns.append(fn)
    return fn


def register_table_lookup(fn: Callable[..., Callable[[list], list]]) -> None:
    _REG.table_lookup = fn


def table_lookup() -> Callable[..., Callable[[list], list]] | None:
    _load()
    return _REG.table_lookup


def _load() -> None:
    if _REG.loaded:
        return
    _REG.loaded = True
    import espstream.ops as pkg

    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not m.name.startswith("_") and m.name != "registry":
            importlib.import_module(f"espstream.ops.{m.name}")


def op(op_type: str, domain: str = "") -> OpSpec | None:
    """The spec of an ONNX operator (domain "" or "ai.onnx" for the standard ones)."""
    _load()
    return _REG.ops.get(("" if domain in ("", "ai.onnx", None) else domain, op_type))


def sim(op_type: str) -> SimSpec | None:
    _load()
    return _REG.sims.get(op_type)


def lower_patterns() -> list[Callable[..., bool]]:
    _load()
    return list(_REG.lower_patterns)


def all_ops() -> list[OpSpec]:
    _load()
    return sorted(_REG.ops.values(), key=lambda s: (s.domain, s.onnx))


def all_sims() -> list[SimSpec]:
    _load()
    return sorted(_REG.sims.values(), key=lambda s: s.espdl)


def calibrated() -> list[str]:
    """Standard ONNX operators calibrate has a rule for, sorted."""
    return sorted(s.onnx for s in all_ops() if s.calibrate is not None and not s.domain)


def lowered() -> list[str]:
    return sorted(s.onnx for s in all_ops() if s.lower is not None and not s.domain)


def simulated() -> list[str]:
    return sorted(s.espdl for s in all_sims())


def table() -> list[dict[str, Any]]:
    """One row per ONNX operator: what each stage does with it (`espstream ops`)."""
    rows = []
    for s in all_ops():
        sims = [sim(e) for e in s.espdl]
        checked = sorted({x.checked for x in sims if x is not None})
        rows.append({
            "onnx": f"{s.domain}.{s.onnx}" if s.domain else s.onnx,
            "module": s.module,
            "calibrate": s.calibrate_rule if s.calibrate is not None else None,
            "streamify": s.stream_rule or ("generic" if s.stream is None else s.stream.__name__),
            "espdl": list(s.espdl) if s.lower is not None else [],
            "bits": list(s.bits) if s.lower is not None else [],
            "simulated": bool(s.espdl) and all(x is not None for x in sims),
            "checked_against": checked,
        })
    return rows


def sim_table() -> list[dict[str, Any]]:
    return [{"espdl": s.espdl, "module": s.module, "checked_against": s.checked}
            for s in all_sims()]


def format_table() -> str:
    """The operator table as text (`espstream ops`)."""
    rows = table()
    head = ("ONNX", "module", "calibrate", "ESP-DL", "bits", "simulator checked by", "streamify")
    lines = []
    for r in rows:
        lines.append((
            r["onnx"], r["module"], r["calibrate"] or "-", ",".join(r["espdl"]) or "-",
            "/".join(f"int{b}" for b in r["bits"]) or "-",
            ", ".join(r["checked_against"]) or ("-" if not r["espdl"] else "not simulated"),
            r["streamify"]))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head) - 1)]
    out = []
    for x in [head, *lines]:
        out.append("  ".join(v.ljust(w) for v, w in zip(x[:-1], widths, strict=True)) + "  "
                   + x[-1])
    n_low = sum(1 for r in rows if r["espdl"])
    out.append(f"{len(rows)} ONNX operators: {sum(1 for r in rows if r['calibrate'])} calibrated, "
               f"{n_low} lowered to ESP-DL, {len(rows)} with a streaming rule or the generic one; "
               f"{len(all_sims())} ESP-DL operators simulated")
    return "\n".join(out)

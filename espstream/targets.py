"""ESP-DL 3.3's targets and the three arithmetics the simulator knows; which one a file is for.

What differs between chips (ESP-DL v3.3.9 sources: `esp-dl/dl/dl_define_private.hpp`,
`esp-dl/CMakeLists.txt`, `esp-dl/dl/base/dl_base.hpp`, `esp-dl/dl/tool/src/dl_tool.cpp`):

1. esp32p4 and esp32s31 build the PIE v2 kernels (`dl/base/isa/esp32p4`, CONFIG_PIE_V2_BOOST)
   and round ties to even everywhere, C fallbacks included (CONFIG_ROUND_HALF_EVEN_ENABLED).
   Only PIE v2 reads per-output-channel weight exponents (dl_base.hpp: other chips set no
   per-channel factors). Filters are blocked by 16 (int8) / 8 (int16) output channels.
   Arithmetic name: 'esp32p4'.
2. esp32s3 builds the PIE v1 (TIE728) kernels and rounds ties up; filters blocked like P4,
   weights per tensor; ESP-PPQ gives int8 biases 20 bits. Arithmetic name: 'esp32s3'.
3. esp32, esp32s2, esp32c2, esp32c3, esp32c5, esp32c6 have no PIE: the plain C path (esp32's
   Xtensa assembly is only an int16 block copy and bzero; its conv hooks are commented out),
   ties rounded up, filters in the plain layout, weights per tensor. Arithmetic name: 'c'
   (ESP-PPQ's name for this target; accepted as a target name too).

Which target a `.espdl` file is for (`resolve`), in order:

1. `--target` (or `target=`) when given; refused when the file records a target of another
   arithmetic, or when its filters are in a layout that target's kernels do not read.
2. The file's `espstream.target` metadata (espstream's own exports record it).
3. The filters' layout, only where it leaves one arithmetic: plain -> the C path; blocked with
   per-channel exponents -> PIE v2 (esp32p4 / esp32s31). Blocked with per-tensor exponents
   fits both esp32s3 and esp32p4 (ESP-DL's own esp32p4 tutorial files are like that), and a
   file without filters fits all three: then the target must be given.
"""

from __future__ import annotations

from dataclasses import dataclass

from espstream.errors import UserError

ARITHMETICS = ("esp32p4", "esp32s3", "c")


@dataclass(frozen=True)
class Chip:
    """One ESP-DL target and what the simulator needs to know about it."""

    name: str
    arithmetic: str  # one of ARITHMETICS
    isa: str
    rounding: str  # 'half_even' or 'half_up'
    layout: str  # filter byte layout: 'blocked' or 'plain'
    per_channel: bool  # reads per-output-channel weight exponents

    def describe(self) -> str:
        ties = "ties to even" if self.rounding == "half_even" else "ties up"
        return f"{self.name} ({self.isa}, {ties})"


def _chips() -> dict[str, Chip]:
    v2 = dict(arithmetic="esp32p4", isa="PIE v2", rounding="half_even", layout="blocked",
              per_channel=True)
    c = dict(arithmetic="c", isa="C path, no PIE", rounding="half_up", layout="plain",
             per_channel=False)
    out = {n: Chip(n, **v2) for n in ("esp32p4", "esp32s31")}
    out["esp32s3"] = Chip("esp32s3", "esp32s3", "PIE v1", "half_up", "blocked", False)
    out.update({n: Chip(n, **c) for n in ("esp32", "esp32s2", "esp32c2", "esp32c3", "esp32c5",
                                             "esp32c6", "c")})
    return out


#: every target name espstream accepts -> its chip description
CHIPS: dict[str, Chip] = _chips()
NAMES = tuple(CHIPS)


def chip(name: str) -> Chip:
    """The chip of a target name; one clear error for an unknown name."""
    try:
        return CHIPS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown target {name!r}; ESP-DL 3.3's targets are "
                        f"{', '.join(NAMES)}") from None


def arithmetic(name: str) -> str:
    """'esp32p4', 'esp32s3' or 'c': the arithmetic (rounding, layout, bias) of a target name."""
    return chip(name).arithmetic


def same_arithmetic(a: str, b: str) -> bool:
    return arithmetic(a) == arithmetic(b)


def members(arith: str) -> list[str]:
    """The chip names (not the alias 'c') that share one arithmetic."""
    return [n for n, c in CHIPS.items() if c.arithmetic == arith and n != "c"]


@dataclass(frozen=True)
class Resolved:
    """The target a file is simulated for, and why."""

    target: str
    reason: str

    @property
    def chip(self) -> Chip:
        return chip(self.target)

    @property
    def arithmetic(self) -> str:
        return self.chip.arithmetic

    def describe(self) -> str:
        return f"target {self.chip.describe()}: {self.reason}"

    def to_json(self) -> dict[str, str]:
        return {"target": self.target, "arithmetic": self.arithmetic,
                "rounding": self.chip.rounding, "reason": self.reason}


def layout_arithmetics(graph) -> tuple[str, ...]:
    """The arithmetics a file's filters allow (the reader's `layout_targets`); all three when
    the graph has no filters or was not read from a file."""
    got = getattr(graph, "layout_targets", None)
    return tuple(got) if got else ARITHMETICS


def _layout_reason(allowed: tuple[str, ...]) -> str:
    if allowed == ("c",):
        return "its filters are in the plain layout, which only the chips without PIE read"
    if allowed == ("esp32p4",):
        return ("its filters are blocked and carry per-channel exponents, which only PIE v2 "
                "(esp32p4, esp32s31) reads")
    if set(allowed) == {"esp32s3", "esp32p4"}:
        return ("its filters are blocked with per-tensor exponents, which esp32s3 (ties up) "
                "and esp32p4 / esp32s31 (ties to even) both read")
    return "it has no filters whose layout would tell"


def resolve(graph, requested: str | None = None, label: str = "the file") -> Resolved:
    """The target to simulate `graph` for (rules 1-3 of the module docstring)."""
    allowed = layout_arithmetics(graph)
    recorded = graph.metadata.get("espstream.target") if graph.metadata else None
    if recorded is not None:
        chip(recorded)  # an unknown recorded name is one clear error
    if requested is not None:
        want = chip(requested)
        if recorded is not None and not same_arithmetic(recorded, requested):
            raise UserError(f"--target {requested}: {label} records target {recorded} "
                            f"({chip(recorded).describe()}); its exponents were chosen for "
                            "that arithmetic")
        if want.arithmetic not in allowed:
            raise UserError(f"--target {requested}: {label} cannot be for it: "
                            f"{_layout_reason(allowed)}")
        return Resolved(requested, "given with --target")
    if recorded is not None:
        if arithmetic(recorded) not in allowed:
            raise UserError(f"{label} records target {recorded}, but "
                            f"{_layout_reason(allowed)}")
        return Resolved(recorded, "recorded in the file (metadata espstream.target)")
    if len(allowed) == 1:
        name = {"esp32p4": "esp32p4", "esp32s3": "esp32s3", "c": "c"}[allowed[0]]
        others = ", ".join(members(allowed[0]))
        return Resolved(name, f"guessed from the layout: {_layout_reason(allowed)} "
                              f"(same arithmetic on {others})")
    options = " or ".join(f"--target {a}" for a in allowed)
    raise UserError(f"{label} does not record its target and {_layout_reason(allowed)}; "
                    f"give {options}")


def resolve_pair(offline, streaming, requested: str | None,
                 labels: tuple[str, str] = ("OFFLINE", "STREAMING")) -> Resolved:
    """One target for both files of a pair: given, recorded or guessed from either; files that
    can only be for different arithmetics are refused."""
    if requested is not None:
        r = resolve(offline, requested, labels[0])
        resolve(streaming, requested, labels[1])
        return r
    found = []
    for g, lab in ((offline, labels[0]), (streaming, labels[1])):
        try:
            found.append((resolve(g, None, lab), lab))
        except UserError:
            found.append((None, lab))
    known = [(r, lab) for r, lab in found if r is not None]
    if not known:
        resolve(offline, None, labels[0])  # raises the ambiguity error
    r, lab = known[0]
    for g, other in ((offline, labels[0]), (streaming, labels[1])):
        if other == lab:
            continue
        try:
            resolve(g, r.target, other)
        except UserError as e:
            raise UserError(f"{lab} is for {r.target} ({r.reason}), but {e}") from None
    if len(known) == 2 and not same_arithmetic(known[0][0].target, known[1][0].target):
        raise UserError(f"{labels[0]} is for {known[0][0].target} and {labels[1]} for "
                        f"{known[1][0].target}: a pair runs on one chip")
    reason = r.reason if len(known) == 2 else f"{r.reason} ({lab}; the other file fits it)"
    return Resolved(r.target, reason)

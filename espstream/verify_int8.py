"""Integer checks with the simulator (`espstream.sim`): what a device would compute.

1. `check_test_values(graph)`: a `.espdl` file's embedded `test_inputs_value` run through the
   simulator against its `test_outputs_value`, as `Model::test()` does on the chip: exact for
   int8 outputs, +-1 for int16. Per output: the share of identical elements and the largest
   difference in LSBs.
2. `verify_espdl_pair(offline, streaming)`: the streaming file run chunk by chunk (chunk size
   = its input's size on the frame axis, the axis where the two files' input shapes differ)
   against the offline file on whole sequences, exactly. Outputs that keep the frame axis are
   compared frame by frame (offline frame t against streamed frame t + `espstream.delay`);
   outputs without it (window summaries) after the last chunk. A streaming file the
   simulator cannot run (e.g. an Add of a cache output and a chunk: ESP-PPQ's residual
   misalignment) fails the check with the node named.
3. The `int8` verify engine for QDQ ONNX models (`Int8Engine`, registered in
   `espstream.verify.ENGINES`): `espstream.lower` makes the IntGraph, the simulator runs it.
   Float inputs in the ONNX layout are quantized at the input's exponent with the target's
   rounding and put in the runtime layout; outputs come back dequantized in the ONNX layout.
   chunked == offline must hold exactly (tolerance 0).
4. `int8_vs_fakequant(model, samples)`: the simulator against onnxruntime running the same
   QDQ model (the fake-quant model): per output the share of identical elements and the
   largest difference in LSBs of the output's exponent. Measured on models/ calibrated with
   --random (3 sequences): esp32p4, which rounds ties to even like onnxruntime, agrees on
   100% of the int8 outputs of tutorial_tcn, stream_tcn and kws2d; esp32s3 / c round ties up
   and agree on 44-58% (largest difference 1-3 LSB). An AveragePool with
   count_include_pad=0 and padding differs on any target where the window holds padding
   (ESP-DL divides by the full kernel area): up to 9 LSB on a hand-made graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from espstream import log
from espstream.errors import UserError
from espstream.intgraph import IntGraph
from espstream.sim import Simulator

# ---- 1. embedded test values ---------------------------------------------------------------


@dataclass
class IntCheck:
    """One output compared in integers (LSBs of its exponent)."""

    name: str
    dtype: str
    size: int
    identical: int
    max_lsb: int
    tolerance: int
    ok: bool
    note: str = ""

    @property
    def identical_share(self) -> float:
        return self.identical / self.size if self.size else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.name,
            "dtype": self.dtype,
            "elements": self.size,
            "identical": self.identical,
            "identical_share": self.identical_share,
            "max_diff_lsb": self.max_lsb,
            "tolerance_lsb": self.tolerance,
            "ok": self.ok,
            "note": self.note or None,
        }

    def describe(self) -> str:
        if self.note:
            return f"output '{self.name}': {self.note}"
        return (
            f"output '{self.name}': {self.size - self.identical} of {self.size} values differ "
            f"({100 * self.identical_share:.1f}% identical), largest difference "
            f"{self.max_lsb} LSB (allowed {self.tolerance})"
        )


def compare_ints(name: str, want: np.ndarray, got: np.ndarray, tolerance: int) -> IntCheck:
    want, got = np.asarray(want), np.asarray(got)
    if want.shape != got.shape:
        note = f"shape {list(got.shape)} where {list(want.shape)} was expected"
        return IntCheck(name, str(want.dtype), want.size, 0, 0, tolerance, False, note)
    d = np.abs(got.astype(np.int64) - want.astype(np.int64))
    max_lsb = int(d.max(initial=0))
    return IntCheck(name, str(want.dtype), want.size, int(np.count_nonzero(d == 0)), max_lsb,
                    tolerance, max_lsb <= tolerance)  # fmt: skip


def check_test_values(graph: IntGraph, kernels: Any = None,
                      target: str | None = None) -> list[IntCheck]:
    """Run the file's test inputs and compare with its test outputs (Model::test()).

    target: the chip to simulate (`espstream.targets`); default the graph's own."""
    if not graph.test_inputs or not graph.test_outputs:
        raise UserError(
            "the file holds no test values (test_inputs_value / test_outputs_value); export "
            "it with --test-data or --test-random, or compare it with a second file"
        )
    sim = Simulator(graph, kernels, target)
    feeds = {}
    for vi in graph.inputs:
        if vi.name not in graph.test_inputs:
            raise UserError(f"the file has no test value for input '{vi.name}'")
        feeds[vi.name] = graph.test_inputs[vi.name].data
    out = sim.run(feeds)
    checks = []
    for name, want in graph.test_outputs.items():
        if name not in out:
            raise UserError(f"test output '{name}' is not an output of the graph")
        tol = 1 if want.data.dtype == np.int16 else 0
        checks.append(compare_ints(name, want.data, out[name], tol))
    return checks


def print_int_checks(title: str, checks: list[IntCheck], verdict: bool = True) -> None:
    from espstream.report import table

    log.info(title)
    head = ["output", "type", "elements", "identical", "max diff LSB"]
    rows = [[c.name, c.dtype, c.size, f"{100 * c.identical_share:.1f}%", c.max_lsb]
            for c in checks]  # fmt: skip
    if verdict:
        head += ["allowed", "result"]
        for r, c in zip(rows, checks, strict=True):
            r += [f"+-{c.tolerance}", "ok" if c.ok else "FAIL"]
    log.info(table(head, rows))
    for c in checks:
        if c.note:
            log.warn(c.describe())


# ---- 2. offline .espdl vs streaming .espdl --------------------------------------------------


def _frame_axis(offline: IntGraph, streaming: IntGraph) -> int:
    for a, b in zip(offline.inputs, streaming.inputs, strict=False):
        if a.shape and b.shape and len(a.shape) == len(b.shape):
            diff = [i for i, (p, q) in enumerate(zip(a.shape, b.shape, strict=True)) if p != q]
            if len(diff) == 1:
                return diff[0]
    axes = {int(n.attrs.get("frame_axis", 1)) for n in streaming.nodes
            if n.op_type == "StreamingCache"}  # fmt: skip
    return axes.pop() if len(axes) == 1 else 1


def _espdl_samples(
    graph: IntGraph, data: Any, random: int | None, seed: int, target: str | None = None
) -> list[dict[str, np.ndarray]]:
    """Integer sequences in the runtime layout for the offline file's inputs."""
    from espstream.quant import scheme
    from espstream.sim import target_rounding

    names = [v.name for v in graph.inputs]
    if data is None and random is None:
        if graph.test_inputs and all(n in graph.test_inputs for n in names):
            return [{n: graph.test_inputs[n].data for n in names}]
        random = 4
    rounding = target_rounding(target or graph.target or graph.metadata.get("espstream.target")
                               or "c")
    if data is None:
        rng = np.random.default_rng(seed)
        data = {}
        for vi in graph.inputs:
            shape = [int(d) for d in vi.shape or []]
            data[vi.name] = rng.standard_normal([random, *shape[1:]]).astype(np.float32)
    elif not isinstance(data, dict):
        if len(names) != 1:
            raise UserError("--data: the model has several inputs; give an .npz by input name")
        data = {names[0]: data}
    n_samples = None
    arrays = {}
    for vi in graph.inputs:
        if vi.name not in data:
            raise UserError(f"--data: no array for input '{vi.name}'")
        x = np.asarray(data[vi.name])
        shape = list(vi.shape or [])
        if x.ndim == len(shape) - 1:
            x = x[None]
        if x.ndim != len(shape) or list(x.shape[1:]) != shape[1:]:
            raise UserError(
                f"--data: input '{vi.name}' needs [N, {', '.join(map(str, shape[1:]))}] in the "
                f"runtime layout (channels last), got {list(x.shape)}"
            )
        if x.dtype.kind == "f":
            bits = 16 if vi.dtype == np.int16 else 8
            x = scheme.quantize(x, vi.exponent, bits, rounding)
        elif x.dtype != vi.dtype:
            raise UserError(f"--data: input '{vi.name}' is {vi.dtype}; got {x.dtype} integers")
        arrays[vi.name] = x
        n_samples = x.shape[0] if n_samples is None else min(n_samples, x.shape[0])
    return [{n: a[k : k + 1] for n, a in arrays.items()} for k in range(n_samples or 0)]


def verify_espdl_pair(
    offline: IntGraph,
    streaming: IntGraph,
    data: Any = None,
    random: int | None = None,
    seed: int = 0,
    kernels: Any = None,
    target: str | None = None,
):
    """Streaming file chunk by chunk vs offline file (module docstring, 2); `target` the chip
    both run as (default each graph's own)."""
    from espstream.sim import run_chunks
    from espstream.verify import OutputCheck, VerifyResult, _accumulate, _take

    if not streaming.streaming:
        log.warn("the second file has no StreamingCache node: it keeps no state between chunks")
    axis = _frame_axis(offline, streaming)
    off_in = offline.inputs[0]
    st_in = {v.name: v for v in streaming.inputs}
    # GRU / LSTM states: fed back by run_chunks; inputs of the streaming file only, or also
    # of the offline file (an explicit state: its offline value is the initial state)
    fed_back = {r["input"] for r in json.loads(
        streaming.metadata.get("espstream.recurrent_states", "[]"))}
    if set(st_in) - fed_back != {v.name for v in offline.inputs} - fed_back:
        raise UserError(
            f"the files have different inputs: {sorted(v.name for v in offline.inputs)} vs "
            f"{sorted(st_in)}"
        )
    chunk = int(st_in[off_in.name].shape[axis])
    samples = _espdl_samples(offline, data, random, seed, target)
    T = int(samples[0][off_in.name].shape[axis])
    if T % chunk:
        raise UserError(f"{T} frames is not a whole number of chunks of {chunk}")
    delay = json.loads(streaming.metadata.get("espstream.delay", "{}"))
    warmup = json.loads(streaming.metadata.get("espstream.warmup", "{}"))
    time_axes = json.loads(streaming.metadata.get("espstream.time_axes", "{}"))
    frame_axis = axis
    res = VerifyResult(engine="int8", chunk=chunk, frames=T, samples=len(samples))
    off_sim = Simulator(offline, kernels, target)
    st_sim = Simulator(streaming, kernels, target)
    checks: dict[str, OutputCheck] = {}
    for sample in samples:
        ref = off_sim.run(sample)
        st_sim.reset()
        try:
            calls = run_chunks(st_sim, sample, frame_axis)
        except UserError as e:
            for name in ref:
                chk = checks.setdefault(name, OutputCheck(name, "?", atol=0.0, rtol=0.0))
                chk.ok, chk.skipped = False, "not compared: the streaming file fails (below)"
            note = f"the streaming file cannot run: {e}"
            if note not in res.notes:
                res.notes.append(note)
            continue
        for name, r in ref.items():
            outs = [c[name] for c in calls if name in c]
            if len(outs) != len(calls):
                checks[name] = OutputCheck(name, "?", skipped="not an output of the streaming file")
                continue
            last = outs[-1]
            # the output's own frame axis (a recurrent layer's output may have it elsewhere
            # than the input has)
            axis = int(time_axes.get(name, frame_axis))
            same_rest = last.ndim == r.ndim > axis and (
                np.delete(r.shape, axis).tolist() == np.delete(last.shape, axis).tolist()
            )
            if same_rest and r.shape[axis] == last.shape[axis] * len(calls):
                kind = "time"  # the output keeps the frame axis: one piece per chunk
            elif last.shape == r.shape:
                kind = "summary"
            else:
                chk = checks.setdefault(name, OutputCheck(name, "?", atol=0.0, rtol=0.0))
                chk.ok = False
                note = (
                    f"{name}: streamed shape {list(last.shape)} fits neither a chunk of nor "
                    f"the whole offline output {list(r.shape)}"
                )
                if note not in res.notes:
                    res.notes.append(note)
                continue
            chk = checks.setdefault(name, OutputCheck(name, kind, atol=0.0, rtol=0.0))
            if kind == "summary":
                chk.compared, chk.frames = 1, "after the last chunk"
                _accumulate(chk, r, last, None, 0)
                continue
            g = np.concatenate(outs, axis=axis)
            d, w = int(delay.get(name, 0)), int(warmup.get(name, 0))
            hi = min(r.shape[axis], g.shape[axis] - d)
            if hi <= w:
                chk.skipped = "no frame to compare; use longer sequences"
                continue
            chk.frames, chk.compared = f"{w}..{hi - 1}", hi - w
            _accumulate(chk, _take(r, axis, w, hi), _take(g, axis, w + d, hi + d), axis, w)
    res.outputs = list(checks.values())
    return res


def espdl_failure(res) -> str:
    """The one-line CheckFailed message of a failed pair check."""
    if res.notes and any(n.startswith("the streaming file cannot run") for n in res.notes):
        return next(n for n in res.notes if n.startswith("the streaming file cannot run"))
    return res.failure()


# ---- 3. the int8 engine for QDQ ONNX models -------------------------------------------------


class Int8Runner:
    """A lowered QDQ model in the simulator, behind verify's Runner interface.

    The simulator keeps StreamingCache state itself, as the chip does: `reset()` (called by
    verify's `run_stream` before every sequence) zeroes the caches; the state inputs the ONNX
    model declares are not read, and its state outputs are answered with an empty array.
    """

    def __init__(self, model: onnx.ModelProto, label: str, kernels: Any = None,
                 graph: IntGraph | None = None) -> None:
        """graph: `lower(model)` when the caller has it already (export's graph)."""
        from espstream.lower import lower

        if graph is None:
            try:
                graph = lower(model)
            except UserError as e:
                raise UserError(f"{label}: {e}") from None
        self.graph = graph
        self.sim = Simulator(self.graph, kernels)
        self.layout = json.loads(self.graph.metadata.get("espstream.layout", "{}"))
        meta = {p.key: p.value for p in model.metadata_props}
        # a GRU / LSTM state is a real input / output pair of the graph (fed back by the
        # caller); only the StreamingCache states live in the simulator
        fed_back = {r["input"] for r in json.loads(
            self.graph.metadata.get("espstream.recurrent_states", "[]"))}
        self.states = [tuple(p) for p in json.loads(meta.get("espstream.states", "[]"))
                       if p[0] not in fed_back]
        from espstream.quant import scheme

        self._scheme = scheme
        self._kept: Any = None  # verify.OutputMemo once keep_outputs() is called

    def keep_outputs(self) -> None:
        """From now on simulate once per distinct input and answer repeats from memory: only
        for an offline graph (a StreamingCache makes the outputs depend on earlier calls)."""
        if self.graph.streaming:
            raise ValueError("the outputs of a streaming graph depend on its state")
        if self._kept is None:
            from espstream.verify import OutputMemo

            self._kept = OutputMemo()

    def quantize(self, name: str, x: np.ndarray) -> np.ndarray:
        vi = self.graph.value_info(name)
        perm = self.layout.get(name, list(range(np.ndim(x))))
        bits = 16 if vi.dtype == np.int16 else 8
        x = np.asarray(x)
        q = self._scheme.quantize(x, vi.exponent, bits, self.sim.rounding).reshape(x.shape)
        if not perm:
            return np.array(q, order="C")  # a 0-d input (ascontiguousarray would make it 1-D)
        return np.ascontiguousarray(np.transpose(q, perm))

    def to_onnx_layout(self, name: str, q: np.ndarray) -> np.ndarray:
        perm = self.layout.get(name, list(range(q.ndim)))
        return np.transpose(q, np.argsort(perm))

    def run_int(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float ONNX-layout feeds -> integer outputs in the ONNX layout."""
        from espstream.verify import feeds_key

        key = feeds_key(feeds) if self._kept is not None else None
        if key is not None and key in self._kept:
            return self._kept.get(key)
        q = {v.name: self.quantize(v.name, feeds[v.name]) for v in self.graph.inputs}
        out = self.sim.run(q)
        res = {n: self.to_onnx_layout(n, v) for n, v in out.items()}
        if key is not None:
            self._kept.put(key, res)
        return res

    def reset(self) -> None:
        """A new sequence: every StreamingCache back to zeros (`Model::reset()`)."""
        self.sim.reset()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {
            n: (v.astype(np.float64) * 2.0 ** self.graph.value_info(n).exponent).astype(np.float32)
            for n, v in self.run_int(feeds).items()
        }
        for _si, so in self.states:
            out[so] = np.zeros(0, np.float32)  # the simulator keeps the state itself
        return out


class Int8Engine:
    """verify's `int8` engine: lower + simulate, exact comparison."""

    name = "int8"

    def __init__(self, kernels: Any = None) -> None:
        self.kernels = kernels

    def load(self, model: onnx.ModelProto, label: str) -> Int8Runner:
        return Int8Runner(model, label, self.kernels)

    def tolerance(self, model: onnx.ModelProto, output: str) -> tuple[float, float]:
        return 0.0, 0.0


def register() -> None:
    from espstream.verify import register_engine

    register_engine("int8", Int8Engine)


# ---- 4. int8 vs fake-quant -----------------------------------------------------------------


@dataclass
class Agreement:
    checks: list[IntCheck] = field(default_factory=list)
    samples: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "outputs": [c.to_json() for c in self.checks]}


def int8_vs_fakequant(
    model: onnx.ModelProto, samples: list[dict[str, np.ndarray]], kernels: Any = None,
    sim: Int8Runner | None = None, ort: Any = None,
) -> Agreement:
    """Simulator vs onnxruntime on one QDQ model (not streaming): LSBs of each output.

    sim / ort: runners of this same `model` to use instead of making new ones (`convert`
    passes those its other checks ran).
    """
    from espstream.verify import OrtRunner

    if sim is None:
        sim = Int8Runner(model, "model", kernels)
    if sim.graph.streaming:
        raise UserError("int8 vs fake-quant agreement is measured on the offline model")
    if ort is None:
        ort = OrtRunner(model, "model")
    agree = AgreementSums(sim)
    for sample in samples:
        agree.add(ort.run(sample), sim.run_int(sample))
    return agree.result()


class AgreementSums:
    """`int8_vs_fakequant`'s counts, one sample at a time: onnxruntime's float outputs and the
    simulator's integers of each sample are added and can then be dropped."""

    def __init__(self, sim: Int8Runner) -> None:
        self.sim = sim
        self.samples = 0
        self._agg: dict[str, list] = {}

    def add(self, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
        """`ref`: onnxruntime's outputs of one sample; `got`: the simulator's (`run_int`)."""
        self.samples += 1
        for name, q in got.items():
            e = self.sim.graph.value_info(name).exponent
            want = np.rint(np.asarray(ref[name], np.float64) * 2.0**-e)
            d = np.abs(q.astype(np.int64) - want.astype(np.int64))
            a = self._agg.setdefault(name, [0, 0, 0, str(q.dtype)])
            a[0] += d.size
            a[1] += int(np.count_nonzero(d == 0))
            a[2] = max(a[2], int(d.max(initial=0)))

    def result(self) -> Agreement:
        checks = [IntCheck(n, dt, size, same, mx, 0, mx == 0)
                  for n, (size, same, mx, dt) in self._agg.items()]
        return Agreement(checks, self.samples)


def onnx_samples(
    model: onnx.ModelProto, data: Any, random: int | None, frames: int | None, seed: int
) -> list[dict[str, np.ndarray]]:
    """Float sequences in the ONNX layout for an offline model (as verify draws them)."""
    from espstream.verify import _input_specs

    specs = _input_specs(model)
    if data is not None:
        if not isinstance(data, dict):
            if len(specs) != 1:
                raise UserError("--data: the model has several inputs; give an .npz by input")
            data = {specs[0][0]: data}
        arrays = {}
        for name, dims, dt in specs:
            if name not in data:
                raise UserError(f"--data: no array for input {name!r}")
            x = np.asarray(data[name])
            arrays[name] = (x[None] if x.ndim == len(dims) - 1 else x).astype(dt)
        n = min(a.shape[0] for a in arrays.values())
        return [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(n)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(random or 4):
        out.append({
            name: rng.standard_normal([d if d else (frames or 64) for d in dims]).astype(dt)
            for name, dims, dt in specs
        })  # fmt: skip
    return out


def print_agreement(a: Agreement) -> None:
    print_int_checks(
        f"int8 simulator vs fake-quant onnxruntime, offline model, {a.samples} sequence(s) "
        "(a report, not a check):",
        a.checks,
        verdict=False,
    )


def is_espdl(path: str | None) -> bool:
    """An .espdl path (by suffix, or by the EDL magic of an existing file)."""
    if not path or path == "-":
        return False
    if path.lower().endswith(".espdl"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(3) in (b"EDL", b"PDL")
    except OSError:
        return False


def verify_espdl_command(
    offline: str,
    streaming: str | None,
    data: Any,
    random: int | None,
    seed: int,
    engine: str | None,
    json_path: str | None,
    target: str | None = None,
    model: list[str] | None = None,
    key: str | None = None,
) -> None:
    """`espstream verify FILE.espdl [STREAMING.espdl]`: print, write JSON, raise CheckFailed.

    target: `--target` (else recorded in the file or told by its layout, `espstream.targets`);
    model: `--model NAME` for packed files (one name for both files, or one per file);
    key: `--key KEYFILE` for encrypted ones.
    """
    from espstream import report
    from espstream.errors import CheckFailed
    from espstream.espdl.open import load_graph
    from espstream.targets import resolve, resolve_pair

    if engine not in (None, "int8"):
        raise UserError(f"--engine {engine}: an .espdl file runs only in the int8 simulator")
    if streaming is not None and not is_espdl(streaming):
        raise UserError(f"{streaming}: compare an .espdl file with another .espdl file")

    names = list(model or [])
    off = load_graph(offline, model=names[0] if names else None, key=key)
    if streaming is None:
        if data is not None or random is not None:
            raise UserError(
                "--data / --random need a second file (OFFLINE.espdl STREAMING.espdl); one "
                "file is checked against its own test values"
            )
        chosen = resolve(off, target, offline)
        with log.muted():  # a file that cannot run is refused before any warning about it
            check_test_values(off, target=chosen.target)
        checks = check_test_values(off, target=chosen.target)
        log.info(f"verify {offline}: {chosen.describe()}")
        print_int_checks(f"verify {offline}: embedded test values (Model::test())", checks)
        ok = all(c.ok for c in checks)
        report.write_json(json_path, {"ok": ok, "file": offline, "target": chosen.target,
                                      "target_choice": chosen.to_json(),
                                      "outputs": [c.to_json() for c in checks]})  # fmt: skip
        if not ok:
            raise CheckFailed("; ".join(c.describe() for c in checks if not c.ok))
        return
    st = load_graph(streaming, model=names[-1] if names else None, key=key)
    chosen = resolve_pair(off, st, target, (offline, streaming))
    # A file that cannot run its own test values (what `verify FILE` alone refuses) is refused
    # here too, before anything is printed; one without test values that fails over the
    # chunks fails the check instead (rule 2).
    for g, path in ((off, offline), (st, streaming)):
        for v in g.inputs:
            if v.shape is None or not all(isinstance(d, int) for d in v.shape):
                raise UserError(f"{path}: graph input {v.name!r} has no fixed shape "
                                f"({v.shape}); ESP-DL runs fixed input shapes")
        try:
            with log.muted():  # (its warnings come with the real run)
                Simulator(g, target=chosen.target)
                if g.test_inputs:
                    check_test_values(g, target=chosen.target)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    res = verify_espdl_pair(off, st, data, random, seed, target=chosen.target)
    log.info(f"verify {offline} {streaming}: {chosen.describe()}")  # (after the files' checks)
    from espstream.verify import print_result

    print_result(res)
    report.write_json(json_path, {"ok": res.ok, "target": chosen.target,
                                  "target_choice": chosen.to_json(),
                                  "runs": [res.to_json()]})
    if not res.ok:
        raise CheckFailed(espdl_failure(res))

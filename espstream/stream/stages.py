"""Staged deployment: one streaming model split into K parts that run one step apart.

ESP-DL's manual streaming guide splits a big streaming model into parts (`model_0`, `model_1`,
...) that the device runs in turn: a chunk enters part 0 at step t, part 1 takes what part 0
made at step t + 1, and so on, so each step computes only one part's share of the work, and the
last part's outputs come K - 1 steps later. `split_model` makes such parts from any streaming
model (float or QDQ, from `streamify`), and `streamify --stages K` writes them.

Rules of the split:
1. The nodes are taken in the model's topological order; a part is a run of consecutive nodes.
   A cut between two nodes is allowed where every tensor crossing it (made before, read after)
   is made in the part just before the cut: a part talks only to the next one (a tensor that
   would skip a part, e.g. a residual branch around a whole part, forbids the cut), and the
   time inputs are read by part 0 only.
2. A crossing tensor is an activation with a time axis that exists in the offline model (not a
   cache window, a mask or a slice of one). In a QDQ model it is the output of an activation
   `DequantizeLinear` (an integer tensor on the device); the next part re-quantizes it with the
   same scale (exact) so that it is an integer input there too.
3. Each StreamingCache (and its state input / output) stays in the part holding the node;
   every part keeps its own states. Constants are copied into every part that reads them.
4. Among all allowed cuts, the K - 1 that minimise the largest part's MACs per chunk are
   chosen (dynamic programming; ties go to the fewest boundary elements). Every part holds at
   least one operator besides Q/DQ. More parts than allowed cuts + 1 is an error listing them.
5. Part i's graph inputs: the model's time inputs (i = 0) or the tensors crossing the cut
   before it (same names), then its state inputs; its outputs: the tensors crossing the cut
   after it, the model's outputs it makes, its state outputs.
6. Metadata of each part: the model's, with `espstream.states`, `espstream.time_axes`,
   `espstream.delay` and `espstream.warmup` restricted to the part's own inputs and outputs, and
   `espstream.stage`: `{"index": i, "count": K, "latency_steps": i, "macs": ..., "inputs_from_
   previous": [...], "outputs_to_next": [...]}`.

Running the parts (`run_pipeline`, what `verify` does with K parts): at step s part i runs on
chunk s - i (if 0 <= s - i < number of chunks), reading what part i - 1 wrote at step s - 1. A
part does not run before its first input exists (zeros would enter its caches). A model output
made by part i for chunk j appears at step j + i: i steps of added latency (K - 1 for outputs
of the last part), i * chunk input frames.

Files: `-o model.onnx` with `--stages K` writes `model_0.onnx` ... `model_{K-1}.onnx` beside it
(the index before the suffix); `export` then turns each into its own `.espdl`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream import log
from espstream.errors import UserError
from espstream.stream import cache as cache_fn
from espstream.verify import VerifyResult

STAGE_KEY = "espstream.stage"
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Part:
    model: onnx.ModelProto
    index: int
    macs: int
    nodes: int
    inputs: list[str]  # boundary / time inputs (no states)
    outputs: list[str]  # boundary and model outputs (no states)
    states: list[tuple[str, str]]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "macs_per_chunk": self.macs, "nodes": self.nodes,
                "inputs": self.inputs, "outputs": self.outputs,
                "states": [list(p) for p in self.states]}


@dataclass
class SplitResult:
    parts: list[Part]
    cuts: list[dict[str, Any]]  # per cut: after which node, crossing tensors, elements
    total_macs: int
    allowed_cuts: int
    files: list[str] = field(default_factory=list)

    @property
    def latency_steps(self) -> int:
        return len(self.parts) - 1

    def to_json(self) -> dict[str, Any]:
        macs = [p.macs for p in self.parts]
        return {
            "stages": len(self.parts),
            "macs_per_chunk": macs,
            "total_macs_per_chunk": self.total_macs,
            "largest_share": max(macs) / self.total_macs if self.total_macs else None,
            "added_latency_steps": self.latency_steps,
            "allowed_cuts": self.allowed_cuts,
            "cuts": self.cuts,
            "parts": [p.to_json() for p in self.parts],
            "files": self.files,
        }


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """MACs of one node per call, counted as `streamify` counts them (count_macs)."""
    from espstream.stream.streamify import count_macs

    return count_macs(SimpleNamespace(graph=SimpleNamespace(node=[node])), shapes)  # type: ignore


def _meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _json(meta: dict[str, str], key: str, default: Any) -> Any:
    try:
        return json.loads(meta[key]) if key in meta else default
    except ValueError:
        raise UserError(f"metadata {key} is not valid JSON") from None


def _static(g: gs.Graph) -> set[int]:
    """Ids of the nodes that compute from constants only (Constant, the DequantizeLinear of a
    weight): copied into every part that reads them instead of crossing a cut (rule 3)."""
    made_static: set[str] = set()
    out: set[int] = set()
    for n in g.nodes:  # topological order
        if n.domain == cache_fn.DOMAIN:
            continue
        if all(isinstance(t, gs.Constant) or t.name in made_static or not t.name
               for t in n.inputs):
            out.add(id(n))
            made_static.update(o.name for o in n.outputs)
    return out


class _Graph:
    """The facts the split needs about the streaming graph, in one topological order."""

    def __init__(self, model: onnx.ModelProto, info: dict[str, Any] | None) -> None:
        from espstream.stream.axes import concrete_shapes

        meta = _meta(model)
        if "espstream.chunk" not in meta:
            raise UserError("the model is not a streaming model (no espstream.chunk metadata); "
                            "split what `espstream streamify` writes")
        if STAGE_KEY in meta:
            raise UserError("the model is already one part of a staged deployment")
        self.meta = meta
        self.states = [tuple(p) for p in _json(meta, "espstream.states", [])]
        self.time_axes = {k: int(v) for k, v in _json(meta, "espstream.time_axes", {}).items()}
        g = gs.import_onnx(model)
        g.toposort()
        static = _static(g)
        self.nodes = [n for n in g.nodes if id(n) not in static]
        self.qdq = any(n.op in QDQ for n in self.nodes)
        self.pos = {id(n): i for i, n in enumerate(self.nodes)}
        self.shapes = concrete_shapes(model, {})
        onodes = {n.name: n for n in model.graph.node}
        self.macs = []
        for n in self.nodes:
            on = onodes.get(n.name)
            self.macs.append(node_macs(on, self.shapes) if on is not None else 0)
        self.state_in = {a for a, _ in self.states}
        self.state_out = {b for _, b in self.states}
        self.inputs = [t.name for t in g.inputs if t.name not in self.state_in]
        self.outputs = [t.name for t in g.outputs if t.name not in self.state_out]
        self.info = info
        self._crossing(g)

    def _cuttable(self, t: gs.Variable) -> bool:
        if t.name in self.state_in or t.name in self.state_out:
            return False
        if self.info is not None and type(self.info.get(t.name)).__name__ != "Time":
            return False
        if t.name not in self.shapes:
            return False
        if not self.qdq:
            return True
        # rule 2: the output of an activation DequantizeLinear
        if len(t.inputs) != 1 or t.inputs[0].op != "DequantizeLinear":
            return False
        src = t.inputs[0].inputs[0]
        return len(src.inputs) == 1 and src.inputs[0].op == "QuantizeLinear"

    def _crossing(self, g: gs.Graph) -> None:
        n = len(self.nodes)
        prod: dict[str, int] = {}
        last: dict[str, int] = {}
        self.tensors: dict[str, gs.Variable] = {}
        for t in g.inputs:
            prod[t.name] = -1
        for i, node in enumerate(self.nodes):
            for o in node.outputs:
                prod[o.name] = i
            for t in node.inputs:
                if isinstance(t, gs.Variable) and t.name in prod:
                    last[t.name] = max(last.get(t.name, -1), i)
                    self.tensors[t.name] = t
        # a state input belongs to its cache's position (rule 3)
        for node in self.nodes:
            if node.domain == cache_fn.DOMAIN and len(node.inputs) > 1:
                prod[node.inputs[1].name] = self.pos[id(node)]
        self.prod = prod
        # per cut p (after node p): the crossing tensors, whether all may cross, their min prod
        self.cross: list[list[str]] = []
        self.ok: list[bool] = []
        self.minprod: list[int] = []
        self.elems: list[int] = []
        events: list[list[str]] = [[] for _ in range(n)]
        for name, lo in prod.items():
            hi = last.get(name, lo)
            for p in range(max(lo, 0), min(hi, n)):
                events[p].append(name)
        for p in range(n):
            names = sorted(events[p])
            self.cross.append(names)
            self.ok.append(all(self._cuttable(self.tensors[t]) for t in names))
            self.minprod.append(min((prod[t] for t in names), default=n))
            self.elems.append(sum(math.prod(self.shapes.get(t, [0])) for t in names))
        work = [node.op not in QDQ for node in self.nodes]
        self.work_prefix = np.concatenate([[0], np.cumsum(work)])
        self.mac_prefix = np.concatenate([[0], np.cumsum(self.macs)]).astype(np.int64)

    def part_ok(self, q: int, p: int) -> bool:
        """Nodes q+1 .. p form a part that ends in an allowed cut (or the model's end)."""
        if self.work_prefix[p + 1] - self.work_prefix[q + 1] == 0:
            return False
        if p == len(self.nodes) - 1:
            return True
        return self.ok[p] and self.minprod[p] > q

    def macs_of(self, q: int, p: int) -> int:
        return int(self.mac_prefix[p + 1] - self.mac_prefix[q + 1])


def choose_cuts(gr: _Graph, stages: int) -> list[int]:
    """Rule 4: the cut positions (after node p) minimising (largest part MACs, boundary elems);
    [] when the model cannot be split into `stages` parts."""
    n = len(gr.nodes)
    # best[k][p]: the best (largest part MACs, boundary elements) for nodes 0..p in k parts,
    # the last ending at p; position -1 is the start. A cut's validity depends only on the
    # cut before it (part_ok), so extending the best prefix is optimal.
    best: list[dict[int, tuple[int, int]]] = [{-1: (0, 0)}]
    back: list[dict[int, int]] = [{}]
    for k in range(1, stages + 1):
        cur: dict[int, tuple[int, int]] = {}
        ptr: dict[int, int] = {}
        for p in ([n - 1] if k == stages else range(n - 1)):
            for q, (m, e) in best[k - 1].items():
                if q >= p or not gr.part_ok(q, p):
                    continue
                cand = (max(m, gr.macs_of(q, p)), e + (gr.elems[p] if p != n - 1 else 0))
                if p not in cur or cand < cur[p]:
                    cur[p], ptr[p] = cand, q
        best.append(cur)
        back.append(ptr)
        if not cur:
            return []
    cuts, p = [], n - 1
    for k in range(stages, 1, -1):
        p = back[k][p]
        cuts.append(p)
    return sorted(cuts)


def _max_stages(gr: _Graph, limit: int) -> int:
    k = 1
    while k < limit and choose_cuts(gr, k + 1):
        k += 1
    return k


def _describe_cut(gr: _Graph, p: int) -> str:
    node = gr.nodes[p]
    return f"after {node.op} '{node.name}'"


def split_model(model: onnx.ModelProto, stages: int, info: dict[str, Any] | None = None
                ) -> SplitResult:
    """Split the streaming `model` into `stages` parts (module docstring). `info`: the offline
    time-axis analysis by tensor name (`streamify.analyze(...).ctx.info`), for rule 2 and the
    boundary tensors' time axes; without it any float activation (QDQ: any activation
    DequantizeLinear output) may cross."""
    if not isinstance(stages, int) or stages < 1:
        raise UserError(f"--stages {stages}: give a positive number of parts")
    gr = _Graph(model, info)
    n = len(gr.nodes)
    if stages == 1:
        cuts: list[int] = []
    else:
        cuts = choose_cuts(gr, stages)
        if not cuts:
            kmax = _max_stages(gr, stages)
            allowed = [p for p in range(n - 1) if gr.ok[p] and gr.cross[p]]
            where = "; ".join(_describe_cut(gr, p) for p in allowed[:8])
            more = f" and {len(allowed) - 8} more" if len(allowed) > 8 else ""
            raise UserError(
                f"--stages {stages}: the model splits into at most {kmax} part(s) (a cut must "
                f"be crossed only by time activations made in the part before it; allowed cuts: "
                f"{where or 'none'}{more})"
            )
    bounds = [-1, *cuts, n - 1]
    parts = []
    for i in range(len(bounds) - 1):
        q, p = bounds[i], bounds[i + 1]
        parts.append(_build_part(model, gr, i, len(bounds) - 1, q, p, cuts))
    cut_info = [{"after": gr.nodes[p].name, "op": gr.nodes[p].op, "tensors": gr.cross[p],
                 "elements": gr.elems[p]} for p in cuts]
    allowed = sum(1 for p in range(n - 1) if gr.ok[p] and gr.cross[p])
    return SplitResult(parts, cut_info, int(gr.mac_prefix[-1]), allowed)


def _build_part(model: onnx.ModelProto, gr: _Graph, index: int, count: int, q: int, p: int,
                cuts: list[int]) -> Part:
    g = gs.import_onnx(model)
    g.toposort()
    static = _static(g)
    nodes = [n for n in g.nodes if id(n) not in static]
    assert [n.op for n in nodes] == [n.op for n in gr.nodes]
    keep_ids = {id(n) for n in nodes[q + 1 : p + 1]} | static
    keep = [n for n in g.nodes if id(n) in keep_ids]
    tensors = g.tensors()
    in_names = gr.inputs if index == 0 else gr.cross[q]
    out_names = list(gr.cross[p]) if p != len(gr.nodes) - 1 else []
    made = {o.name for n in nodes[q + 1 : p + 1] for o in n.outputs}
    for o in gr.outputs:
        if o in made and o not in out_names:
            out_names.append(o)
    cache_nodes = [n for n in nodes[q + 1 : p + 1] if n.domain == cache_fn.DOMAIN]
    states = [(a, b) for a, b in gr.states
              if any(len(c.inputs) > 1 and c.inputs[1].name == a for c in cache_nodes)]
    # QDQ: the DequantizeLinear making each boundary input, to copy its scale / zero point
    dq_of = {t: tensors[t].inputs[0] for t in in_names
             if index > 0 and gr.qdq and tensors[t].inputs}
    qparams = {t: list(dq.inputs[1:]) for t, dq in dq_of.items()}
    dropped = [n for n in g.nodes if n not in keep]
    for n in dropped:
        n.inputs.clear()
        n.outputs.clear()
    g.nodes = keep
    new_nodes = []
    for t in in_names if index > 0 else []:
        var = tensors[t]
        if t in qparams:  # rule 2: the boundary is an integer tensor here too
            consumers = list(var.outputs)
            qv = gs.Variable(f"{t}.stage_in_quantized")
            dv = gs.Variable(f"{t}.stage_in", dtype=np.float32)
            new_nodes.append(gs.Node("QuantizeLinear", f"stage{index}/Q/{t}",
                                     inputs=[var, *qparams[t]], outputs=[qv]))
            new_nodes.append(gs.Node("DequantizeLinear", f"stage{index}/DQ/{t}",
                                     inputs=[qv, *qparams[t]], outputs=[dv]))
            for c in consumers:
                for k, inp in enumerate(c.inputs):
                    if inp is var:
                        c.inputs[k] = dv
    g.nodes.extend(new_nodes)
    ins = [tensors[t] for t in in_names] + [tensors[a] for a, _ in states]
    outs = [tensors[t] for t in out_names] + [tensors[b] for _, b in states]
    for t in ins + outs:
        t.dtype = np.float32
        t.shape = list(gr.shapes[t.name]) if t.name in gr.shapes else t.shape
    g.inputs, g.outputs = ins, outs
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(g, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(o for o in model.opset_import if o.domain != cache_fn.DOMAIN)
    if any(n.domain == cache_fn.DOMAIN for n in out.graph.node):
        cache_fn.install(out)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.graph.name = f"{model.graph.name or 'model'}_{index}"
    macs = gr.macs_of(q, p)
    _part_metadata(out, model, gr, index, count, macs, in_names, out_names, states)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:  # our bug, never the user's
        raise RuntimeError(f"the split wrote an invalid part {index}: {e}") from e
    return Part(out, index, macs, p - q, list(in_names), out_names, states)


def _part_metadata(out: onnx.ModelProto, model: onnx.ModelProto, gr: _Graph, index: int,
                   count: int, macs: int, ins: list[str], outs: list[str],
                   states: list[tuple[str, str]]) -> None:
    meta = gr.meta
    delay = _json(meta, "espstream.delay", {})
    warmup = _json(meta, "espstream.warmup", {})
    axes, d, w = {}, {}, {}
    for t in (*ins, *outs):
        inf = gr.info.get(t) if gr.info is not None else None
        if t in gr.time_axes:
            axes[t] = gr.time_axes[t]
        elif inf is not None and hasattr(inf, "axis"):
            axes[t] = int(inf.axis)
    for t in outs:
        inf = gr.info.get(t) if gr.info is not None else None
        if t in delay:
            d[t], w[t] = delay[t], warmup.get(t, 0)
        elif inf is not None and hasattr(inf, "delay"):
            d[t], w[t] = int(inf.delay), int(inf.warmup)
    new = {
        "espstream.time_axes": json.dumps(axes),
        "espstream.states": json.dumps([list(s) for s in states]),
        "espstream.delay": json.dumps(d),
        "espstream.warmup": json.dumps(w),
        STAGE_KEY: json.dumps({
            "index": index, "count": count, "latency_steps": index, "macs": macs,
            "inputs_from_previous": list(ins) if index > 0 else [],
            "outputs_to_next": [t for t in outs if t not in gr.outputs or index < count - 1
                                and t in _later_inputs(gr, t)],
        }),
    }
    del out.metadata_props[:]
    for k, v in meta.items():
        if k not in new:
            out.metadata_props.add(key=k, value=v)
    for k, v in new.items():
        out.metadata_props.add(key=k, value=v)


def _later_inputs(gr: _Graph, t: str) -> set[str]:
    return {t} if any(t in c for c in gr.cross) else set()


# ---- files --------------------------------------------------------------------------------


def part_paths(output: str, count: int) -> list[str]:
    """`model.onnx` -> `model_0.onnx` ... `model_{K-1}.onnx` (the index before the suffix)."""
    if output == "-":
        raise UserError(f"--stages {count} writes {count} files: give -o PATH.onnx (written as "
                        "PATH_0.onnx ... ), not stdout")
    p = Path(output)
    suffix = p.suffix or ".onnx"
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return [str(p.with_name(f"{stem}_{i}{suffix}")) for i in range(count)]


def print_split(res: SplitResult) -> None:
    from espstream.report import table

    total = res.total_macs or 1
    rows = [[p.index, p.nodes, f"{p.macs:,}", f"{100 * p.macs / total:.1f}%",
             ", ".join(p.inputs) if p.index else "(model inputs)",
             f"{len(p.states)}", p.index] for p in res.parts]
    log.info(f"staged deployment: {len(res.parts)} parts, one per step; chunk enters part 0 at "
             f"step t, part i at step t + i")
    log.info(table(["part", "nodes", "MACs/chunk", "share", "inputs", "states",
                    "latency (steps)"], rows))
    log.info(f"added latency: {res.latency_steps} step(s) for the last part's outputs; "
             f"largest part {max(p.macs for p in res.parts):,} of {res.total_macs:,} MACs per "
             f"chunk ({res.allowed_cuts} allowed cut(s))")
    for c in res.cuts:
        log.info(f"cut after {c['op']} '{c['after']}': {', '.join(c['tensors'])} "
                 f"({c['elements']} values per call)")


# ---- running the parts ----------------------------------------------------------------------


def stage_info(model: onnx.ModelProto, label: str) -> dict[str, Any]:
    meta = _meta(model)
    if STAGE_KEY not in meta:
        raise UserError(f"{label}: not a part of a staged deployment (no {STAGE_KEY} metadata); "
                        "give the files `espstream streamify --stages K` wrote, in order")
    st = _json(meta, STAGE_KEY, {})
    if not isinstance(st, dict) or "index" not in st or "count" not in st:
        raise UserError(f"{label}: malformed {STAGE_KEY} metadata")
    return st


def check_parts(parts: list[onnx.ModelProto], labels: list[str]) -> None:
    """The parts form one pipeline: indices 0..K-1 in order, each fed by the one before."""
    count = len(parts)
    for i, (m, label) in enumerate(zip(parts, labels, strict=True)):
        st = stage_info(m, label)
        if st["count"] != count:
            raise UserError(f"{label} is part {st['index']} of {st['count']}; {count} part(s) "
                            "were given: give all of them, in order")
        if st["index"] != i:
            raise UserError(f"{label} is part {st['index']} but was given in position {i}; "
                            "give the parts in order 0, 1, ...")
    for i in range(1, count):
        prev = {o.name for o in parts[i - 1].graph.output}
        need = stage_info(parts[i], labels[i]).get("inputs_from_previous", [])
        missing = [t for t in need if t not in prev]
        if missing:
            raise UserError(f"{labels[i]} reads {', '.join(missing)}, which {labels[i - 1]} "
                            "does not output: the parts come from different splits")


def run_pipeline(runners: list[Any], parts: list[onnx.ModelProto], first_feeds: list[dict],
                 ) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    """Run the parts as the device does (module docstring) over the chunks in `first_feeds`
    (part 0's non-state feeds per chunk). Returns, per chunk, every model output of every part
    (with the step at which each part produced it checked), and the latency in steps per
    output."""
    from espstream.verify import _input_specs

    count, n = len(parts), len(first_feeds)
    metas = [_meta(m) for m in parts]
    st_pairs = [[tuple(p) for p in _json(mm, "espstream.states", [])] for mm in metas]
    states = []
    for m, pairs in zip(parts, st_pairs, strict=True):
        specs = {name: (dims, dt) for name, dims, dt in _input_specs(m)}
        states.append({a: np.zeros(specs[a][0], specs[a][1]) for a, _ in pairs})
    wanted = [[t for t in stage_info(parts[i + 1], "part")["inputs_from_previous"]]
              for i in range(count - 1)] + [[]]
    register: list[dict[str, np.ndarray] | None] = [None] * count
    per_chunk: list[dict[str, np.ndarray]] = [dict() for _ in range(n)]
    latency: dict[str, int] = {}
    for r in runners:  # a new sequence: a runner keeping its own state (int8) forgets it
        r.reset()
    for step in range(n + count - 1):
        new_register: list[dict[str, np.ndarray] | None] = [None] * count
        for i in range(count):
            chunk = step - i
            if not 0 <= chunk < n:
                continue
            if i == 0:
                feeds = dict(first_feeds[chunk])
            else:
                prev = register[i - 1]
                assert prev is not None, "part i - 1 ran at the step before"
                feeds = {t: prev[t] for t in wanted[i - 1]}
            feeds.update(states[i])
            res = runners[i].run(feeds)
            for a, b in st_pairs[i]:
                states[i][a] = res[b]
            new_register[i] = res
            outs = {b for _, b in st_pairs[i]}
            for name, v in res.items():
                if name in outs or (i < count - 1 and name in wanted[i]
                                    and name not in _model_outputs(metas[i])):
                    continue
                per_chunk[chunk][name] = v
                latency[name] = step - chunk
        register = new_register
    return per_chunk, latency


def _model_outputs(meta: dict[str, str]) -> set[str]:
    st = _json(meta, STAGE_KEY, {})
    return set(_json(meta, "espstream.delay", {})) - set(st.get("outputs_to_next", []))


def verify_stages(
    offline: onnx.ModelProto,
    parts: list[onnx.ModelProto],
    labels: list[str] | None = None,
    data: Any = None,
    random: int | None = None,
    frames: int | None = None,
    engine: str | None = None,
    seed: int = 0,
    overrides: Any = None,
):
    """The K parts, run as a pipeline, against the offline model (what `verify_models` checks
    for one streaming model, with each output taken K-1... steps later as its part says)."""
    from espstream import verify as v
    from espstream.stream.streamify import analyze

    labels = labels or [f"part {i}" for i in range(len(parts))]
    check_parts(parts, labels)
    meta0 = v.read_meta(parts[0], labels[0])
    eng = v.get_engine(engine, offline)
    samples, T = v._make_inputs(offline, meta0, data, random, frames, seed)
    C = meta0.chunk
    n_calls = T // C
    if n_calls == 0:
        raise UserError(f"{T} frames is less than one chunk of {C}; use --frames >= {C}")
    res = StagedVerifyResult(engine=eng.name, chunk=C, frames=T, samples=len(samples))
    names = {s[0] for s in v._input_specs(offline)}
    in_axes = {k: a for k, a in meta0.time_axes.items() if k in names}
    try:
        infos = analyze(offline, axes=in_axes, overrides=overrides, frames=T).outputs
    except UserError as e:
        infos = None
        res.notes.append(f"offline analysis failed ({e}); every produced frame is compared")
    off = eng.load(offline, "offline model")
    runners = [eng.load(m, label) for m, label in zip(parts, labels, strict=True)]
    metas = [v.read_meta(m, label) for m, label in zip(parts, labels, strict=True)]
    owner = {}
    for i, m in enumerate(parts):
        for o in m.graph.output:
            if o.name in _model_outputs(_meta(m)) or o.name not in {
                t for mm in parts[i + 1:] for t in stage_info(mm, "part")["inputs_from_previous"]
            }:
                owner.setdefault(o.name, i)
    checks: dict[str, Any] = {}
    lat_seen: dict[str, int] = {}
    for sample in samples:
        ref = off.run(sample)
        feeds = [{k: np.ascontiguousarray(v._take(x, meta0.time_axes[k], j * C, (j + 1) * C))
                  for k, x in sample.items()} for j in range(n_calls)]
        per_chunk, latency = run_pipeline(runners, parts, feeds)
        lat_seen.update(latency)
        for name, r in ref.items():
            i = owner.get(name)
            meta = metas[i] if i is not None else meta0
            inf = infos.get(name) if infos is not None else None
            kind = "time" if name in meta.time_axes else "summary"
            chk = checks.get(name)
            if chk is None:
                atol, rtol = eng.tolerance(offline, name)
                chk = checks[name] = v.OutputCheck(name, kind, atol=atol, rtol=rtol)
            if i is None or any(name not in c for c in per_chunk):
                chk.skipped = "no part outputs it"
                continue
            if kind == "time":
                g = np.concatenate([c[name] for c in per_chunk], axis=meta.time_axes[name])
            else:
                g = per_chunk[-1][name]
            v.compare_output(chk, res, r, g, meta, inf, T, C)
    res.outputs = list(checks.values())
    res.parts = len(parts)
    res.latency_steps = {k: lat_seen[k] for k in checks if k in lat_seen}
    log.info(f"pipeline of {len(parts)} parts: " + ", ".join(
        f"output {k} comes {n} step(s) after its chunk enters part 0"
        for k, n in res.latency_steps.items()))
    return res


@dataclass
class StagedVerifyResult(VerifyResult):
    """verify's result plus the number of parts and each output's latency in steps."""

    parts: int = 0
    latency_steps: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "parts": self.parts, "latency_steps": self.latency_steps}


def streamify_stages(model: onnx.ModelProto, chunk: int, stages: int,
                     axes: dict[str, int] | None = None, overrides: Any = None):
    """`streamify --stages K`: the one-model streaming conversion, then `split_model`."""
    from espstream.stream.streamify import analyze, streamify_model

    res = streamify_model(model, chunk, axes=axes, overrides=overrides)
    an = analyze(copy.deepcopy(model), axes=axes, overrides=overrides)
    split = split_model(res.model, stages, info=dict(an.ctx.info))
    return res, split

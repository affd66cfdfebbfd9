"""Hand-written state pairs -> ESP-DL StreamingCache nodes, where the pair is a sliding window.

A model written by hand for ESP-DL's manual streaming path (`streaming_forward(x, cache) ->
(y, new_cache)`) keeps its past as a graph input and a graph output, listed in
`espstream.states` (`calibrate --state IN:OUT` records them). ESP-DL keeps state only inside a
`StreamingCache` node, so `sliding_window_caches` rewrites each pair that is a pure sliding
window into one, and refuses, naming the pair and the reason, any other.

A pair (S, S') is a pure sliding window when (rules, checked in this order):
1. S is read by exactly one node, a two-input `Concat(S, X)` (the state first: older frames
   before the new ones), directly or through one QuantizeLinear -> DequantizeLinear pair.
2. S has F frames on the Concat's axis, and X has a static size there (the chunk).
3. S' is the last F frames of that Concat's output W along the same axis: a `Slice` of W
   (or of W's Q/DQ output) with step 1, start F + chunk - F = chunk (or -F), and an end at or
   beyond the last frame; optionally followed by one Q/DQ pair. Nothing else produces S'.
4. In a QDQ model every tensor of the loop carries one exponent: S's Q, W's Q, S''s Q and X's
   DequantizeLinear (`calibrate` ties them); otherwise the window would requantize inside
   the loop, which a StreamingCache cannot do.

The rewrite: `StreamingCache(X, S) -> (W, S')` (domain `espstream`, `window_size` F + 1,
`axis` the Concat's axis) replaces the Concat; the Q/DQ on S and the Slice chain to S' go, W's
own Q/DQ stays (so its readers see the same values). `lower` then emits ESP-DL's
StreamingCache with `frame_axis` in the runtime layout. State pairs already read by a
StreamingCache are left alone; the metadata is unchanged (the pairs keep their names).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.stream import cache as cache_fn

INT64_MAX = 2**63 - 1


def _states(model: onnx.ModelProto) -> list[tuple[str, str]]:
    for p in model.metadata_props:
        if p.key == "espstream.states":
            try:
                return [(str(a), str(b)) for a, b in json.loads(p.value)]
            except (ValueError, TypeError):
                raise UserError("metadata espstream.states is not a JSON list of [state input, "
                                "state output] pairs") from None
    return []


def manual_pairs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """State pairs of `model` whose state input no StreamingCache reads (and which are not a
    GRU / LSTM state, which stays a model input / output pair)."""
    from espstream.ops.recurrent import recurrent_pair_node

    cached = {n.input[1] for n in model.graph.node
              if n.domain == cache_fn.DOMAIN and n.op_type == cache_fn.OP and len(n.input) > 1}
    return [(a, b) for a, b in _states(model)
            if a not in cached and recurrent_pair_node(model, a, b) is None]


class NotAWindow(UserError):
    pass


def _const(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        return np.asarray(v.values) if v is not None else None
    return None


def _scale(dq: gs.Node) -> float | None:
    """The per-tensor scale of a Q or DQ node, else None."""
    s = _const(dq.inputs[1]) if len(dq.inputs) > 1 else None
    return float(s.reshape(-1)[0]) if s is not None and s.size == 1 else None


def _through_qdq_forward(t: gs.Variable) -> tuple[gs.Variable, list[gs.Node], float | None]:
    """t, or t's DQ output when t's one reader is Q -> DQ; with the two nodes and the scale."""
    if len(t.outputs) == 1 and t.outputs[0].op == "QuantizeLinear":
        q = t.outputs[0]
        qo = q.outputs[0]
        if len(qo.outputs) == 1 and qo.outputs[0].op == "DequantizeLinear":
            dq = qo.outputs[0]
            return dq.outputs[0], [q, dq], _scale(q)
    return t, [], None


def _through_qdq_backward(t: gs.Variable) -> tuple[gs.Variable, list[gs.Node], float | None]:
    """t's Q input when t is produced by DQ <- Q; with the two nodes and the scale."""
    if len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear":
        dq = t.inputs[0]
        qo = dq.inputs[0]
        if len(qo.inputs) == 1 and qo.inputs[0].op == "QuantizeLinear":
            q = qo.inputs[0]
            return q.inputs[0], [q, dq], _scale(dq)
    return t, [], None


def _dq_scale(t: gs.Tensor) -> float | None:
    if len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear":
        return _scale(t.inputs[0])
    return None


def _frames(shapes: dict[str, list], t: gs.Tensor, axis: int) -> int | None:
    shape = t.shape if t.shape else shapes.get(t.name)
    if shape is None or axis >= len(shape):
        return None
    d = shape[axis]
    return d if isinstance(d, int) and d > 0 else None


def _exp(scale: float | None) -> str:
    return "?" if scale is None else f"2^{int(round(np.log2(scale)))}"


def _match(graph: gs.Graph, a: str, b: str, shapes: dict[str, list]) -> dict:
    """Rules 1-4 for the pair (a, b); raises NotAWindow naming what differs."""
    tensors = graph.tensors()
    pair = f"state '{a}' -> '{b}' is not a StreamingCache state, and export cannot make it one"
    s_in, s_out = tensors.get(a), tensors.get(b)
    if s_in is None or s_in not in graph.inputs or s_out is None or s_out not in graph.outputs:
        raise NotAWindow(f"{pair}: it is not a graph input / output pair")
    s_read, s_qdq, s_scale = _through_qdq_forward(s_in)
    readers = list(s_read.outputs)
    if len(readers) != 1 or readers[0].op != "Concat":
        what = ", ".join(f"{n.op} '{n.name}'" for n in readers) or "nothing"
        raise NotAWindow(f"{pair}: the state is read by {what}, not by one Concat(state, new "
                         "frames) as in a sliding window")
    cat = readers[0]
    if len(cat.inputs) != 2 or cat.inputs[0] is not s_read:
        raise NotAWindow(f"{pair}: Concat '{cat.name}' must take exactly (state, new frames), "
                         "the state first, to be a sliding window")
    x, w = cat.inputs[1], cat.outputs[0]
    rank = len(s_in.shape or [])
    axis = int(cat.attrs.get("axis", 0))
    axis = axis % rank if rank else axis
    F = _frames(shapes, s_in, axis)
    C = _frames(shapes, x, axis)
    if F is None or C is None:
        raise NotAWindow(f"{pair}: the state or the new frames of Concat '{cat.name}' have no "
                         f"static size on axis {axis}; fix the input shapes")
    w_read, w_qdq, w_scale = _through_qdq_forward(w)
    # S' backward: [Q/DQ] <- Slice <- W (or W's DQ output)
    src, out_qdq, out_scale = _through_qdq_backward(s_out)
    sl = src.inputs[0] if len(src.inputs) == 1 else None
    if sl is None or sl.op != "Slice" or sl.inputs[0] not in (w, w_read):
        made = f"{sl.op} '{sl.name}'" if sl is not None else "no node"
        raise NotAWindow(f"{pair}: the state output is made by {made}, not by a Slice of the "
                         f"last {F} frames of Concat '{cat.name}' as in a sliding window")
    vals = [_const(t) for t in sl.inputs[1:]]
    if len(sl.inputs) < 3 or any(v is None for v in vals):
        raise NotAWindow(f"{pair}: Slice '{sl.name}' needs constant starts / ends")
    starts, ends = int(vals[0].reshape(-1)[0]), int(vals[1].reshape(-1)[0])
    axes = int(vals[2].reshape(-1)[0]) % rank if len(vals) > 2 else 0
    steps = int(vals[3].reshape(-1)[0]) if len(vals) > 3 else 1
    total = F + C
    start = starts + total if starts < 0 else starts
    end = ends + total if ends < 0 else min(ends, INT64_MAX)
    if any(np.asarray(v).size != 1 for v in vals) or axes != axis or steps != 1 or (
        start != total - F or end < total
    ):
        raise NotAWindow(f"{pair}: Slice '{sl.name}' does not keep the last {F} frames of the "
                         f"{total} on axis {axis}, so the state is not a sliding window")
    scales = {"state": s_scale, "window": w_scale, "state output": out_scale,
              "new frames": _dq_scale(x)}
    given = {k: v for k, v in scales.items() if v is not None}
    if given and (len(given) != len(scales) or len(set(given.values())) != 1):
        detail = ", ".join(f"{k} {_exp(v)}" for k, v in scales.items())
        raise NotAWindow(f"{pair}: the loop requantizes ({detail}); calibrate the float model "
                         "with espstream calibrate --state so one exponent covers the loop")
    return {"cat": cat, "x": x, "w": w, "s_in": s_in, "s_out": s_out, "s_qdq": s_qdq,
            "frames": F, "chunk": C, "axis": axis, "slice": sl}


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes help; static graph shapes suffice otherwise
        inferred = model
    shapes: dict[str, list] = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def sliding_window_caches(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every hand-written sliding-window state pair as a StreamingCache node.

    Returns `model` itself when it has no such pair; raises UserError for a pair that is not a
    pure sliding window (module docstring).
    """
    pairs = manual_pairs(model)
    if not pairs:
        return model
    graph = gs.import_onnx(model)
    shapes = _shapes(model)
    found = [_match(graph, a, b, shapes) for a, b in pairs]
    for k, m in enumerate(found):
        cat, s_out = m["cat"], m["s_out"]
        # S' is now made by the cache: the old chain keeps a private output (cleaned up unless
        # another node reads the Slice).
        old = s_out.inputs[0]
        old.outputs[old.outputs.index(s_out)] = gs.Variable(f"{s_out.name}.replaced_{k}",
                                                            dtype=s_out.dtype)
        node = gs.Node(cache_fn.OP, f"{cat.name or 'Concat'}.StreamingCache",
                       {"window_size": m["frames"] + 1, "axis": m["axis"]},
                       inputs=[m["x"], m["s_in"]], outputs=[m["w"], s_out])
        node.domain = cache_fn.DOMAIN
        cat.outputs = []
        cat.inputs = []
        graph.nodes.append(node)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(o for o in model.opset_import if o.domain != cache_fn.DOMAIN)
    cache_fn.install(out)
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:  # our bug, never the user's
        raise RuntimeError(f"the sliding-window rewrite wrote an invalid model: {e}") from e
    return out


def describe(model: onnx.ModelProto) -> list[dict]:
    """Per hand-written pair: whether it is a sliding window (frames, axis) or why not."""
    out = []
    graph = gs.import_onnx(model)
    shapes = _shapes(model)
    for a, b in manual_pairs(model):
        try:
            m = _match(graph, a, b, shapes)
            out.append({"state": [a, b], "sliding_window": True, "frames": m["frames"],
                        "window_size": m["frames"] + 1, "axis": m["axis"]})
        except UserError as e:
            out.append({"state": [a, b], "sliding_window": False, "why": str(e)})
    return out

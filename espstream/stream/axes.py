"""Time-axis analysis: what each tensor carries along time, concrete shapes, constant values,
and automatic detection of each input's time axis.

Vocabulary (used by every rule):
- A *time* tensor has a time axis. Its `stride` is how many input frames one of its frames
  spans (a Fraction: ConvTranspose upsamples). In the streaming model one call holds
  `chunk / stride` of its frames.
- `delay`: the stream lags the offline tensor by this many of its own frames: stream frame `p`
  (counted from the start of the stream) is offline frame `p - delay`. The first `delay` stream
  frames are *pre-start* frames (offline index < 0); `dirty` says they may be non-zero.
- `valid`: at the analysis length T, offline frames `0 .. valid-1` are the ones the stream
  reproduces (the later ones used right padding or frames a crop removed, which a stream
  replaces by real future frames). `warmup`: leading offline frames that may differ because a
  cache starts at zero where zero is not neutral (MaxPool, exclusive AveragePool).
- A *summary* tensor has no time axis left but depends on frames (the last M frames of a
  window, a recurrent layer's final state); it is recomputed every call and equals the offline
  value after the last chunk (when `lag` is 0).
- Anything else is *static* (weights, shapes, constants).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from espstream.errors import UserError, first_line

WARM_ALL = 1 << 40  # "every frame may differ" (a recurrent layer behind a warm-up)
DEFAULT_T = 840  # analysis length for a dynamic time axis: divisible by 1..8, 10, 12, 14, 15


@dataclass(frozen=True)
class Time:
    axis: int
    stride: Fraction = Fraction(1)
    delay: int = 0
    dirty: bool = False
    warmup: int = 0
    valid: int = 0
    length: int = 0
    nonneg: bool = False

    def but(self, **kw) -> Time:
        return replace(self, **kw)


@dataclass(frozen=True)
class Summary:
    lag: int = 0
    warm: bool = False
    comparable: bool = True
    why: str = ""


@dataclass(frozen=True)
class ShapeOf:
    """A static-looking tensor computed from the shape of a time tensor (Shape -> ...)."""

    source: str


Info = Time | Summary | ShapeOf | None


def concrete_shapes(model: onnx.ModelProto, inputs: dict[str, list[int]]) -> dict[str, list[int]]:
    """Static shape of every tensor with the graph inputs fixed to `inputs`.

    onnx shape inference (with data propagation) first; tensors it leaves open are measured by
    running the model once on zeros in onnxruntime.
    """
    m = copy.deepcopy(model)
    for vi in m.graph.input:
        if vi.name in inputs:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, inputs[vi.name], strict=True):
                d.Clear()
                d.dim_value = int(v)
    del m.graph.value_info[:]
    shapes: dict[str, list[int]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        vis = list(inferred.graph.value_info) + list(inferred.graph.input)
        vis += list(inferred.graph.output)
    except Exception:  # noqa: BLE001 - fall back to measuring
        vis = list(m.graph.input)
    for vi in vis:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = [d.dim_value for d in t.shape.dim]
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    wanted = [o for n in m.graph.node for o in n.output if o and o not in shapes]
    if wanted:
        shapes.update(_measure(m, inputs, wanted))
    return shapes


def _measure(m: onnx.ModelProto, inputs: dict[str, list[int]], names: list[str]):
    import onnxruntime as ort

    m = copy.deepcopy(m)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    feeds = {}
    for vi in m.graph.input:
        if vi.name in {i.name for i in m.graph.initializer}:
            continue
        dt = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = np.zeros(inputs.get(vi.name, []), dtype=dt)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(names, feeds)
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"cannot determine tensor shapes (onnxruntime: {first_line(e)}); "
            "run `espstream optimize` with --input-shape first"
        ) from None
    return {n: list(np.shape(v)) for n, v in zip(names, outs, strict=True)}


class Consts:
    """Values of tensors computable from constants alone (initializers, Constant chains)."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.opset = opset
        self._cache: dict[str, np.ndarray | None] = {}
        self._graph = graph

    def value(self, t: gs.Tensor | None) -> np.ndarray | None:
        if t is None:
            return None
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        if t.name in self._cache:
            return self._cache[t.name]
        self._cache[t.name] = None  # cycle guard
        val = None
        if len(t.inputs) == 1:
            node = t.inputs[0]
            if node.op == "Constant":
                val = np.asarray(node.attrs["value"].values)
            elif node.domain in (None, "", "ai.onnx"):
                ins = [self.value(i) if i.name else None for i in node.inputs]
                if all(v is not None or not i.name for v, i in zip(ins, node.inputs, strict=True)):
                    val = self._run(node, ins, t)
        self._cache[t.name] = val
        return val

    def _run(self, node: gs.Node, ins, out: gs.Tensor):
        from onnx.reference import ReferenceEvaluator

        names = [f"i{k}" if i.name else "" for k, i in enumerate(node.inputs)]
        onames = [f"o{k}" for k in range(len(node.outputs))]
        attrs = {}
        for k, v in node.attrs.items():
            if isinstance(v, gs.Constant):
                v = onnx.numpy_helper.from_array(np.asarray(v.values))
            attrs[k] = v
        n = onnx.helper.make_node(node.op, names, onames, **attrs)
        inits = [
            onnx.numpy_helper.from_array(np.asarray(v), nm)
            for v, nm in zip(ins, names, strict=True)
            if nm
        ]
        g = onnx.helper.make_graph(
            [n], "c", [], [onnx.ValueInfoProto(name=o) for o in onames], initializer=inits
        )
        mdl = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
        try:
            res = ReferenceEvaluator(mdl).run(None, {})
        except Exception:  # noqa: BLE001 - not foldable here; callers treat it as non-constant
            return None
        return np.asarray(res[node.outputs.index(out)])

    def ints(self, t: gs.Tensor | None) -> list[int] | None:
        v = self.value(t)
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]


@dataclass
class InputAxes:
    """Time axis per graph input and why it was chosen."""

    axes: dict[str, int] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)


def _input_dims(vi: gs.Variable) -> list:
    return list(vi.shape) if vi.shape is not None else []


def batch_axis_error(name: str, dims: list) -> UserError:
    """The one refusal of a time axis at axis 0 of a graph input, in every stage."""
    shown = ", ".join("?" if not isinstance(d, int) else str(d) for d in dims)
    return UserError(
        f"input {name!r} [{shown}]: its time axis is axis 0, which espstream reads as the batch "
        f"(data files stack samples there, ESP-DL runs batch 1); export the model with a leading "
        f"batch axis, {name} [1, {shown}], so the sequence is axis 1")


def detect_axes(
    graph: gs.Graph, consts: Consts, given: dict[str, int], fixed_shapes: dict[str, list[int]]
) -> InputAxes:
    """Find the time axis of each graph input.

    Rules, first match wins, per input:
    1. `--axis NAME:AXIS` (or an override) given by the user.
    2. Exactly one non-batch dimension is dynamic (symbolic or unknown): that one.
    3. Follow the input through pass-through ops to the first op that uses a time axis:
       a 1-D Conv/Pool (rank 3): axis 2; a 2-D Conv/Pool: the one spatial axis whose padding
       (its own `pads` plus an explicit Pad in front) is causal (more before than after) while
       the other is not; a GRU/LSTM/RNN: its sequence axis (0, or 1 with layout=1).
    4. Otherwise a UserError asking for `--axis NAME:AXIS`.
    5. A time axis at axis 0 (given or found, e.g. a `[sequence, features]` input fed to an
       LSTM) is refused with the reshape that fixes it (`batch_axis_error`): axis 0 is the
       batch in calibrate's data, verify's data and export's test values.
    An input of rank < 2, or with no frame-mixing consumer at all, has no time axis.
    """
    res = InputAxes()
    for inp in graph.inputs:
        name = inp.name
        dims = _input_dims(inp)
        if name in given:
            ax = given[name]
            if not -len(dims) <= ax < len(dims):
                raise UserError(f"--axis {name}:{ax}: input {name} has rank {len(dims)}")
            if ax % len(dims) == 0:
                raise batch_axis_error(name, dims)
            res.axes[name] = ax % len(dims)
            res.why[name] = "given"
            continue
        if len(dims) < 2:
            continue
        dyn = [i for i, d in enumerate(dims) if i > 0 and not isinstance(d, int)]
        dyn = [i for i in dyn if dims[i] is None or isinstance(dims[i], str)]
        if len(dyn) == 1:
            res.axes[name] = dyn[0]
            res.why[name] = "the one dynamic dimension"
            continue
        found = _first_user_axis(inp, consts, fixed_shapes)
        if found is None:
            continue
        if isinstance(found, str):
            raise UserError(
                f"cannot tell the time axis of input {name!r} (shape {dims}): {found}; "
                f"pass --axis {name}:AXIS"
            )
        if found[0] == 0:
            raise batch_axis_error(name, dims)
        res.axes[name] = found[0]
        res.why[name] = found[1]
    return res


_PASS = {
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "Identity", "Dropout", "Cast",
    "QuantizeLinear", "DequantizeLinear", "BatchNormalization", "Mul", "Add", "Sub", "Div",
    "HardSwish", "HardSigmoid", "Elu", "Selu", "Softplus", "Neg", "Abs", "PRelu",
}


def _pads_of(node: gs.Node, rank: int) -> list[int]:
    nsp = rank - 2
    return list(node.attrs.get("pads", [0] * (2 * nsp)))


def _first_user_axis(inp: gs.Variable, consts: Consts, shapes):
    """Walk from `inp` to the first op that uses a time axis (see detect_axes, rule 3).

    `pos[a]` is where input axis `a` sits in the tensor being walked (Transpose moves it).
    """
    rank0 = len(inp.shape or [])
    frontier = [(inp, [], list(range(rank0)))]
    seen = set()
    while frontier:
        t, extra, pos = frontier.pop(0)
        if t.name in seen:
            continue
        seen.add(t.name)
        rank = len(pos)

        def pick(where: int, why: str, pos=pos):
            hits = [a for a in range(rank0) if pos[a] == where]
            return (hits[0], why) if len(hits) == 1 else f"{why} does not map to one input axis"

        for node in t.outputs:
            op = node.op
            if not node.inputs or node.inputs[0] is not t:
                continue
            if op == "Pad":
                p = consts.ints(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("pads")
                if p is None:
                    return "its Pad has non-constant pads"
                frontier.append((node.outputs[0], p, pos))
                continue
            if op == "Transpose":
                perm = list(node.attrs.get("perm") or reversed(range(rank)))
                frontier.append((node.outputs[0], [], [perm.index(q) for q in pos]))
                continue
            if op in ("Conv", "ConvTranspose", "AveragePool", "MaxPool"):
                if rank == 3:
                    return pick(2, f"rank 3 input of {op} {node.name!r}")
                if rank != 4:
                    return f"{op} {node.name!r} over {rank - 2} spatial axes"
                own = _pads_of(node, rank)
                causal = []
                for i in range(2):
                    before = own[i] + (extra[2 + i] if len(extra) == 2 * rank else 0)
                    after = own[i + 2] + (extra[rank + 2 + i] if len(extra) == 2 * rank else 0)
                    causal.append(before > after)
                if causal.count(True) == 1:
                    return pick(2 + causal.index(True), f"the causal padding of {op} {node.name!r}")
                return f"{op} {node.name!r} pads both spatial axes alike"
            if op in ("GRU", "LSTM", "RNN"):
                seq = 1 if int(node.attrs.get("layout", 0)) == 1 else 0
                return pick(seq, f"the sequence axis of {op} {node.name!r}")
            if op in _PASS:
                frontier.extend((o, extra, pos) for o in node.outputs)
    return None

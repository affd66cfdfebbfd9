"""QDQ ONNX (from `calibrate`, streaming or not) -> IntGraph in ESP-DL's runtime layout.

`lower(model, target=None)` reads the QDQ contract stated in `espstream.quant.calibrate` and
writes what ESP-PPQ's exporter writes for the same structures (tests/data/esp-ppq fixtures).
This module holds the contract and the mechanics (Q/DQ folding, names, layouts, requantize);
each operator's lowering lives in its module of `espstream.ops`, found through the registry.

Rules:
1. Refusals first: a model with no QuantizeLinear / DequantizeLinear is a float model (calibrate
   it first); every operator ESP-DL (or this lowering) has no kernel for is listed in ONE error,
   type and name; a `--target` other than the recorded `espstream.target` is an error.
2. Q/DQ fold into exponents: scale 2^e -> exponent e (a scale that is not a power of two is an
   error). `Q(X_float) -> DQ -> X` makes the integer activation `X` (the DQ output's name; a
   graph input keeps its own name). Weights / biases behind a DequantizeLinear (16-bit biases:
   Cast + Mul) become integer initializers with one exponent, or one per output channel when
   the DQ has an axis.
3. Layout: activations of rank >= 3 are channels-last in the runtime (ONNX [N, C, T] ->
   [N, T, C], [N, C, H, W] -> [N, H, W, C]); Conv / pools / elementwise ops / StreamingCache
   keep that layout; Concat / Slice / Split / Softmax / Pad axes are remapped to it; constants
   broadcast against a channels-last activation are permuted with it. Reshape, Flatten,
   Squeeze, Unsqueeze, Gather, MatMul and Transpose need the ONNX order: a `Transpose` back to
   it is inserted before them (once per tensor), as ESP-PPQ does before Flatten; a Transpose
   node on channels-last data has its perm composed instead. Their outputs are in ONNX order.
4. Conv / Gemm / MatMul followed by Relu (its only consumer, no Q/DQ between, as calibrate
   fuses it) -> `activation 'Relu'`; a fused Clip(0, hi) whose hi is beyond the int range of
   its output exponent is the same Relu; another fused Clip becomes Conv + a Clip table at the
   output exponent (exact: clipping commutes with monotone rounding).
5. Weights in the IntGraph's logical layouts: Conv [W, C, N] / [H, W, C, N], depthwise
   [W, N, 1] / [H, W, N, 1] (group == input channels == output channels only), Gemm
   [1, 1, K, N] with transB 0 and alpha = beta = 1; pads in ONNX order
   [b0, b1, e0, e1] (ESP-DL reorders them on loading).
   Any other Conv group is refused: ESP-DL's Conv takes group 1 or group = input channels
   (its operator support table).
6. Elementwise nonlinearities (Sigmoid, Tanh, HardSigmoid, HardSwish, LeakyRelu, Elu, Exp, Log,
   Sqrt, Clip, and SiLU = Mul(x, Sigmoid(x)) -> `Swish`) are LUT ops in 8 bits: a 256-entry
   int8 initializer `<Op>_lut_<k>` (exponent = the output's) indexed by q + 128 with entry
   saturate(round(f(q * 2^e_in) / 2^e_out)), round = the target's rounding; the node carries
   `lut`. In 16 bits the op is written without a table (the runtime computes it).
7. Exponents: data-movement ops (Reshape, Flatten, Transpose, Slice, Squeeze, Unsqueeze, Gather,
   Split, Pad, MaxPool, StreamingCache) output their input's exponent, also where no
   QuantizeLinear follows them (streamify's cache -> Slice chains: the values stay on the
   input's grid, so the output is that integer activation); an Identity is an alias of its
   input (no node), or an `Identity` node where its Q/DQ makes a graph output; Add / Sub /
   Concat inputs must carry the output's. Where the QDQ model requantizes (a Q at another
   exponent behind a DQ, or a second Q of one float tensor), and where an op's natural exponent
   differs from the Q after it, a `RequantizeLinear` node (inputs: x, float scale
   2^(e_out - e_in), int zero point 0, as ESP-PPQ writes them) is inserted; a Q of another
   integer type (mixed precision) makes one too, with the output's type, zero point and
   quant_type, as ESP-PPQ's mixed exports (tests/data/mixed-ppq) hold.
8. Streaming: each `espstream.StreamingCache(x, state) -> (y, next_state)` becomes ESP-DL's
   single-input `StreamingCache` (`frame_axis` in the runtime layout, `quant_type`,
   `window_size`); its state input / output leave the graph (the runtime keeps the state).
   A hand-written state pair (`calibrate --state`) that is a pure sliding window (the state is
   the last frames of Concat(state, x)) becomes such a cache first (`espstream.stream.manual`).
   A GRU / LSTM state pair (initial_h / Y_h, initial_c / Y_c) stays a graph input / output
   pair (ESP-DL keeps no recurrent state between calls; metadata espstream.recurrent_states).
   Any other state pair is an error naming it. Every axis before
   the frame axis must have size 1 (the cache copies flatly). A cache over a quantized
   constant (streamify's start mask: DequantizeLinear of integer ones) reads that constant as
   an initializer in the runtime layout.
9. Every activation gets a ValueInfo (dtype, runtime shape, exponent); `quant_type` 'S8' / 'S16'
   on every node; filters get the target's layout doc string (`espdl.layout`), other
   parameters 'layout ==> UNK' as ESP-PPQ writes. metadata: `espstream.layout` ({graph input /
   output: perm from the ONNX order to the runtime order}) and, for a streaming model,
   `espstream.chunk`, `espstream.delay`, `espstream.warmup`, `espstream.time_axes` (runtime
   axes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from espstream import __version__
from espstream.errors import UserError
from espstream.espdl import layout as espdl_layout
from espstream.intgraph import TARGETS, IntGraph, Node, Tensor, ValueInfo
from espstream.quant import scheme
from espstream.targets import same_arithmetic

QDQ = ("QuantizeLinear", "DequantizeLinear")
STREAM_DOMAIN = "espstream"


def perm_of(rank: int) -> list[int]:
    """ONNX order -> runtime order of an activation of this rank (channels last from rank 3)."""
    return [0, *range(2, rank), 1] if rank >= 3 else list(range(rank))


def inverse(perm: list[int]) -> list[int]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return out


def exponent_of(scale: np.ndarray, where: str) -> list[int]:
    """Exponents of a power-of-two scale (scalar or 1-D)."""
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise UserError(f"{where}: empty scale")
    mant, exp = np.frexp(s)
    if not np.all(mant == 0.5):
        bad = float(s[np.flatnonzero(mant != 0.5)[0]])
        raise UserError(f"{where}: scale {bad} is not a power of two; ESP-DL needs power-of-two "
                        "scales: quantize the model with espstream calibrate")
    return [int(e) - 1 for e in exp]


@dataclass
class Act:
    """An integer activation of the IntGraph."""

    name: str
    exp: int
    shape: list  # ONNX-order shape (ints / None)
    cl: bool  # stored channels-last (only meaningful for rank >= 3)
    dtype: np.dtype

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def perm(self) -> list[int]:
        return perm_of(self.rank) if self.cl else list(range(self.rank))

    def runtime_shape(self) -> list:
        return [self.shape[p] for p in self.perm]

    def runtime_axis(self, axis: int) -> int:
        axis = axis + self.rank if axis < 0 else axis
        return self.perm.index(axis)


@dataclass
class QConst:
    data: np.ndarray  # integer values, ONNX layout
    exps: list[int]
    axis: int | None


def lower(model: onnx.ModelProto, target: str | None = None) -> IntGraph:
    """Lower a QDQ ONNX model to an IntGraph (rules in the module docstring)."""
    if not unsupported_nodes(model):  # rule 8: hand-written sliding-window states
        from espstream.stream.manual import sliding_window_caches

        model = sliding_window_caches(model)
    from espstream.optimize.check import malformed_is_user_error

    with malformed_is_user_error(model):
        return Lowerer(model, target).run()


def recorded_target(model: onnx.ModelProto) -> str | None:
    for p in model.metadata_props:
        if p.key == "espstream.target":
            return p.value
    return None


def check_target(model: onnx.ModelProto, target: str | None) -> str:
    """The target to lower for: the recorded one; a different `target` is an error."""
    rec = recorded_target(model)
    if target is not None and target not in TARGETS:
        raise UserError(f"--target {target!r}: unknown target; choose one of {', '.join(TARGETS)}")
    if rec is not None and rec not in TARGETS:
        raise UserError(f"the model records espstream.target {rec!r}, which is not one of "
                        f"{', '.join(TARGETS)}")
    if target is not None and rec is not None and not same_arithmetic(target, rec):
        raise UserError(f"--target {target} differs from the target the model was calibrated for "
                        f"({rec}): its exponents follow {rec}'s rounding and bias width; "
                        f"recalibrate with --target {target} or drop --target")
    if target is None and rec is None:
        raise UserError("the model records no espstream.target; pass --target "
                        f"({', '.join(TARGETS)})")
    return target or rec  # type: ignore[return-value]


def unsupported_nodes(model: onnx.ModelProto) -> list[str]:
    """'Type name' of every node `lower` cannot turn into an ESP-DL operator: those without a
    lowering in `espstream.ops.registry` (Q/DQ, Constant and constant Casts are the contract)."""
    from espstream.ops import registry

    bad = []
    for n in model.graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type in (*QDQ, "Constant", "Cast"):
            continue
        spec = registry.op(n.op_type, n.domain)
        if spec is None or spec.lower is None or n.domain not in ("", "ai.onnx", STREAM_DOMAIN):
            dom = f"{n.domain}." if n.domain not in ("", "ai.onnx") else ""
            bad.append(f"{dom}{n.op_type} '{n.name}'")
    return bad


class Lowerer:
    def __init__(self, model: onnx.ModelProto, target: str | None) -> None:
        g = model.graph
        if not any(n.op_type in QDQ for n in g.node):
            raise UserError("the model has no QuantizeLinear / DequantizeLinear nodes: it is a "
                            "float model; calibrate it first (espstream calibrate)")
        self.target = check_target(model, target)
        self.rounding = scheme.get_target(self.target).rounding
        bad = unsupported_nodes(model)
        if bad:
            raise UserError(f"{len(bad)} operator(s) ESP-DL has no kernel for (or espstream "
                            f"cannot lower): {', '.join(bad)}")
        self.model = model
        self.meta = {p.key: p.value for p in model.metadata_props}
        self.g = g
        self.consts: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in g.initializer
        }
        for n in g.node:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = numpy_helper.to_array(
                    helper.get_attribute_value(n.attribute[0])
                ) if n.attribute[0].name == "value" else np.asarray(
                    helper.get_attribute_value(n.attribute[0]))
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in dict.fromkeys(n.input):
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_inputs = [v.name for v in g.input if v.name not in self.consts]
        self.graph_outputs = [v.name for v in g.output]
        self.shapes = self._infer_shapes(model)
        self.states = self._states()
        self.state_inputs = {a for a, _ in self.states}
        self.state_outputs = {b for _, b in self.states}
        self.out = IntGraph(
            name=g.name or "main_graph", target=self.target, producer_name="espstream",
            producer_version=__version__,
        )
        self.acts: dict[str, Act] = {}  # float tensor name (DQ output / Q output) -> Act
        self.q_acts: dict[str, Act] = {}  # Q output name -> Act
        self.float_outs: dict[str, str] = {}  # un-quantized float outputs (Softmax)
        self.absorbed: set[str] = set()  # node names lowered as part of another node
        self.transposed: dict[tuple[str, bool], Act] = {}
        self.lut_count: dict[str, int] = {}
        self.used_names: set[str] = set(self.producer) | set(self.consts) | set(self.graph_inputs)
        self.node_names: set[str] = {n.name for n in g.node}

    # ---- model facts ---------------------------------------------------------------------

    def _infer_shapes(self, model: onnx.ModelProto) -> dict[str, list]:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as e:  # onnx raises several types here
            raise UserError(f"ONNX shape inference failed on the model: {e}") from None
        shapes: dict[str, list] = {}
        for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                shapes[v.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in v.type.tensor_type.shape.dim
                ]
        for k, c in self.consts.items():
            shapes[k] = list(c.shape)
        return shapes

    def shape(self, name: str) -> list:
        if name not in self.shapes:
            raise UserError(f"tensor '{name}' has no inferable shape; fix the input shapes with "
                            "espstream optimize --input-shape")
        return list(self.shapes[name])

    def _states(self) -> list[tuple[str, str]]:
        raw = self.meta.get("espstream.states")
        if raw is None:
            return []
        try:
            pairs = [(str(a), str(b)) for a, b in json.loads(raw)]
        except (ValueError, TypeError):
            raise UserError("metadata espstream.states is not a JSON list of "
                            "[state input, state output] pairs") from None
        from espstream.ops.recurrent import recurrent_pair_node

        # a GRU / LSTM state stays a graph input / output pair (ESP-DL keeps no recurrent
        # state between calls): the application copies the output to the input
        self.recurrent_pairs = [(a, b) for a, b in pairs
                                if recurrent_pair_node(self.model, a, b) is not None]
        return [p for p in pairs if p not in self.recurrent_pairs]

    def _recurrent_input(self, name: str) -> bool:
        """A GRU / LSTM state graph input without Q/DQ (streamify's state input of a calibrated
        model, whose values are the state output's, already on its grid; or an LSTM's
        initial_c, which calibrate leaves float): an integer input at the exponent ESP-DL reads
        it at (Y_h's; int16 at the gate exponent for initial_c), in ONNX order."""
        from espstream.ops.recurrent import c_input_node, recurrent_pair_node, state_exponent

        found = [recurrent_pair_node(self.model, a, b)
                 for a, b in getattr(self, "recurrent_pairs", []) if a == name]
        c_node = c_input_node(self, name)
        if c_node is not None:
            found.append((c_node, 1))
        if not found:
            return False
        node, k = found[0]
        e, dtype = state_exponent(self, node, k)
        act = Act(name, e, self.shape(name), False, dtype)
        self.out.inputs.append(ValueInfo(name, dtype, act.runtime_shape(), [e]))
        self.value_info(act)
        self.acts[name] = act
        return True

    def _initial_h_input(self, qs: list) -> bool:
        """The graph input's QuantizeLinear -> DequantizeLinear feeds only GRU / LSTM
        initial_h slots."""
        users = [(u, list(u.input).index(d)) for q in qs for d in self.dq_outputs(q)
                 for u in self.consumers.get(d, [])]
        return bool(users) and all(u.op_type in ("GRU", "LSTM") and k == 5 for u, k in users)

    def _recurrent_states(self) -> list[dict]:
        out = []
        for a, b in getattr(self, "recurrent_pairs", []):
            vi = self.out.value_infos.get(a)
            out.append({"input": a, "output": b, "exponent": vi.exponents[0] if vi else None,
                        "dtype": np.dtype(vi.dtype).name if vi else None})
        return out

    # ---- names / emit ----------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        return name

    def fresh_node(self, base: str) -> str:
        name, k = base, 1
        while name in self.node_names:
            name, k = f"{base}_{k}", k + 1
        self.node_names.add(name)
        return name

    def emit(self, op: str, name: str, inputs: list[str], outputs: list[str],
             attrs: dict[str, Any]) -> Node:
        n = Node(op, name, list(inputs), list(outputs), dict(sorted(attrs.items())))
        self.out.nodes.append(n)
        return n

    def value_info(self, a: Act) -> None:
        self.out.value_infos[a.name] = ValueInfo(a.name, a.dtype, a.runtime_shape(), [a.exp])

    def initializer(self, name: str, data: np.ndarray, exps: list[int],
                    doc: str | None = "layout ==> UNK") -> str:
        """Add an initializer; a different array under a taken name gets a fresh name."""
        prev = self.out.initializers.get(name)
        if prev is not None:
            if (prev.dtype == data.dtype and prev.dims == data.shape
                    and np.array_equal(prev.data, data) and prev.exponents == exps):
                return name
            name = self.fresh(name)
        self.used_names.add(name)
        data = np.array(data, order="C")  # a copy; ascontiguousarray would make a scalar 1-D
        self.out.initializers[name] = Tensor(name, data, list(exps), doc)
        return name

    @staticmethod
    def qtype(dtype: np.dtype) -> str:
        return {np.dtype(np.int8): "S8", np.dtype(np.int16): "S16"}.get(np.dtype(dtype), "F32")

    # ---- constants -----------------------------------------------------------------------

    def qconst(self, name: str) -> QConst | None:
        """A quantized constant (integer initializer behind DQ, or int64 -> Cast -> Mul)."""
        p = self.producer.get(name)
        if p is None:
            return None
        if p.op_type == "DequantizeLinear" and p.input[0] in self.consts:
            q = self.consts[p.input[0]]
            scale = self.consts.get(p.input[1])
            if scale is None:
                raise UserError(f"DequantizeLinear '{p.name}': its scale is not a constant")
            exps = exponent_of(scale, f"DequantizeLinear '{p.name}'")
            axis = None
            if np.asarray(scale).ndim == 1 and np.asarray(scale).size > 1:
                axis = int(attr(p, "axis", 1))
                axis = axis + q.ndim if axis < 0 else axis
            elif np.asarray(scale).ndim == 1 and q.ndim >= 1 and q.shape[0] == 1:
                axis = None
            if len(p.input) > 2 and p.input[2] and np.any(self.consts.get(p.input[2], 0) != 0):
                raise UserError(f"DequantizeLinear '{p.name}': zero point is not 0; ESP-DL is "
                                "symmetric")
            return QConst(q, exps, axis)
        if p.op_type == "Mul":  # 16-bit bias: Cast(int64 -> float) * scale
            a, b = p.input
            for c, s in ((a, b), (b, a)):
                cp = self.producer.get(c)
                if (cp is not None and cp.op_type == "Cast" and cp.input[0] in self.consts
                        and s in self.consts):
                    q = self.consts[cp.input[0]]
                    scale = self.consts[s]
                    exps = exponent_of(scale, f"Mul '{p.name}' (bias scale)")
                    axis = 0 if np.asarray(scale).size > 1 else None
                    return QConst(q, exps, axis)
        return None

    # ---- activations -----------------------------------------------------------------------

    def act(self, name: str, node: onnx.NodeProto) -> Act:
        if name in self.acts:
            return self.acts[name]
        if name in self.graph_inputs:
            raise UserError(f"node '{node.name}' reads graph input '{name}' as float: quantize "
                            "the model with espstream calibrate")
        raise UserError(f"node '{node.name}' reads '{name}', which is not an integer activation "
                        "(no QuantizeLinear -> DequantizeLinear before it): not a calibrated "
                        "QDQ model")

    def layout_as(self, a: Act, cl: bool) -> Act:
        """`a` in the channels-last (cl=True) or ONNX order, through a Transpose if needed."""
        if a.rank < 3 or a.cl == cl:
            return a
        key = (a.name, cl)
        if key not in self.transposed:
            perm = perm_of(a.rank) if cl else inverse(perm_of(a.rank))
            out = Act(self.fresh(f"{a.name}_{'nhwc' if cl else 'onnx'}_layout"), a.exp,
                       a.shape, cl, a.dtype)
            self.emit("Transpose", self.fresh_node(f"{out.name}_Transpose"), [a.name], [out.name],
                      {"perm": perm, "quant_type": self.qtype(a.dtype)})
            self.value_info(out)
            self.transposed[key] = out
        return self.transposed[key]

    def requantize(self, a: Act, e: int, name: str | None = None,
                   dtype: np.dtype | None = None) -> Act:
        """A RequantizeLinear of `a` to exponent `e` (and to `dtype`: mixed precision, where
        ESP-DL's node, as ESP-PPQ writes it, has the output's type, zero point and quant_type)."""
        dtype = np.dtype(dtype or a.dtype)
        if a.exp == e and name is None and dtype == a.dtype:
            return a
        out = Act(name or self.fresh(f"{a.name}_requant_2^{e}"), e, a.shape, a.cl, dtype)
        self.used_names.add(out.name)
        zp_dtype = dtype
        scale = self.initializer(self.fresh(f"{out.name}_scale"),
                                 np.asarray(math.ldexp(1.0, e - a.exp), np.float32), [0])
        zp = self.initializer(f"zero_point_{np.dtype(zp_dtype).name}",
                              np.zeros((), zp_dtype), [0])
        self.emit("RequantizeLinear", self.fresh_node(f"{out.name}_RequantizeLinear"),
                  [a.name, scale, zp], [out.name], {"quant_type": self.qtype(dtype)})
        self.value_info(out)
        return out

    def q_consumers(self, name: str) -> list[onnx.NodeProto]:
        return [c for c in self.consumers.get(name, []) if c.op_type == "QuantizeLinear"]

    def q_exp_dtype(self, q: onnx.NodeProto) -> tuple[int, np.dtype]:
        scale = self.consts.get(q.input[1])
        if scale is None:
            raise UserError(f"QuantizeLinear '{q.name}': its scale is not a constant")
        exps = exponent_of(scale, f"QuantizeLinear '{q.name}'")
        if len(exps) != 1:
            raise UserError(f"QuantizeLinear '{q.name}': activations are quantized per tensor in "
                            "ESP-DL")
        dtype = np.dtype(np.uint8)
        if len(q.input) > 2 and q.input[2] in self.consts:
            zp = self.consts[q.input[2]]
            dtype = zp.dtype
            if np.any(zp != 0):
                raise UserError(f"QuantizeLinear '{q.name}': zero point is not 0; ESP-DL is "
                                "symmetric")
        if dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
            raise UserError(f"QuantizeLinear '{q.name}': quantizes to {dtype}, ESP-DL needs int8 "
                            "or int16")
        return exps[0], dtype

    def dq_outputs(self, q: onnx.NodeProto) -> list[str]:
        return [c.output[0] for c in self.consumers.get(q.output[0], [])
                if c.op_type == "DequantizeLinear"]

    def define_output(self, float_name: str, node: onnx.NodeProto, shape: list, cl: bool,
                      natural: Act | None = None) -> tuple[str, Act | None]:
        """Name the integer output of a lowered node from the Q nodes reading `float_name`.

        Returns (output name for the emitted node, the Act, or None for a float output).
        natural: for a data-movement op, its input (the op produces that exponent and type by
        itself); when the first Q wants another exponent, the op writes the input's and a
        RequantizeLinear follows; when no Q reads the output, the output is still an integer
        activation at the input's exponent (rule 7). The caller must call `finish_output`.
        """
        qs = self.q_consumers(float_name)
        if not qs:
            if natural is None:
                return float_name, None
            a = Act(float_name, natural.exp, shape, cl, natural.dtype)
            self.used_names.add(float_name)
            self.pending = (float_name, [], a, natural)
            return float_name, a
        # prefer the Q whose DQ output is a graph output: that name must survive
        qs.sort(key=lambda q: not any(d in self.graph_outputs for d in self.dq_outputs(q)))
        first = qs[0]
        e, dtype = self.q_exp_dtype(first)
        dqs = self.dq_outputs(first)
        name = dqs[0] if dqs else first.output[0]
        a = Act(name, e, shape, cl, dtype)
        self.used_names.add(name)
        self.pending = (float_name, qs, a, natural)
        if natural is not None and natural.exp != e:
            mid = Act(self.fresh(f"{name}_2^{natural.exp}"), natural.exp, shape, cl, dtype)
            return mid.name, mid
        return name, a

    def finish_output(self, produced: Act | None) -> None:
        """Register the Q/DQ names of the pending output; requantize for other Qs."""
        float_name, qs, a, natural = self.pending
        if produced is None:
            return
        self.value_info(produced)
        if natural is not None:
            # the float output of data movement is exactly the produced integers: other
            # consumers may read it without a Q/DQ pair (streamify's cache -> Slice chains)
            self.acts.setdefault(float_name, produced)
        if produced.name != a.name:  # natural exponent differs from the Q's
            self.requantize(produced, a.exp, name=a.name)
        for k, q in enumerate(qs):
            e, dtype = self.q_exp_dtype(q)
            if k == 0:
                tgt = a
            elif e == a.exp and dtype == a.dtype:
                tgt = a
            else:
                dqs = self.dq_outputs(q)
                tgt = self.requantize(a, e, name=dqs[0] if dqs else None, dtype=dtype)
            self.q_acts[q.output[0]] = tgt
            for d in self.dq_outputs(q):
                self.acts[d] = tgt

    # ---- main loop -------------------------------------------------------------------------

    def run(self) -> IntGraph:
        g = self.g
        self._check_states()
        for name in self.graph_inputs:
            if name in self.state_inputs:
                continue
            qs = self.q_consumers(name)
            if not qs and self._recurrent_input(name):
                continue
            if not qs:
                if any(c.op_type == "StreamingCache" for c in self.consumers.get(name, [])):
                    continue
                raise UserError(f"graph input '{name}' is not quantized (no QuantizeLinear reads "
                                "it): calibrate the model first")
            e, dtype = self.q_exp_dtype(qs[0])
            shape = self.shape(name)
            if not all(isinstance(d, int) and d > 0 for d in shape):
                # ESP-DL plans its memory for fixed shapes (ESP-PPQ, too, takes only fixed ones)
                # the batch (first of rank >= 3) is 1 on the chip; other open dims are the user's
                dims = ",".join(str(d) if isinstance(d, int) and d > 0 else
                                "1" if j == 0 and len(shape) >= 3 else "N"
                                for j, d in enumerate(shape))
                hint = "" if "N" not in dims.split(",") else " with N set"
                raise UserError(
                    f"graph input '{name}' has shape {[d if d else '?' for d in shape]}: ESP-DL "
                    f"needs fixed input shapes: fix them before calibrating with --input-shape "
                    f"{name}:{dims}{hint} (optimize and convert take it)")
            # a GRU / LSTM state input in ONNX order, as its state output is (also an
            # offline model's explicit initial_h, so its file matches the streaming one's)
            rec_in = name in {a for a, _ in getattr(self, "recurrent_pairs", [])} or (
                self._initial_h_input(qs))
            a = Act(name, e, shape, not rec_in, dtype)
            self.out.inputs.append(ValueInfo(name, dtype, a.runtime_shape(), [e]))
            self.value_info(a)
            for q in qs:
                e2, dt2 = self.q_exp_dtype(q)
                tgt = a if (e2, dt2) == (e, dtype) else self.requantize(
                    a, e2, name=(self.dq_outputs(q) or [None])[0], dtype=dt2)
                self.q_acts[q.output[0]] = tgt
                for d in self.dq_outputs(q):
                    self.acts[d] = tgt
        for n in g.node:
            if n.name in self.absorbed or n.op_type == "Constant":
                continue
            if n.op_type == "QuantizeLinear":
                self._quantize(n)
            elif n.op_type == "DequantizeLinear":
                if n.input[0] in self.q_acts:
                    for o in n.output:
                        self.acts[o] = self.q_acts[n.input[0]]
                elif n.input[0] not in self.consts:
                    raise UserError(f"DequantizeLinear '{n.name}' reads '{n.input[0]}', which no "
                                    "QuantizeLinear produces")
            elif n.op_type == "Mul" and self.qconst(n.output[0]) is not None:
                continue  # a 16-bit bias (Cast + Mul), read by its Conv / Gemm
            elif n.op_type == "Cast":
                if not (n.input[0] in self.consts and self.consumers.get(n.output[0])):
                    raise UserError(f"Cast '{n.name}': ESP-DL has no Cast operator")
            else:
                self._op(n)
        self._outputs()
        espdl_layout.annotate_filters(self.out)
        self._metadata()
        return self.out

    def _quantize(self, q: onnx.NodeProto) -> None:
        """A Q of an integer activation (DQ output): an alias or a RequantizeLinear."""
        if q.output[0] in self.q_acts:
            return  # handled by the producing op or the graph input
        src = q.input[0]
        if src in self.acts:
            a = self.acts[src]
            e, dtype = self.q_exp_dtype(q)
            dqs = self.dq_outputs(q)
            # another exponent or integer type (mixed precision): a RequantizeLinear
            tgt = a if (e, dtype) == (a.exp, a.dtype) else self.requantize(
                a, e, name=dqs[0] if dqs else None, dtype=dtype)
            self.q_acts[q.output[0]] = tgt
            return
        p = self.producer.get(src)
        what = f"node '{p.name}' ({p.op_type})" if p is not None else "nothing"
        raise UserError(f"QuantizeLinear '{q.name}' reads '{src}', produced by {what} that "
                        "espstream could not lower")

    # ---- operators ---------------------------------------------------------------------------

    def _op(self, n: onnx.NodeProto) -> None:
        """Lower one operator node through its module (`espstream.ops.registry`); patterns over
        several nodes (SiLU = x * Sigmoid(x)) claim their nodes first."""
        from espstream.ops import registry

        for pattern in registry.lower_patterns():
            if pattern(self, n):
                return
        spec = registry.op(n.op_type, n.domain)
        if spec is None or spec.lower is None:  # unsupported_nodes() refused it already
            raise UserError(f"{n.op_type} '{n.name}': not lowered")
        spec.lower(self, n)

    def need_q(self, n: onnx.NodeProto, out: Act | None) -> None:
        if out is None:
            raise UserError(f"the output '{n.output[0]}' of {n.op_type} '{n.name}' is not "
                            "quantized (no QuantizeLinear after it): not a calibrated QDQ model")


    # -- Conv / Gemm / MatMul --


    # -- elementwise --

    def operands(self, n: onnx.NodeProto, names: list[str]) -> tuple[list[Any], bool]:
        """Resolve inputs to Act or QConst; whether the output is channels-last."""
        ops: list[Any] = []
        for nm in names:
            if nm in self.acts:
                ops.append(self.acts[nm])
                continue
            qc = self.qconst(nm)
            if qc is None:
                if nm in self.consts:
                    raise UserError(f"{n.op_type} '{n.name}': constant input '{nm}' is not "
                                    "quantized; calibrate the model")
                ops.append(self.act(nm, n))
            else:
                ops.append(qc)
        acts = [o for o in ops if isinstance(o, Act)]
        rank = len(self.shape(n.output[0]))
        cl = rank >= 3 and any(a.cl and a.rank >= 3 for a in acts)
        for a in acts:
            if a.rank != rank and a.rank >= 3:
                raise UserError(f"{n.op_type} '{n.name}': broadcasting activations of ranks "
                                f"{a.rank} and {rank} in the channels-last layout is not supported")
        return ops, cl

    def const_input(self, n: onnx.NodeProto, name: str, qc: QConst, rank: int, cl: bool,
                     exp: int | None = None) -> str:
        data = qc.data
        exps = qc.exps
        if exp is not None:  # stored at a given exponent (Add / Sub / Concat)
            if len(exps) != 1 or exps[0] != exp:
                raise UserError(f"{n.op_type} '{n.name}': constant '{name}' has exponent {exps}, "
                                f"the output {exp}; quantize with espstream calibrate")
        if data.ndim < rank:
            data = data.reshape((1,) * (rank - data.ndim) + data.shape)
        if cl and rank >= 3:
            data = np.transpose(data, perm_of(rank))
        if len(exps) > 1:
            raise UserError(f"{n.op_type} '{n.name}': constant '{name}' is quantized per channel")
        return self.initializer(base_name(name), data, exps)


    # -- pools, data movement --


    def int_const(self, n: onnx.NodeProto, k: int, what: str) -> np.ndarray | None:
        if len(n.input) <= k or not n.input[k]:
            return None
        c = self.consts.get(n.input[k])
        if c is None:
            raise UserError(f"{n.op_type} '{n.name}': its {what} must be a constant")
        return np.asarray(c)


    # -- streaming --


    def _check_states(self) -> None:
        """Every state pair must be a StreamingCache's (state, next_state) (rule 8)."""
        for a, b in self.states:
            users = self.consumers.get(a, [])
            ok = (len(users) == 1 and users[0].domain == STREAM_DOMAIN
                  and users[0].op_type == "StreamingCache" and list(users[0].input[1:]) == [a]
                  and len(users[0].output) == 2 and users[0].output[1] == b)
            if not ok:
                what = ", ".join(f"{u.op_type} '{u.name}'" for u in users) or "nothing"
                raise UserError(
                    f"state '{a}' -> '{b}' is not a StreamingCache state (read by {what}); "
                    "ESP-DL keeps StreamingCache state, and a GRU / LSTM state as a model input / "
                    "output pair; no other state"
                )
            if a not in self.graph_inputs or b not in self.graph_outputs:
                raise UserError(f"state '{a}' -> '{b}' is not a graph input / output pair")

    # -- graph outputs, metadata --

    def _outputs(self) -> None:
        for name in self.graph_outputs:
            if name in self.state_outputs:
                continue
            if name in self.float_outs:
                vi = self.out.value_infos[name]
                self.out.outputs.append(ValueInfo(name, vi.dtype, vi.shape, list(vi.exponents)))
                continue
            a = self.acts.get(name)
            if a is None:
                raise UserError(f"graph output '{name}' is not an integer activation (no "
                                "QuantizeLinear -> DequantizeLinear before it)")
            if a.name != name:
                raise UserError(f"graph output '{name}' repeats the integer tensor '{a.name}'; "
                                "ESP-DL needs an operator producing each output")
            self.out.outputs.append(ValueInfo(name, a.dtype, a.runtime_shape(), [a.exp]))

    def _layout_of(self, name: str) -> list[int]:
        for a in self.acts.values():
            if a.name == name:
                return a.perm
        if name in self.graph_inputs:
            return perm_of(len(self.shape(name)))
        vi = self.out.value_infos.get(name)
        return list(range(len(vi.shape))) if vi is not None and vi.shape else []

    def _metadata(self) -> None:
        md: dict[str, str] = {}
        layouts = {v.name: self._layout_of(v.name) for v in (*self.out.inputs, *self.out.outputs)}
        md["espstream.layout"] = json.dumps(layouts)
        if self.out.target is not None:  # so a reader need not guess it from the layout
            md["espstream.target"] = self.out.target
        recurrent = self._recurrent_states()
        if recurrent:
            md["espstream.recurrent_states"] = json.dumps(recurrent)
        if self.states or "espstream.chunk" in self.meta:
            for k in ("espstream.chunk", "espstream.delay", "espstream.warmup"):
                if k in self.meta:
                    md[k] = self.meta[k]
            if "espstream.time_axes" in self.meta:
                try:
                    ta = json.loads(self.meta["espstream.time_axes"])
                    md["espstream.time_axes"] = json.dumps(
                        {k: layouts[k].index(int(v)) if k in layouts and layouts[k] else int(v)
                         for k, v in ta.items() if k in layouts})
                except (ValueError, TypeError, AttributeError):
                    raise UserError("metadata espstream.time_axes is not a JSON object of "
                                    "axes") from None
        self.out.metadata = md


def __getattr__(name: str) -> Any:
    """`build_lut` and `LUT_FUNCS` live in `espstream.ops.activation` now."""
    if name in ("build_lut", "LUT_FUNCS"):
        from espstream.ops import activation

        return getattr(activation, name)
    raise AttributeError(name)


# the names this module used before the operator registry
_Lowerer = Lowerer
_Act = Act
_QConst = QConst


def attr(n: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def base_name(name: str) -> str:
    """The initializer name ESP-PPQ would use: the ONNX weight name without calibrate's suffix."""
    for suffix in ("_quantized", "_dequantized"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name

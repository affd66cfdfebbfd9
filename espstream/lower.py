"""QDQ ONNX (from `calibrate`, streaming or not) -> IntGraph in ESP-DL's runtime layout.

`lower(model, target=None)` reads the QDQ contract stated in `espstream.quant.calibrate` and
writes what ESP-PPQ's exporter writes for the same structures (tests/data/esp-ppq fixtures).

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
   [1, 1, K, N] with transB 0 and alpha = beta = 1; pads [b0, b1, e0, e1] -> [b0, e0, b1, e1].
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
   2^(e_out - e_in), int zero point 0, as ESP-PPQ writes them) is inserted.
8. Streaming: each `espstream.StreamingCache(x, state) -> (y, next_state)` becomes ESP-DL's
   single-input `StreamingCache` (`frame_axis` in the runtime layout, `quant_type`,
   `window_size`); its state input / output leave the graph (the runtime keeps the state).
   A hand-written state pair (`calibrate --state`) that is a pure sliding window (the state is
   the last frames of Concat(state, x)) becomes such a cache first (`espstream.stream.manual`).
   Any other state pair (a GRU's hidden state, ...) is an error naming it. Every axis before
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

QDQ = ("QuantizeLinear", "DequantizeLinear")
STREAM_DOMAIN = "espstream"

#: LUT operators: ONNX op type -> f(x, attrs) in float64.
LUT_FUNCS = {
    "Sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, a: np.tanh(x),
    "Swish": lambda x, a: x / (1.0 + np.exp(-x)),
    "HardSigmoid": lambda x, a: np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda x, a: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 0.01) * x),
    "Elu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 1.0) * np.expm1(x)),
    "Exp": lambda x, a: np.exp(x),
    "Log": lambda x, a: np.log(x),
    "Sqrt": lambda x, a: np.sqrt(x),
    "Clip": lambda x, a: np.clip(x, a["min"], a["max"]),
}

LAYOUT_FREE_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")
PLAIN_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Gather", "MatMul")
GEMM_OPS = ("Conv", "Gemm", "MatMul")
POOLS = ("AveragePool", "MaxPool", "GlobalAveragePool")
SUPPORTED = set(LUT_FUNCS) | set(LAYOUT_FREE_ELEMENTWISE) | set(PLAIN_OPS) | set(GEMM_OPS) | set(
    POOLS
) | {"Relu", "PRelu", "Concat", "Slice", "Split", "Pad", "Transpose", "Softmax", "Identity"}
# Operators with no ESP-DL kernel at all (as opposed to not lowered by espstream yet).
NO_ESPDL_KERNEL = {
    "ConvTranspose", "GRU", "LSTM", "RNN", "BatchNormalization", "LayerNormalization",
    "InstanceNormalization", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum", "Gelu",
    "Softplus", "Mish", "Erf", "Pow", "Neg", "Abs", "Reciprocal", "Upsample", "Expand", "Tile",
    "Where", "Cast", "Shape", "ConstantOfShape", "Range", "Einsum", "TopK", "ArgMax", "Dropout",
}


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


def build_lut(op: str, attrs: dict[str, Any], e_in: int, e_out: int, rounding: str,
              ) -> np.ndarray:
    """The 256-entry int8 table: entry i = saturate(round(f((i - 128) * 2^e_in) / 2^e_out))."""
    q = np.arange(-128, 128, dtype=np.float64)
    with np.errstate(all="ignore"):
        y = LUT_FUNCS[op](np.ldexp(q, e_in), attrs)
        # log / sqrt of a negative input: NaN in ONNX; the table holds 0 there
        y = np.nan_to_num(np.asarray(y, dtype=np.float64), nan=0.0, posinf=1e300, neginf=-1e300)
        v = scheme.round_with(np.ldexp(y, -e_out), rounding)
    return np.clip(v, -128, 127).astype(np.int8)


@dataclass
class _Act:
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
class _QConst:
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
        return _Lowerer(model, target).run()


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
    if target is not None and rec is not None and target != rec:
        raise UserError(f"--target {target} differs from the target the model was calibrated for "
                        f"({rec}): its exponents follow {rec}'s rounding and bias width; "
                        f"recalibrate with --target {target} or drop --target")
    if target is None and rec is None:
        raise UserError("the model records no espstream.target; pass --target "
                        f"({', '.join(TARGETS)})")
    return target or rec  # type: ignore[return-value]


def unsupported_nodes(model: onnx.ModelProto) -> list[str]:
    """'Type name' of every node `lower` cannot turn into an ESP-DL operator."""
    bad = []
    for n in model.graph.node:
        if n.domain == STREAM_DOMAIN and n.op_type == "StreamingCache":
            continue
        if n.domain not in ("", "ai.onnx") or (
            n.op_type not in SUPPORTED and n.op_type not in QDQ
            and n.op_type not in ("Constant", "Cast")
        ):
            dom = f"{n.domain}." if n.domain not in ("", "ai.onnx") else ""
            bad.append(f"{dom}{n.op_type} '{n.name}'")
    return bad


class _Lowerer:
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
        self.acts: dict[str, _Act] = {}  # float tensor name (DQ output / Q output) -> _Act
        self.q_acts: dict[str, _Act] = {}  # Q output name -> _Act
        self.float_outs: dict[str, str] = {}  # un-quantized float outputs (Softmax)
        self.absorbed: set[str] = set()  # node names lowered as part of another node
        self.transposed: dict[tuple[str, bool], _Act] = {}
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
            pairs = json.loads(raw)
            return [(str(a), str(b)) for a, b in pairs]
        except (ValueError, TypeError):
            raise UserError("metadata espstream.states is not a JSON list of "
                            "[state input, state output] pairs") from None

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

    def value_info(self, a: _Act) -> None:
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

    def qconst(self, name: str) -> _QConst | None:
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
                axis = int(_attr(p, "axis", 1))
                axis = axis + q.ndim if axis < 0 else axis
            elif np.asarray(scale).ndim == 1 and q.ndim >= 1 and q.shape[0] == 1:
                axis = None
            if len(p.input) > 2 and p.input[2] and np.any(self.consts.get(p.input[2], 0) != 0):
                raise UserError(f"DequantizeLinear '{p.name}': zero point is not 0; ESP-DL is "
                                "symmetric")
            return _QConst(q, exps, axis)
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
                    return _QConst(q, exps, axis)
        return None

    # ---- activations -----------------------------------------------------------------------

    def act(self, name: str, node: onnx.NodeProto) -> _Act:
        if name in self.acts:
            return self.acts[name]
        if name in self.graph_inputs:
            raise UserError(f"node '{node.name}' reads graph input '{name}' as float: quantize "
                            "the model with espstream calibrate")
        raise UserError(f"node '{node.name}' reads '{name}', which is not an integer activation "
                        "(no QuantizeLinear -> DequantizeLinear before it): not a calibrated "
                        "QDQ model")

    def layout_as(self, a: _Act, cl: bool) -> _Act:
        """`a` in the channels-last (cl=True) or ONNX order, through a Transpose if needed."""
        if a.rank < 3 or a.cl == cl:
            return a
        key = (a.name, cl)
        if key not in self.transposed:
            perm = perm_of(a.rank) if cl else inverse(perm_of(a.rank))
            out = _Act(self.fresh(f"{a.name}_{'nhwc' if cl else 'onnx'}_layout"), a.exp,
                       a.shape, cl, a.dtype)
            self.emit("Transpose", self.fresh_node(f"{out.name}_Transpose"), [a.name], [out.name],
                      {"perm": perm, "quant_type": self.qtype(a.dtype)})
            self.value_info(out)
            self.transposed[key] = out
        return self.transposed[key]

    def requantize(self, a: _Act, e: int, name: str | None = None) -> _Act:
        if a.exp == e and name is None:
            return a
        out = _Act(name or self.fresh(f"{a.name}_requant_2^{e}"), e, a.shape, a.cl, a.dtype)
        self.used_names.add(out.name)
        zp_dtype = a.dtype
        scale = self.initializer(self.fresh(f"{out.name}_scale"),
                                 np.asarray(math.ldexp(1.0, e - a.exp), np.float32), [0])
        zp = self.initializer(f"zero_point_{np.dtype(zp_dtype).name}",
                              np.zeros((), zp_dtype), [0])
        self.emit("RequantizeLinear", self.fresh_node(f"{out.name}_RequantizeLinear"),
                  [a.name, scale, zp], [out.name], {"quant_type": self.qtype(a.dtype)})
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
                      natural: _Act | None = None) -> tuple[str, _Act | None]:
        """Name the integer output of a lowered node from the Q nodes reading `float_name`.

        Returns (output name for the emitted node, the _Act, or None for a float output).
        natural: for a data-movement op, its input (the op produces that exponent and type by
        itself); when the first Q wants another exponent, the op writes the input's and a
        RequantizeLinear follows; when no Q reads the output, the output is still an integer
        activation at the input's exponent (rule 7). The caller must call `finish_output`.
        """
        qs = self.q_consumers(float_name)
        if not qs:
            if natural is None:
                return float_name, None
            a = _Act(float_name, natural.exp, shape, cl, natural.dtype)
            self.used_names.add(float_name)
            self._pending = (float_name, [], a, natural)
            return float_name, a
        # prefer the Q whose DQ output is a graph output: that name must survive
        qs.sort(key=lambda q: not any(d in self.graph_outputs for d in self.dq_outputs(q)))
        first = qs[0]
        e, dtype = self.q_exp_dtype(first)
        dqs = self.dq_outputs(first)
        name = dqs[0] if dqs else first.output[0]
        a = _Act(name, e, shape, cl, dtype)
        self.used_names.add(name)
        self._pending = (float_name, qs, a, natural)
        if natural is not None and natural.exp != e:
            mid = _Act(self.fresh(f"{name}_2^{natural.exp}"), natural.exp, shape, cl, dtype)
            return mid.name, mid
        return name, a

    def finish_output(self, produced: _Act | None) -> None:
        """Register the Q/DQ names of the pending output; requantize for other Qs."""
        float_name, qs, a, natural = self._pending
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
            elif e == a.exp:
                tgt = a
            else:
                dqs = self.dq_outputs(q)
                tgt = self.requantize(a, e, name=dqs[0] if dqs else None)
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
            a = _Act(name, e, shape, True, dtype)
            self.out.inputs.append(ValueInfo(name, dtype, a.runtime_shape(), [e]))
            self.value_info(a)
            for q in qs:
                e2, _ = self.q_exp_dtype(q)
                tgt = a if e2 == e else self.requantize(a, e2, name=(self.dq_outputs(q) or
                                                                    [None])[0])
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
            elif n.domain == STREAM_DOMAIN:
                self._streaming_cache(n)
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
            if dtype != a.dtype:
                raise UserError(f"QuantizeLinear '{q.name}' changes the integer type of '{src}' "
                                f"({a.dtype} -> {dtype}); ESP-DL models use one bit width")
            dqs = self.dq_outputs(q)
            tgt = a if e == a.exp else self.requantize(a, e, name=dqs[0] if dqs else None)
            self.q_acts[q.output[0]] = tgt
            return
        p = self.producer.get(src)
        what = f"node '{p.name}' ({p.op_type})" if p is not None else "nothing"
        raise UserError(f"QuantizeLinear '{q.name}' reads '{src}', produced by {what} that "
                        "espstream could not lower")

    # ---- operators ---------------------------------------------------------------------------

    def _op(self, n: onnx.NodeProto) -> None:
        op = n.op_type
        if op == "Sigmoid" and self._silu_mul(n) is not None:
            return  # lowered with its Mul as Swish
        if op == "Mul":
            sig = self._silu_sigmoid(n)
            if sig is not None:
                x = self.act(sig.input[0], n)
                self._lut("Swish", n, x, n.output[0], {})
                return
        if op in GEMM_OPS:
            self._gemm(n)
        elif op in LUT_FUNCS:
            x = self.act(n.input[0], n)
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if op == "Clip":
                attrs.update(self._clip_bounds(n))
            self._lut(op, n, x, n.output[0], attrs)
        elif op in LAYOUT_FREE_ELEMENTWISE:
            self._elementwise(n)
        elif op == "Relu":
            x = self.act(n.input[0], n)
            name, out = self.define_output(n.output[0], n, x.shape, x.cl)
            self._need_q(n, out)
            self.emit("Relu", n.name, [x.name], [name], {"quant_type": self.qtype(x.dtype)})
            self.finish_output(out)
        elif op == "PRelu":
            self._prelu(n)
        elif op in POOLS:
            self._pool(n)
        elif op == "Concat":
            self._concat(n)
        elif op in ("Slice", "Split", "Pad", "Softmax"):
            getattr(self, "_" + op.lower())(n)
        elif op == "Transpose":
            self._transpose(n)
        elif op == "Identity":
            self._identity(n)
        elif op in PLAIN_OPS:
            self._plain(n)
        else:  # unsupported_nodes() refused it already
            raise UserError(f"{op} '{n.name}': not lowered")

    def _need_q(self, n: onnx.NodeProto, out: _Act | None) -> None:
        if out is None:
            raise UserError(f"the output '{n.output[0]}' of {n.op_type} '{n.name}' is not "
                            "quantized (no QuantizeLinear after it): not a calibrated QDQ model")

    def _silu_mul(self, sig: onnx.NodeProto) -> onnx.NodeProto | None:
        cons = self.consumers.get(sig.output[0], [])
        if (len(cons) == 1 and cons[0].op_type == "Mul" and sig.input[0] in cons[0].input
                and sig.output[0] not in self.graph_outputs):
            return cons[0]
        return None

    def _silu_sigmoid(self, mul: onnx.NodeProto) -> onnx.NodeProto | None:
        for k in (0, 1):
            p = self.producer.get(mul.input[k])
            if (p is not None and p.op_type == "Sigmoid" and p.input[0] == mul.input[1 - k]
                    and self._silu_mul(p) is mul):
                return p
        return None

    def _clip_bounds(self, n: onnx.NodeProto) -> dict[str, float]:
        lo, hi = -math.inf, math.inf
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        lo, hi = float(attrs.get("min", lo)), float(attrs.get("max", hi))
        for k, which in ((1, "min"), (2, "max")):
            if len(n.input) > k and n.input[k]:
                c = self.consts.get(n.input[k])
                if c is None:
                    raise UserError(f"Clip '{n.name}': its {which} is not a constant")
                if which == "min":
                    lo = float(c)
                else:
                    hi = float(c)
        return {"min": lo, "max": hi}

    def _lut(self, op: str, n: onnx.NodeProto, x: _Act, float_out: str,
             attrs: dict[str, Any]) -> None:
        name, out = self.define_output(float_out, n, x.shape, x.cl)
        self._need_q(n, out)
        if out.dtype != x.dtype:
            raise UserError(f"{op} '{n.name}': input and output integer types differ")
        node_attrs: dict[str, Any] = {"quant_type": self.qtype(x.dtype)}
        inputs = [x.name]
        if x.dtype == np.int8:
            k = self.lut_count.get(op, 0)
            self.lut_count[op] = k + 1
            table = build_lut(op, attrs, x.exp, out.exp, self.rounding)
            lut_name = self.initializer(self.fresh(f"{op}_lut_{k}"), table, [out.exp], None)
            node_attrs["lut"] = lut_name
        elif op == "Clip":  # 16 bits: min / max at the input's exponent
            for which in ("min", "max"):
                v = attrs[which]
                lo, hi = scheme.qrange(16)
                q = lo if v == -math.inf else hi if v == math.inf else int(np.clip(
                    scheme.round_with(np.ldexp(v, -x.exp), self.rounding), lo, hi))
                inputs.append(self.initializer(self.fresh(f"{n.name}_{which}"),
                                               np.asarray(q, np.int16), [x.exp]))
        if op in ("LeakyRelu", "Elu", "HardSigmoid"):
            for k2, v in attrs.items():
                if k2 in ("alpha", "beta"):
                    node_attrs[k2] = float(v)
        self.emit(op, n.name, inputs, [name], node_attrs)
        self.finish_output(out)

    # -- Conv / Gemm / MatMul --

    def _fused_activation(self, n: onnx.NodeProto) -> tuple[str, onnx.NodeProto | None, dict]:
        """('Relu' | 'Linear', the fused node or None, clip bounds for a non-Relu Clip)."""
        cons = self.consumers.get(n.output[0], [])
        if len(cons) != 1 or n.output[0] in self.graph_outputs:
            return "Linear", None, {}
        c = cons[0]
        if c.op_type == "Relu":
            return "Relu", c, {}
        if c.op_type == "Clip" and self.q_consumers(c.output[0]):
            b = self._clip_bounds(c)
            qs = self.q_consumers(c.output[0])
            e, dtype = self.q_exp_dtype(qs[0])
            qmax = scheme.qrange(8 if dtype == np.int8 else 16)[1]
            if b["min"] == 0.0 and b["max"] >= math.ldexp(qmax + 0.5, e):
                return "Relu", c, {}
            return "Linear", c, b
        return "Linear", None, {}

    def _gemm(self, n: onnx.NodeProto) -> None:
        op = n.op_type
        act, fused, clip = self._fused_activation(n)
        float_out = fused.output[0] if fused is not None else n.output[0]
        if fused is not None:
            self.absorbed.add(fused.name)
        if op == "Conv":
            x = self.layout_as(self.act(n.input[0], n), True)
            attrs, w, b = self._conv_params(n, x)
            out_cl = True
        elif op == "Gemm":
            x = self.act(n.input[0], n)
            if x.rank != 2:
                raise UserError(f"Gemm '{n.name}': input of rank {x.rank}, expected 2")
            attrs, w, b = self._gemm_params(n, x)
            out_cl = False
        else:
            x = self.layout_as(self.act(n.input[0], n), False)
            attrs, w, b = self._matmul_params(n)
            out_cl = False
        inputs = [x.name, *w]
        if b is not None:
            inputs.append(b)
        attrs = {"activation": act, **attrs, "quant_type": self.qtype(x.dtype)}
        shape = self.shape(n.output[0])
        if clip:  # Conv at the Clip's exponent, then a Clip table at that exponent
            qs = self.q_consumers(float_out)
            e, dtype = self.q_exp_dtype(qs[0])
            mid = _Act(n.output[0], e, shape, out_cl, dtype)
            self.emit(op, n.name, inputs, [mid.name], attrs)
            self.value_info(mid)
            self._lut("Clip", fused, mid, float_out, clip)
            return
        name, out = self.define_output(float_out, n, shape, out_cl)
        self._need_q(n, out)
        self.emit(op, n.name, inputs, [name], attrs)
        self.finish_output(out)

    def _weight(self, n: onnx.NodeProto, k: int, what: str) -> _QConst:
        if len(n.input) <= k or not n.input[k]:
            raise UserError(f"{n.op_type} '{n.name}' has no {what}")
        qc = self.qconst(n.input[k])
        if qc is None:
            raise UserError(f"{n.op_type} '{n.name}': its {what} '{n.input[k]}' is not a quantized "
                            "constant (DequantizeLinear of an integer initializer)")
        return qc

    def _bias(self, n: onnx.NodeProto, k: int, nout: int, x: _Act, wexps: list[int],
              ) -> str | None:
        """The bias at exponent e_in + e_w: int32 (8-bit) or int64 (16-bit).

        calibrate stores a 16-bit model's int64 bias as int32 shifted right by
        k = log2(scale) - e_in - e_w (rule 5 of its contract); it is shifted back here.
        """
        if len(n.input) <= k or not n.input[k]:
            return None
        qc = self._weight(n, k, "bias")
        data = qc.data.reshape(-1).astype(np.int64)
        if data.size != nout:
            raise UserError(f"{n.op_type} '{n.name}': bias has {data.size} values for {nout} "
                            "output channels")
        if qc.data.dtype.kind != "i":
            raise UserError(f"{n.op_type} '{n.name}': bias is {qc.data.dtype}, expected integers")
        want = np.asarray([x.exp + e for e in wexps] if len(wexps) > 1 else [x.exp + wexps[0]])
        have = np.asarray(qc.exps)
        shift = np.broadcast_to(have, (nout,)) - np.broadcast_to(want, (nout,))
        sixteen = x.dtype == np.int16
        if np.any(shift < 0) or (not sixteen and np.any(shift != 0)):
            raise UserError(f"{n.op_type} '{n.name}': bias exponents {have.tolist()[:4]} do not "
                            f"match input + weight exponents {want.tolist()[:4]}; quantize the "
                            "model with espstream calibrate")
        if sixteen:
            data = data << shift.astype(np.int64)
        else:
            data = data.astype(np.int32)
        return self.initializer(_base(n.input[k]), data, [int(e) for e in want])

    def _conv_params(self, n: onnx.NodeProto, x: _Act) -> tuple[dict, list[str], str | None]:
        qc = self._weight(n, 1, "weight")
        w = qc.data
        nsp = w.ndim - 2
        if nsp not in (1, 2):
            raise UserError(f"Conv '{n.name}': {nsp}-D convolution; ESP-DL has 1-D and 2-D")
        group = int(_attr(n, "group", 1))
        cin = x.shape[1]
        nout = w.shape[0]
        auto_pad = _attr(n, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID"):
            raise UserError(f"Conv '{n.name}': auto_pad {auto_pad} is not supported; run "
                            "espstream optimize or export with explicit pads")
        depthwise = group > 1
        if depthwise and not (group == cin and w.shape[1] == 1 and nout == cin):
            raise UserError(f"Conv '{n.name}': group {group} with {cin} input and {nout} output "
                            "channels; ESP-DL supports group 1 or depthwise (group = channels)")
        if depthwise:  # [N, 1, (H,) W] -> [(H,) W, N, 1]
            logical = np.moveaxis(w, (0, 1), (-2, -1))
        else:  # [N, C, (H,) W] -> [(H,) W, C, N]
            logical = np.transpose(w, (*range(2, w.ndim), 1, 0))
        if qc.axis not in (None, 0):
            raise UserError(f"Conv '{n.name}': weights quantized per axis {qc.axis}, expected the "
                            "output-channel axis 0")
        wname = self.initializer(_base(n.input[1]), logical, qc.exps, None)
        b = self._bias(n, 2, nout, x, qc.exps)
        pads = [int(p) for p in _attr(n, "pads", [0] * (2 * nsp))]
        if auto_pad == "VALID":
            pads = [0] * (2 * nsp)
        if nsp == 2:
            pads = [pads[0], pads[2], pads[1], pads[3]]
        attrs = {
            "dilations": [int(d) for d in _attr(n, "dilations", [1] * nsp)],
            "group": group,
            "kernel_shape": [int(k) for k in _attr(n, "kernel_shape", list(w.shape[2:]))],
            "pads": pads,
            "strides": [int(s) for s in _attr(n, "strides", [1] * nsp)],
        }
        return attrs, [wname], b

    def _gemm_params(self, n: onnx.NodeProto, x: _Act) -> tuple[dict, list[str], str | None]:
        if int(_attr(n, "transA", 0)):
            raise UserError(f"Gemm '{n.name}': transA = 1 is not supported by ESP-DL")
        for k in ("alpha", "beta"):
            if float(_attr(n, k, 1.0)) != 1.0:
                raise UserError(f"Gemm '{n.name}': {k} = {_attr(n, k)}; calibrate folds it to 1")
        qc = self._weight(n, 1, "weight (B)")
        w = qc.data
        if w.ndim != 2:
            raise UserError(f"Gemm '{n.name}': B has rank {w.ndim}")
        trans = int(_attr(n, "transB", 0))
        kn = w.T if trans else w
        out_axis = 0 if trans else 1
        if qc.axis not in (None, out_axis):
            raise UserError(f"Gemm '{n.name}': weights quantized per axis {qc.axis}, not per "
                            "output channel")
        wname = self.initializer(_base(n.input[1]), kn.reshape(1, 1, *kn.shape), qc.exps, None)
        b = self._bias(n, 2, kn.shape[1], x, qc.exps)
        return {"alpha": 1.0, "beta": 1.0, "transB": 0}, [wname], b

    def _matmul_params(self, n: onnx.NodeProto) -> tuple[dict, list[str], str | None]:
        qc = self.qconst(n.input[1])
        if qc is not None:
            if qc.data.ndim < 2:
                raise UserError(f"MatMul '{n.name}': a 1-D constant operand is not supported")
            if qc.axis not in (None, qc.data.ndim - 1):
                raise UserError(f"MatMul '{n.name}': weights quantized per axis {qc.axis}, not per "
                                "output channel")
            return {}, [self.initializer(_base(n.input[1]), qc.data, qc.exps, None)], None
        y = self.layout_as(self.act(n.input[1], n), False)
        return {}, [y.name], None

    # -- elementwise --

    def _operands(self, n: onnx.NodeProto, names: list[str]) -> tuple[list[Any], bool]:
        """Resolve inputs to _Act or _QConst; whether the output is channels-last."""
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
        acts = [o for o in ops if isinstance(o, _Act)]
        rank = len(self.shape(n.output[0]))
        cl = rank >= 3 and any(a.cl and a.rank >= 3 for a in acts)
        for a in acts:
            if a.rank != rank and a.rank >= 3:
                raise UserError(f"{n.op_type} '{n.name}': broadcasting activations of ranks "
                                f"{a.rank} and {rank} in the channels-last layout is not supported")
        return ops, cl

    def _const_input(self, n: onnx.NodeProto, name: str, qc: _QConst, rank: int, cl: bool,
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
        return self.initializer(_base(name), data, exps)

    def _elementwise(self, n: onnx.NodeProto) -> None:
        ops, cl = self._operands(n, list(n.input))
        acts = [o for o in ops if isinstance(o, _Act)]
        if not acts:
            raise UserError(f"{n.op_type} '{n.name}' has only constant inputs; run espstream "
                            "optimize first")
        shape = self.shape(n.output[0])
        rank = len(shape)
        name, out = self.define_output(n.output[0], n, shape, cl)
        self._need_q(n, out)
        inputs = []
        same_exp = n.op_type in ("Add", "Sub")
        for nm, o in zip(n.input, ops, strict=True):
            if isinstance(o, _Act):
                a = self.layout_as(o, cl) if o.rank >= 3 else o
                if same_exp:
                    a = self.requantize(a, out.exp)
                inputs.append(a.name)
            else:
                inputs.append(self._const_input(n, nm, o, rank, cl,
                                                out.exp if same_exp else None))
        self.emit(n.op_type, n.name, inputs, [name], {"quant_type": self.qtype(out.dtype)})
        self.finish_output(out)

    def _prelu(self, n: onnx.NodeProto) -> None:
        x = self.act(n.input[0], n)
        qc = self.qconst(n.input[1])
        if qc is None:
            raise UserError(f"PRelu '{n.name}': slope is not a quantized constant")
        name, out = self.define_output(n.output[0], n, x.shape, x.cl)
        self._need_q(n, out)
        slope = self._const_input(n, n.input[1], qc, x.rank, x.cl)
        self.emit("PRelu", n.name, [x.name, slope], [name], {"quant_type": self.qtype(x.dtype)})
        self.finish_output(out)

    # -- pools, data movement --

    def _pool(self, n: onnx.NodeProto) -> None:
        x = self.layout_as(self.act(n.input[0], n), True)
        shape = self.shape(n.output[0])
        attrs: dict[str, Any] = {}
        if x.rank not in (3, 4):
            raise UserError(
                f"{n.op_type} '{n.name}': {x.rank - 2}-D pooling; ESP-DL has 1-D and 2-D"
            )
        if n.op_type != "GlobalAveragePool":
            nsp = x.rank - 2
            if any(int(d) != 1 for d in _attr(n, "dilations", [1] * nsp)):
                raise UserError(f"{n.op_type} '{n.name}': dilation is not supported by ESP-DL")
            auto_pad = _attr(n, "auto_pad", b"NOTSET")
            if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in (
                    "NOTSET", "VALID"):
                raise UserError(f"{n.op_type} '{n.name}': auto_pad is not supported; give pads")
            pads = [int(p) for p in _attr(n, "pads", [0] * (2 * nsp))]
            if nsp == 2:
                pads = [pads[0], pads[2], pads[1], pads[3]]
            attrs = {
                "ceil_mode": int(_attr(n, "ceil_mode", 0)),
                "kernel_shape": [int(k) for k in _attr(n, "kernel_shape")],
                "pads": pads,
                "strides": [int(s) for s in _attr(n, "strides", [1] * nsp)],
            }
            if n.op_type == "AveragePool":
                attrs["count_include_pad"] = int(_attr(n, "count_include_pad", 0))
        natural = x if n.op_type == "MaxPool" else None
        name, out = self.define_output(n.output[0], n, shape, True, natural)
        self._need_q(n, out)
        self.emit(n.op_type, n.name, [x.name], [name],
                  {**attrs, "quant_type": self.qtype(x.dtype)})
        self.finish_output(out)

    def _concat(self, n: onnx.NodeProto) -> None:
        ops, cl = self._operands(n, list(n.input))
        shape = self.shape(n.output[0])
        name, out = self.define_output(n.output[0], n, shape, cl)
        self._need_q(n, out)
        inputs = []
        for nm, o in zip(n.input, ops, strict=True):
            if isinstance(o, _Act):
                inputs.append(self.requantize(self.layout_as(o, cl), out.exp).name)
            else:
                inputs.append(self._const_input(n, nm, o, len(shape), cl, out.exp))
        axis = int(_attr(n, "axis"))
        self.emit("Concat", n.name, inputs, [name],
                  {"axis": out.runtime_axis(axis), "quant_type": self.qtype(out.dtype)})
        self.finish_output(out)

    def _int_const(self, n: onnx.NodeProto, k: int, what: str) -> np.ndarray | None:
        if len(n.input) <= k or not n.input[k]:
            return None
        c = self.consts.get(n.input[k])
        if c is None:
            raise UserError(f"{n.op_type} '{n.name}': its {what} must be a constant")
        return np.asarray(c)

    def _slice(self, n: onnx.NodeProto) -> None:
        x = self.act(n.input[0], n)
        if not n.input[1:] and _attr(n, "starts") is not None:
            raise UserError(f"Slice '{n.name}': opset < 10 Slice attributes; run espstream "
                            "optimize (opset >= 13)")
        starts = self._int_const(n, 1, "starts")
        ends = self._int_const(n, 2, "ends")
        axes = self._int_const(n, 3, "axes")
        steps = self._int_const(n, 4, "steps")
        if axes is None:
            axes = np.arange(len(starts), dtype=np.int64)
        axes_rt = np.asarray([x.runtime_axis(int(a)) for a in axes], dtype=np.int64)
        name, out = self.define_output(n.output[0], n, self.shape(n.output[0]), x.cl, x)
        self._need_q(n, out)
        inputs = [x.name]
        names = [n.input[k] if len(n.input) > k and n.input[k] else f"{n.name}_{w}"
                 for k, w in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps"))]
        for nm, v in zip(names, (starts, ends, axes_rt, steps), strict=True):
            if v is None:
                v = np.ones(len(starts), dtype=np.int64)
            inputs.append(self.initializer(_base(nm), np.asarray(v, dtype=np.int64), [0]))
        self.emit("Slice", n.name, inputs, [name], {"quant_type": self.qtype(x.dtype)})
        self.finish_output(out)

    def _split(self, n: onnx.NodeProto) -> None:
        x = self.act(n.input[0], n)
        axis = int(_attr(n, "axis", 0))
        inputs = [x.name]
        split = self._int_const(n, 1, "split")
        if split is None and _attr(n, "split") is not None:
            split = np.asarray(_attr(n, "split"), np.int64)
        if split is not None:
            inputs.append(self.initializer(_base(n.input[1] if len(n.input) > 1 and n.input[1]
                                                 else f"{n.name}_split"),
                                           split.astype(np.int64), [0]))
        outs = []
        pend = []
        for o in n.output:
            name, a = self.define_output(o, n, self.shape(o), x.cl, x)
            self._need_q(n, a)
            outs.append(name)
            pend.append((self._pending, a))
        self.emit("Split", n.name, inputs, outs,
                  {"axis": x.runtime_axis(axis), "quant_type": self.qtype(x.dtype)})
        for p, a in pend:
            self._pending = p
            self.finish_output(a)

    def _pad(self, n: onnx.NodeProto) -> None:
        x = self.act(n.input[0], n)
        mode = _attr(n, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "wrap":
            raise UserError(f"Pad '{n.name}': wrap mode is not supported by ESP-DL")
        pads = self._int_const(n, 1, "pads")
        if pads is None:
            pads = np.asarray(_attr(n, "pads"), np.int64)
        if len(n.input) > 3 and n.input[3]:
            raise UserError(f"Pad '{n.name}': the axes input is not supported")
        r = x.rank
        begin, end = list(pads[:r]), list(pads[r:])
        perm = x.perm
        pads_rt = np.asarray([begin[p] for p in perm] + [end[p] for p in perm], np.int64)
        inputs = [x.name, self.initializer(_base(n.input[1]) if len(n.input) > 1 else
                                           f"{n.name}_pads", pads_rt, [0])]
        if len(n.input) > 2 and n.input[2]:
            qc = self.qconst(n.input[2])
            if qc is None:
                c = self.consts.get(n.input[2])
                if c is None or np.any(c != 0):
                    raise UserError(f"Pad '{n.name}': the constant value must be a quantized "
                                    "constant or 0")
                qc = _QConst(np.zeros((), x.dtype), [x.exp], None)
            inputs.append(self.initializer(_base(n.input[2]), qc.data.astype(x.dtype), qc.exps))
        name, out = self.define_output(n.output[0], n, self.shape(n.output[0]), x.cl, x)
        self._need_q(n, out)
        self.emit("Pad", n.name, inputs, [name], {"mode": mode, "quant_type": self.qtype(x.dtype)})
        self.finish_output(out)

    def _softmax(self, n: onnx.NodeProto) -> None:
        x = self.act(n.input[0], n)
        axis = int(_attr(n, "axis", -1))
        shape = self.shape(n.output[0])
        name, out = self.define_output(n.output[0], n, shape, x.cl)
        self.emit("Softmax", n.name, [x.name], [name],
                  {"axis": x.runtime_axis(axis), "quant_type": self.qtype(x.dtype)})
        if out is not None:  # quantized after all: ESP-DL's Softmax outputs float
            raise UserError(f"Softmax '{n.name}': its output is quantized, but ESP-DL's Softmax "
                            "outputs float32; leave it unquantized")
        f = _Act(name, 0, shape, x.cl, np.dtype(np.float32))
        self.out.value_infos[name] = ValueInfo(name, np.dtype(np.float32), f.runtime_shape(), [0])
        self.float_outs[name] = name
        if any(c.op_type != "QuantizeLinear" for c in self.consumers.get(n.output[0], [])):
            raise UserError(f"Softmax '{n.name}': its float output feeds other operators; ESP-DL "
                            "can only return it as a graph output")

    def _transpose(self, n: onnx.NodeProto) -> None:
        x = self.act(n.input[0], n)
        perm = [int(p) for p in _attr(n, "perm", list(range(x.rank))[::-1])]
        # runtime data = onnx.transpose(x.perm); onnx output = onnx.transpose(perm)
        rt_perm = [x.perm.index(p) for p in perm]
        name, out = self.define_output(n.output[0], n, self.shape(n.output[0]), False, x)
        self._need_q(n, out)
        self.emit("Transpose", n.name, [x.name], [name],
                  {"perm": rt_perm, "quant_type": self.qtype(x.dtype)})
        self.finish_output(out)

    def _identity(self, n: onnx.NodeProto) -> None:
        """An alias of its input (streamify turns a no-op Pad into an Identity); a real
        Identity node only where a graph output needs an operator producing it."""
        x = self.act(n.input[0], n)
        t = n.output[0]
        if t not in self.graph_outputs and not any(
                d in self.graph_outputs for q in self.q_consumers(t) for d in self.dq_outputs(q)):
            self.acts[t] = x
            return
        name, out = self.define_output(t, n, x.shape, x.cl, x)
        self.emit("Identity", n.name, [x.name], [name], {"quant_type": self.qtype(x.dtype)})
        self.finish_output(out)

    def _plain(self, n: onnx.NodeProto) -> None:
        op = n.op_type
        if op == "MatMul":
            return self._gemm(n)
        x = self.layout_as(self.act(n.input[0], n), False)
        inputs = [x.name]
        attrs: dict[str, Any] = {}
        if op == "Reshape":
            shp = self._int_const(n, 1, "shape")
            inputs.append(self.initializer(_base(n.input[1]), shp.astype(np.int64), [0]))
            if _attr(n, "allowzero") is not None:
                attrs["allowzero"] = int(_attr(n, "allowzero"))
        elif op == "Flatten":
            attrs["axis"] = int(_attr(n, "axis", 1))
        elif op in ("Squeeze", "Unsqueeze"):
            axes = self._int_const(n, 1, "axes")
            if axes is None and _attr(n, "axes") is not None:
                axes = np.asarray(_attr(n, "axes"), np.int64)
            if axes is not None:
                nm = n.input[1] if len(n.input) > 1 and n.input[1] else f"{n.name}_axes"
                inputs.append(self.initializer(_base(nm), axes.astype(np.int64), [0]))
        elif op == "Gather":
            idx = self._int_const(n, 1, "indices")
            inputs.append(self.initializer(_base(n.input[1]), idx.astype(np.int64), [0]))
            attrs["axis"] = int(_attr(n, "axis", 0))
        name, out = self.define_output(n.output[0], n, self.shape(n.output[0]), False, x)
        self._need_q(n, out)
        self.emit(op, n.name, inputs, [name], {**attrs, "quant_type": self.qtype(x.dtype)})
        self.finish_output(out)
        return None

    # -- streaming --

    def _streaming_cache(self, n: onnx.NodeProto) -> None:
        if n.op_type != "StreamingCache":
            raise UserError(f"{n.domain}.{n.op_type} '{n.name}': unknown espstream operator")
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if "window_size" not in attrs or "axis" not in attrs:
            raise UserError(f"StreamingCache '{n.name}' lacks window_size or axis")
        if len(n.input) != 2 or len(n.output) != 2:
            raise UserError(f"StreamingCache '{n.name}' must take (x, state) and return "
                            "(y, next_state)")
        state, nxt = n.input[1], n.output[1]
        if (state, nxt) not in self.states:
            raise UserError(f"StreamingCache '{n.name}': its state '{state}' -> '{nxt}' is not a "
                            "pair of espstream.states (run espstream streamify)")
        qc = None if n.input[0] in self.acts else self.qconst(n.input[0])
        x = self._const_act(n, n.input[0], qc) if qc is not None else self.act(n.input[0], n)
        if x.rank >= 3:
            x = self.layout_as(x, True)
        fa = x.runtime_axis(int(attrs["axis"]))
        before = x.runtime_shape()[:fa]
        if any(d != 1 for d in before):
            raise UserError(f"StreamingCache '{n.name}': runtime shape {x.runtime_shape()} has "
                            f"axes of size > 1 before the frame axis {fa}; ESP-DL's cache copies "
                            "frames flatly")
        name, out = self.define_output(n.output[0], n, self.shape(n.output[0]), x.cl, x)
        self._need_q(n, out)
        self.emit("StreamingCache", n.name, [x.name], [name],
                  {"frame_axis": fa, "quant_type": self.qtype(x.dtype),
                   "window_size": int(attrs["window_size"])})
        self.finish_output(out)
        if any(c.op_type != "StreamingCache" for c in self.consumers.get(state, [])):
            raise UserError(f"state '{state}' is read by other nodes than StreamingCache "
                            f"'{n.name}'")

    def _const_act(self, n: onnx.NodeProto, name: str, qc: _QConst) -> _Act:
        """A quantized constant read where an activation is expected (streamify's start mask:
        a StreamingCache over int8 ones): an initializer in the runtime layout (rule 8)."""
        if len(qc.exps) != 1 or qc.data.dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
            raise UserError(f"{n.op_type} '{n.name}': constant input '{name}' must be an int8 / "
                            "int16 tensor with one exponent")
        rank = qc.data.ndim
        data = np.transpose(qc.data, perm_of(rank)) if rank >= 3 else qc.data
        init = self.initializer(_base(name), data, qc.exps)
        return _Act(init, qc.exps[0], list(qc.data.shape), rank >= 3, qc.data.dtype)

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
                    "ESP-DL keeps only StreamingCache state, not a recurrent hidden state"
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


def _attr(n: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _base(name: str) -> str:
    """The initializer name ESP-PPQ would use: the ONNX weight name without calibrate's suffix."""
    for suffix in ("_quantized", "_dequantized"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name

"""Which tensors get an exponent of their own, which share one, and which stay unquantized.

`make_plan` walks a float model (topologically sorted, as ONNX requires) and applies ESP-DL's
rules, in this order of precedence:

1. Graph inputs of float type get their own exponent.
2. Conv / ConvTranspose / Gemm / MatMul with a constant weight ("gemm" layers): weight per output
   channel or per tensor, bias at `e_in + e_w`. If the only consumer of the output is a Relu or
   Clip and the output is not a graph output, the two are fused: the gemm output stays float
   inside the pair ("internal") and the Relu / Clip output gets the exponent.
3. SiLU written as `Mul(x, Sigmoid(x))` where the Sigmoid output feeds only that Mul: the Sigmoid
   output is internal (ESP-DL's Swish table computes the pair), the Mul output gets the exponent.
4. Data movement (Reshape, Transpose, Flatten, Slice, Squeeze, Unsqueeze, MaxPool, Pad, Split,
   plus Identity and GlobalMaxPool): every float output shares the exponent of input 0.
5. Add / Sub / Concat: the output gets its own exponent; each input whose exponent differs is
   requantized to it; a constant input is quantized at the output's exponent directly. An input
   with an exponent of its own whose only use is this node (not a graph output) adopts the
   output's exponent instead (`Plan.adopt`): one rounding instead of two, and no requantize
   operator on the device.
6. Elementwise and pooling operators (Mul, AveragePool, GlobalAveragePool, ReduceMean,
   Sigmoid, Tanh, HardSigmoid, HardSwish, LeakyRelu, PRelu, Relu, Clip, Elu, Softplus, Exp)
   and MatMul of two activations: output gets its own exponent; a constant input of Mul or
   PRelu is quantized with its own per-tensor exponent (other constant inputs, such as Clip's
   bounds, are parameters and stay float).
7. Softmax / LogSoftmax: the output stays float; only data movement or a graph output may follow.
8. Nodes with no float output (shape arithmetic) are left alone; any other operator producing
   a float is refused with a message naming the node.
9. Streaming models (`streamify`'s output): an `espstream.StreamingCache(x, state) -> (y,
   next_state)` moves data, so y shares x's exponent; its state input and `next_state` stay
   float and unquantized (the frames they carry are x's, already on x's grid), exactly the
   form `streamify` writes for a QDQ model and `lower` reads. A graph input read only as such a
   state gets no exponent. A constant x (a start mask of ones) is stored as an integer at its
   own minmax exponent (`Plan.const_ranges`), which y shares.
10. Hand-written state pairs (`Plan.ties`, set by the caller): a state input and its state
   output are quantized like any input and output, and `choose_exponents` gives the two (and
   every tensor sharing or adopting their exponent) one exponent, so the loop has no
   requantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from espstream.errors import UserError

GEMM_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
STREAM_DOMAIN = "espstream"
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QGemm",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
}

OWN, SHARE, INTERNAL, FLOAT = "own", "share", "internal", "float"


@dataclass
class Layer:
    """A group of nodes whose result carries one exponent of its own."""

    name: str  # the display name: the last node's name, or "input NAME"
    op: str  # e.g. "Conv+Relu", "SiLU", "Add", "input"
    kind: str  # "input" | "gemm" | "requant" | "own"
    nodes: list[str]  # node names in the float model (empty for an input)
    output: str  # the tensor with the layer's exponent


@dataclass
class GemmInfo:
    node: str
    input: str  # the activation input
    weight: str
    channel_axis: int | None  # output-channel axis of the weight, None if per-channel is impossible
    bias: str | None


@dataclass
class Plan:
    state: dict[str, str] = field(default_factory=dict)  # float activation -> OWN/SHARE/...
    share_root: dict[str, str] = field(default_factory=dict)  # SHARE tensor -> OWN tensor
    layers: list[Layer] = field(default_factory=list)
    gemms: dict[str, GemmInfo] = field(default_factory=dict)
    requant_nodes: list[str] = field(default_factory=list)
    # (node, input index, "output" | "own"): float constants to store as integers
    const_inputs: list[tuple[str, int, str]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    # (output, inputs): inputs of an Add / Sub / Concat that take the output's exponent
    # (rule 5), in graph order
    adopt: list[tuple[str, list[str]]] = field(default_factory=list)
    # constant root of a shared exponent (rule 9) -> (min(c, 0), max(c, 0))
    const_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    # (state input, state output) pairs whose exponents must be one (rule 10)
    ties: list[tuple[str, str]] = field(default_factory=list)
    # GRU / LSTM node -> what `espstream.ops.recurrent` quantizes itself (its weights, biases,
    # constant states and gate exponent; see that module)
    recurrent: dict[str, dict] = field(default_factory=dict)

    def observed(self) -> list[str]:
        """Tensors whose exponent comes from an observer."""
        return [layer.output for layer in self.layers]

    def quantized(self) -> list[str]:
        """Tensors followed by Q/DQ: own and shared ones."""
        return [t for t, s in self.state.items() if s in (OWN, SHARE)]

    def root(self, t: str) -> str:
        return self.share_root.get(t, t)


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn `Constant` nodes (tensor-valued) into initializers, in place."""
    keep = []
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (reports and the plan refer to nodes by name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        n.name = name
        seen.add(name)


def check_float_model(model: onnx.ModelProto, label: str = "input model") -> None:
    """Refuse a model that is already quantized."""
    for n in model.graph.node:
        if n.op_type in QUANTIZED_OPS:
            raise UserError(
                f"the {label} is already quantized (node {n.name or n.op_type!r} is a "
                f"{n.op_type}); calibrate takes the float model (the output of `espstream "
                "optimize`)"
            )
    for key in (p.key for p in model.metadata_props):
        if key == "espstream.bits":
            raise UserError(
                f"the {label} is already calibrated by espstream (metadata espstream.bits); "
                "calibrate takes the float model"
            )
    ints = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
            onnx.TensorProto.UINT16}
    weight_inputs = {
        n.input[1] for n in model.graph.node if n.op_type in GEMM_OPS and len(n.input) > 1
    }
    for t in model.graph.initializer:
        if t.data_type in ints and t.name in weight_inputs:
            raise UserError(
                f"the {label} is already quantized (weight {t.name!r} is an integer tensor); "
                "calibrate takes the float model"
            )


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help here, not a requirement
        inferred = model
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


@dataclass
class PlanCtx:
    """What a calibration rule sees: the plan being built and the model's facts."""

    plan: Plan
    inits: dict[str, onnx.TensorProto]
    outputs: set[str]
    consumers: dict[str, list[onnx.NodeProto]]
    done: set[str] = field(default_factory=set)  # nodes planned with an earlier one (fusions)

    def only_consumer(self, t: str) -> onnx.NodeProto | None:
        c = self.consumers.get(t, [])
        return c[0] if len(c) == 1 and t not in self.outputs else None

    def act_inputs(self, n: onnx.NodeProto) -> list[str]:
        return [i for i in n.input if i and i in self.plan.state]

    def const_float(self, name: str) -> bool:
        return name in self.inits and self.inits[name].data_type == onnx.TensorProto.FLOAT


# ---- the shared rules operator modules point to ---------------------------------------------


def share(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    """Rule 4: data movement; every float output shares input 0's exponent."""
    plan = pc.plan
    src = n.input[0]
    if src not in plan.state:
        raise UserError(
            f"node {n.name!r} ({n.op_type}) moves a constant; fold it first with "
            "`espstream optimize`"
        )
    for o in float_outs:
        if plan.state[src] == FLOAT:
            plan.state[o] = FLOAT
        else:
            plan.state[o] = SHARE
            plan.share_root[o] = plan.root(src)


def requant(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    """Rule 5: Add / Sub / Concat; inputs requantized to (or adopting) the output's exponent."""
    plan = pc.plan
    ins = pc.act_inputs(n)
    _need_inputs(n, ins)
    plan.state[n.output[0]] = OWN
    plan.requant_nodes.append(n.name)
    own_sole = [i for i in dict.fromkeys(ins) if plan.state[i] == OWN
                and pc.only_consumer(i) is n and list(n.input).count(i) == 1]
    if own_sole:
        plan.adopt.append((n.output[0], own_sole))
    for k, i in enumerate(n.input):
        if i and pc.const_float(i):
            plan.const_inputs.append((n.name, k, "output"))
    plan.layers.append(Layer(n.name, n.op_type, "requant", [n.name], n.output[0]))


def own(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str],
        quantize_constants: bool = False) -> None:
    """Rule 6: the output gets an exponent of its own; with `quantize_constants`, float
    constant inputs are stored as integers at their own exponent (Mul, PRelu, MatMul)."""
    plan = pc.plan
    _need_inputs(n, pc.act_inputs(n))
    plan.state[n.output[0]] = OWN
    if quantize_constants:
        for k, i in enumerate(n.input):
            if i and pc.const_float(i):
                plan.const_inputs.append((n.name, k, "own"))
    plan.layers.append(Layer(n.name, n.op_type, "own", [n.name], n.output[0]))


def own_with_constants(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    own(pc, n, float_outs, quantize_constants=True)


def float_output(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    """Rule 7: Softmax / LogSoftmax; the output stays float."""
    _need_inputs(n, pc.act_inputs(n))
    pc.plan.state[n.output[0]] = FLOAT


def make_plan(model: onnx.ModelProto) -> Plan:
    """Apply the module's rules to `model` (nodes named, Constants as initializers); each
    operator's rule comes from `espstream.ops.registry`."""
    from espstream.ops import registry

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    types = _elem_types(model)
    outputs = {o.name for o in g.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)

    def is_float(name: str) -> bool:
        return types.get(name, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT

    def bad_float(name: str) -> bool:
        return types.get(name) in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                   onnx.TensorProto.BFLOAT16)

    plan = Plan()
    cache_states = _cache_states(g)
    for vi in g.input:
        if vi.name in inits or vi.name in cache_states:
            continue
        if bad_float(vi.name):
            raise UserError(f"input {vi.name!r}: float16/float64 models are not supported; "
                            "convert the model to float32")
        if is_float(vi.name):
            plan.state[vi.name] = OWN
            plan.inputs.append(vi.name)
            plan.layers.append(Layer(f"input {vi.name}", "input", "input", [], vi.name))

    pc = PlanCtx(plan, inits, outputs, consumers)

    def spec_of(n: onnx.NodeProto) -> registry.OpSpec | None:
        # other domains than espstream's are looked up by type, as ONNX's own operators
        return registry.op(n.op_type, n.domain if n.domain == STREAM_DOMAIN else "")

    _refuse_unsupported([n for n in g.node if n.domain != STREAM_DOMAIN],  # rule 9
                        lambda o: bool(o) and is_float(o) and o not in inits, spec_of)
    for n in g.node:
        if n.name in pc.done:
            continue
        float_outs = [o for o in n.output if o and is_float(o) and o not in inits]
        for o in n.output:
            if o and bad_float(o):
                raise UserError(f"node {n.name!r}: float16/float64 tensors are not supported; "
                                "convert the model to float32")
        if not float_outs:
            continue  # shape arithmetic and the like
        spec = spec_of(n)
        if n.domain == STREAM_DOMAIN:
            if spec is None or spec.calibrate is None:
                raise UserError(
                    f"node {n.name!r}: {n.domain}.{n.op_type} with {len(n.input)} inputs / "
                    f"{len(n.output)} outputs is not a StreamingCache(x, state) -> (y, "
                    "next_state)"
                )
            spec.calibrate(pc, n, float_outs)
            continue
        for i in pc.act_inputs(n):
            if plan.state[i] == FLOAT and (spec is None or spec.calibrate is not share):
                raise UserError(
                    f"node {n.name!r} ({n.op_type}) reads {i!r}, the float output of a Softmax; "
                    "ESP-DL computes Softmax last, in float: only data movement or a graph "
                    "output may follow it"
                )
        if spec is None or spec.calibrate is None:
            raise UserError(
                f"node {n.name!r}: operator {n.op_type} is not supported by calibrate "
                f"(supported: {', '.join(registry.calibrated())})"
            )
        spec.calibrate(pc, n, float_outs)
    return plan


# Operators `optimize` folds or removes from every model it accepts.
_OPTIMIZE_REMOVES = {"BatchNormalization", "Dropout"}


def _refuse_unsupported(nodes, float_out, spec_of) -> None:
    """One error naming every unsupported operator type that computes a float tensor (not just
    the first met), so a user sees at once all that a model needs replaced."""
    from espstream.ops import registry

    bad: dict[str, list[str]] = {}
    for n in nodes:
        spec = spec_of(n)
        if (spec is None or spec.calibrate is None) and any(float_out(o) for o in n.output):
            bad.setdefault(n.op_type, []).append(n.name)
    if not bad:
        return
    supported = f"(supported: {', '.join(registry.calibrated())})"
    if set(bad) <= _OPTIMIZE_REMOVES:  # a float export piped straight in: say what fixes it
        supported = ("(run `espstream optimize` first: it folds BatchNormalization into the "
                     "layer before it and removes Dropout)")
    if len(bad) == 1:
        (op, names), = bad.items()
        raise UserError(f"node {names[0]!r}: operator {op} is not supported by calibrate "
                        f"{supported}")
    listed = ", ".join(f"{op} (node {names[0]!r}" + (f" and {len(names) - 1} more)"
                       if len(names) > 1 else ")") for op, names in bad.items())
    raise UserError(f"operators not supported by calibrate: {listed} {supported}")


def _cache_states(g: onnx.GraphProto) -> set[str]:
    """Graph inputs read only as the state (input 1) of StreamingCache nodes (rule 9)."""
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            if i:
                uses.setdefault(i, []).append((n, k))
    return {
        vi.name for vi in g.input
        if uses.get(vi.name) and all(
            n.domain == STREAM_DOMAIN and n.op_type == "StreamingCache" and k == 1
            for n, k in uses[vi.name]
        )
    }


def _need_inputs(n: onnx.NodeProto, ins: list[str]) -> None:
    if not ins:
        raise UserError(
            f"node {n.name!r} ({n.op_type}) computes on constants only; fold it first with "
            "`espstream optimize`"
        )


def __getattr__(name: str):
    """SHARE_OPS: the operators whose exponent is their input's (rule 4), from the registry."""
    if name == "SHARE_OPS":
        from espstream.ops import registry

        return {s.onnx for s in registry.all_ops() if s.calibrate is share}
    raise AttributeError(name)

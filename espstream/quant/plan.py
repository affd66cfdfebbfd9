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

import numpy as np
import onnx
from onnx import numpy_helper

from espstream.errors import UserError

GEMM_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
STREAM_DOMAIN = "espstream"
FUSABLE_OPS = {"Relu", "Clip"}
SHARE_OPS = {
    "Reshape", "Transpose", "Flatten", "Slice", "Squeeze", "Unsqueeze", "MaxPool", "Pad",
    "Split", "Identity", "GlobalMaxPool",
}
REQUANT_OPS = {"Add", "Sub", "Concat"}
OWN_OPS = {
    "Mul", "AveragePool", "GlobalAveragePool", "ReduceMean", "Sigmoid", "Tanh", "HardSigmoid",
    "HardSwish", "LeakyRelu", "PRelu", "Relu", "Clip", "Elu", "Softplus", "Exp",
}
CONST_QUANT_OPS = {"Mul", "PRelu"}
FLOAT_OUT_OPS = {"Softmax", "LogSoftmax"}
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QGemm",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
}
SUPPORTED = sorted(GEMM_OPS | SHARE_OPS | REQUANT_OPS | OWN_OPS | FLOAT_OUT_OPS)

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


def make_plan(model: onnx.ModelProto) -> Plan:
    """Apply the module's rules to `model` (nodes named, Constants as initializers)."""
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

    done: set[str] = set()

    def only_consumer(t: str) -> onnx.NodeProto | None:
        c = consumers.get(t, [])
        return c[0] if len(c) == 1 and t not in outputs else None

    def act_inputs(n: onnx.NodeProto) -> list[str]:
        return [i for i in n.input if i and i in plan.state]

    def const_float(name: str) -> bool:
        return name in inits and inits[name].data_type == onnx.TensorProto.FLOAT

    _refuse_unsupported([n for n in g.node if n.domain != STREAM_DOMAIN],  # rule 9
                        lambda o: bool(o) and is_float(o) and o not in inits)
    for n in g.node:
        if n.name in done:
            continue
        float_outs = [o for o in n.output if o and is_float(o) and o not in inits]
        for o in n.output:
            if o and bad_float(o):
                raise UserError(f"node {n.name!r}: float16/float64 tensors are not supported; "
                                "convert the model to float32")
        if not float_outs:
            continue  # shape arithmetic and the like
        ins = act_inputs(n)
        op = n.op_type
        if n.domain == STREAM_DOMAIN:
            _plan_cache(plan, n, inits, const_float)
            continue
        for i in ins:
            if plan.state[i] == FLOAT and op not in SHARE_OPS:
                raise UserError(
                    f"node {n.name!r} ({op}) reads {i!r}, the float output of a Softmax; ESP-DL "
                    "computes Softmax last, in float: only data movement or a graph output may "
                    "follow it"
                )
        if op in GEMM_OPS and len(n.input) > 1 and const_float(n.input[1]):
            _plan_gemm(plan, n, inits, ins, only_consumer, done)
        elif op == "Sigmoid" and _is_silu(n, only_consumer):
            mul = only_consumer(n.output[0])
            plan.state[n.output[0]] = INTERNAL
            plan.state[mul.output[0]] = OWN
            plan.layers.append(Layer(mul.name, "SiLU", "own", [n.name, mul.name], mul.output[0]))
            done.add(mul.name)
        elif op in SHARE_OPS:
            src = n.input[0]
            if src not in plan.state:
                raise UserError(
                    f"node {n.name!r} ({op}) moves a constant; fold it first with "
                    "`espstream optimize`"
                )
            for o in float_outs:
                if plan.state[src] == FLOAT:
                    plan.state[o] = FLOAT
                else:
                    plan.state[o] = SHARE
                    plan.share_root[o] = plan.root(src)
        elif op in REQUANT_OPS:
            _need_inputs(n, ins)
            plan.state[n.output[0]] = OWN
            plan.requant_nodes.append(n.name)
            own_sole = [i for i in dict.fromkeys(ins) if plan.state[i] == OWN
                        and only_consumer(i) is n and list(n.input).count(i) == 1]
            if own_sole:
                plan.adopt.append((n.output[0], own_sole))
            for k, i in enumerate(n.input):
                if i and const_float(i):
                    plan.const_inputs.append((n.name, k, "output"))
            plan.layers.append(Layer(n.name, op, "requant", [n.name], n.output[0]))
        elif op in OWN_OPS or op in GEMM_OPS:
            if op in ("Conv", "ConvTranspose", "Gemm"):
                raise UserError(
                    f"node {n.name!r} ({op}): its weight is not a constant; calibrate needs "
                    "constant weights (run `espstream optimize` to fold them)"
                )
            _need_inputs(n, ins)
            plan.state[n.output[0]] = OWN
            if op in CONST_QUANT_OPS or op == "MatMul":
                for k, i in enumerate(n.input):
                    if i and const_float(i):
                        plan.const_inputs.append((n.name, k, "own"))
            plan.layers.append(Layer(n.name, op, "own", [n.name], n.output[0]))
        elif op in FLOAT_OUT_OPS:
            _need_inputs(n, ins)
            plan.state[n.output[0]] = FLOAT
        else:
            raise UserError(
                f"node {n.name!r}: operator {op} is not supported by calibrate (supported: "
                f"{', '.join(SUPPORTED)})"
            )
    if not any(layer.kind != "input" for layer in plan.layers):
        raise UserError(
            "the model has no quantizable operator (Conv, Gemm, MatMul, Add, Mul, pooling, "
            "activations ...): nothing to calibrate"
        )
    return plan


def _refuse_unsupported(nodes, float_out) -> None:
    """One error naming every unsupported operator type that computes a float tensor (not just
    the first met), so a user sees at once all that a model needs replaced."""
    bad: dict[str, list[str]] = {}
    for n in nodes:
        if n.op_type not in SUPPORTED and any(float_out(o) for o in n.output):
            bad.setdefault(n.op_type, []).append(n.name)
    if not bad:
        return
    supported = f"(supported: {', '.join(SUPPORTED)})"
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


def _plan_cache(plan: Plan, n: onnx.NodeProto, inits, const_float) -> None:
    """Rule 9: StreamingCache(x, state) -> (y, next_state)."""
    if n.op_type != "StreamingCache" or len(n.input) != 2 or len(n.output) != 2:
        raise UserError(
            f"node {n.name!r}: {n.domain}.{n.op_type} with {len(n.input)} inputs / "
            f"{len(n.output)} outputs is not a StreamingCache(x, state) -> (y, next_state)"
        )
    x, y, nxt = n.input[0], n.output[0], n.output[1]
    if x in plan.state:
        if plan.state[x] == FLOAT:
            raise UserError(
                f"node {n.name!r} (StreamingCache) caches {x!r}, the float output of a Softmax; "
                "ESP-DL caches integer tensors only"
            )
        plan.state[y] = SHARE
        plan.share_root[y] = plan.root(x)
    elif const_float(x):
        c = numpy_helper.to_array(inits[x]).astype(np.float64)
        plan.const_ranges[x] = (min(float(c.min()), 0.0), max(float(c.max()), 0.0))
        plan.const_inputs.append((n.name, 0, "own"))
        plan.state[y] = SHARE
        plan.share_root[y] = x
    else:
        raise UserError(f"node {n.name!r} (StreamingCache) caches {x!r}, which is neither an "
                        "activation nor a float constant")
    plan.state[nxt] = INTERNAL


def _need_inputs(n: onnx.NodeProto, ins: list[str]) -> None:
    if not ins:
        raise UserError(
            f"node {n.name!r} ({n.op_type}) computes on constants only; fold it first with "
            "`espstream optimize`"
        )


def _is_silu(sig: onnx.NodeProto, only_consumer) -> bool:
    mul = only_consumer(sig.output[0])
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
        return False
    return sorted(mul.input) == sorted([sig.input[0], sig.output[0]])


def _plan_gemm(plan: Plan, n: onnx.NodeProto, inits, ins, only_consumer, done) -> None:
    op = n.op_type
    if not ins or n.input[0] not in plan.state:
        raise UserError(
            f"node {n.name!r} ({op}): its data input is a constant; fold it first with "
            "`espstream optimize`"
        )
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    w = numpy_helper.to_array(inits[n.input[1]])
    if op == "Gemm" and attrs.get("transA", 0):
        raise UserError(f"node {n.name!r} (Gemm): transA=1 is not supported; transpose the input")
    if op == "Conv":
        axis = 0
    elif op == "ConvTranspose":
        axis = 1 if attrs.get("group", 1) == 1 else None
    elif op == "Gemm":
        axis = 0 if attrs.get("transB", 0) else 1
    else:  # MatMul: B is [..., K, N]
        axis = w.ndim - 1 if w.ndim >= 2 else None
    bias = None
    if op != "MatMul" and len(n.input) > 2 and n.input[2]:
        if n.input[2] not in inits:
            raise UserError(f"node {n.name!r} ({op}): its bias is not a constant")
        bias = n.input[2]
    plan.gemms[n.name] = GemmInfo(n.name, n.input[0], n.input[1], axis, bias)
    out = n.output[0]
    act = only_consumer(out)
    if act is not None and act.op_type in FUSABLE_OPS and act.input[0] == out:
        plan.state[out] = INTERNAL
        plan.state[act.output[0]] = OWN
        plan.layers.append(Layer(act.name, f"{op}+{act.op_type}", "gemm", [n.name, act.name],
                                 act.output[0]))
        done.add(act.name)
    else:
        plan.state[out] = OWN
        plan.layers.append(Layer(n.name, op, "gemm", [n.name], out))


def gemm_weight_bias(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Float weight and bias of a gemm layer with Gemm's alpha / beta folded; returns out channels.

    A Gemm bias is reshaped to one value per output channel.
    """
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    b = None
    if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
    if node.op_type == "Conv":
        cout = w.shape[0]
    elif node.op_type == "ConvTranspose":
        cout = w.shape[1] * attrs.get("group", 1)
    elif node.op_type == "Gemm":
        cout = w.shape[0] if attrs.get("transB", 0) else w.shape[1]
        w = w * np.float32(attrs.get("alpha", 1.0))
        if b is not None:
            b = b * np.float32(attrs.get("beta", 1.0))
            if b.size == 1:
                b = np.full(cout, b.reshape(()), np.float32)
            elif b.size == cout:
                b = b.reshape(cout)
            else:
                raise UserError(
                    f"node {node.name!r} (Gemm): bias of shape {list(b.shape)} is not one value "
                    "per output; only a per-output bias can be quantized"
                )
    else:
        cout = w.shape[-1]
    return w, b, cout

"""One small float model per configuration of op_cfg.toml (our own builders).

`build(op, cfg)` returns `(model, input_shapes)`: a `torch.nn.Module` (exported to ONNX by
generate.py the way `espdl_quantize_torch` does it: opset 18, constant folding, TorchScript
exporter) or an `onnx.ModelProto` for the operators op_cfg.toml marks `package =
"onnx_ops_test"`. The graphs follow what each configuration describes in ESP-DL's
tools/ops_test (the operator, its attributes, and the few neighbours the configuration implies:
a ReLU before Slice / Pad / Split / RMSNorm, a 3x3 conv + ReLU before MaxPool, an Exp that keeps
a divisor positive, ...), so the exported ESP-DL graphs are the ones Espressif's CI runs.
Weights are drawn from torch's generator, seeded by the caller.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from choose import shapes  # tools/ops_suite/choose.py (generate.py puts it on sys.path)
from onnx import TensorProto, helper
from torch import nn


class Lambda(nn.Module):
    """forward = fn(self, *inputs); parameters and submodules set as attributes."""

    def __init__(self, fn, **members):
        super().__init__()
        self._fn = fn
        for k, v in members.items():
            setattr(self, k, v)

    def forward(self, *xs):
        return self._fn(self, *xs)


def _act(cfg, y):
    return F.relu(y) if cfg.get("activation_func") == "ReLU" else y


def _spread_channels(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Per-output-channel magnitudes 0.1, 0.2, 0.4, 0.8 (repeating), so that per-channel weight
    exponents (esp32p4) really differ between channels."""
    with torch.no_grad():
        for i in range(weight.shape[0]):
            s = 0.1 * 2 ** (i % 4)
            weight[i] = torch.randn_like(weight[i]) * s
            if bias is not None:
                bias[i] = torch.randn(()) * s * 0.5


def conv(cfg, transpose=False):
    rank = len(cfg["input_shape"]) - 2
    kw = dict(kernel_size=cfg["kernel_size"], stride=cfg["stride"], padding=cfg["padding"],
              dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"])
    if transpose:
        cls = nn.ConvTranspose1d if rank == 1 else nn.ConvTranspose2d
        kw["output_padding"] = cfg["output_padding"]
    else:
        cls = nn.Conv1d if rank == 1 else nn.Conv2d
    layer = cls(cfg["in_channels"], cfg["out_channels"], **kw)
    if not transpose:
        _spread_channels(layer.weight, layer.bias)
    return Lambda(lambda m, x: _act(cfg, m.layer(x)), layer=layer)


def gemm(cfg):
    layer = nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg["bias"])
    _spread_channels(layer.weight, layer.bias)
    return Lambda(lambda m, x: _act(cfg, m.layer(x)), layer=layer)


def binary(fn, with_act=True):
    """Two operands; one may be a constant (`input0_is_weight` / `input1_is_weight`)."""

    def make(cfg):
        w = cfg.get("input_weight_shape")
        const = None
        if w and cfg.get("input0_is_weight"):
            const = 0
        elif w and cfg.get("input1_is_weight"):
            const = 1
        members = {}
        if const is not None:
            members["w"] = nn.Parameter(torch.randn(w))

        def fwd(m, *xs):
            if const == 0:
                a, b = m.w, xs[0]
            elif const == 1:
                a, b = xs[0], m.w
            else:
                a, b = xs
            y = fn(a, b)
            return _act(cfg, y) if with_act else y

        return Lambda(fwd, **members)

    return make


def unary(fn):
    return lambda cfg: Lambda(lambda m, x: fn(cfg, x))


def pool(cfg, kind):
    rank = len(cfg["input_shape"]) - 2
    kw = dict(kernel_size=cfg["kernel_size"], stride=cfg["stride"], padding=cfg["padding"])
    if kind == "avg":
        p = (nn.AvgPool1d if rank == 1 else nn.AvgPool2d)(**kw)
        return Lambda(lambda m, x: m.p(x), p=p)
    c = cfg["input_shape"][1]
    pre = (nn.Conv1d if rank == 1 else nn.Conv2d)(c, c, kernel_size=3, padding=1)
    p = (nn.MaxPool1d if rank == 1 else nn.MaxPool2d)(**kw)
    return Lambda(lambda m, x: m.p(F.relu(m.pre(x))), p=p, pre=pre)


def global_avg(cfg):
    rank = len(cfg["input_shape"]) - 2
    p = nn.AdaptiveAvgPool1d(1) if rank == 1 else nn.AdaptiveAvgPool2d((1, 1))
    return Lambda(lambda m, x: m.p(x), p=p)


def resize(cfg):
    def tup(v):
        return tuple(v) if isinstance(v, list) else v

    up = nn.Upsample(size=tup(cfg.get("size")), scale_factor=tup(cfg.get("scale_factor")),
                     mode=cfg["mode"], align_corners=cfg["align_corners"] or None)
    members = {"up": up}
    if cfg.get("conv"):
        members["conv"] = nn.Conv2d(cfg["in_features"], cfg["out_features"], 1)
    return Lambda(lambda m, x: m.up(m.conv(x) if hasattr(m, "conv") else x), **members)


def layer_norm(cfg):
    shape = cfg["input_shape"]
    axis = cfg.get("axis", -1) % len(shape)
    ln = nn.LayerNorm(shape[axis:], eps=cfg.get("epsilon", 1e-5))
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.02)
        ln.bias.uniform_(-0.1, 0.1)
    return Lambda(lambda m, x: m.ln(x), ln=ln)


def rms_norm(cfg):
    """x / sqrt(mean(x^2) + eps) * weight over axis..end, decomposed into primitive ops (after a
    ReLU), as ESP-DL's torch test writes it."""
    shape = cfg["input_shape"]
    axis = cfg.get("axis", -1) % len(shape)
    outer = int(np.prod(shape[:axis]))
    inner = int(np.prod(shape[axis:]))
    eps = float(cfg.get("epsilon", 1e-5))
    weight = nn.Parameter(torch.randn(inner) * 0.02 + 1.0)

    def fwd(m, x):
        x = F.relu(x).reshape(outer, inner)
        x = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
        return (x * m.weight).reshape(shape)

    return Lambda(fwd, weight=weight)


def prelu(cfg):
    return Lambda(lambda m, x: m.p(x), p=nn.PReLU(cfg["num_parameters"]))


def softmax(log):
    def make(cfg):
        def fwd(m, x):
            if cfg["relu"]:
                x = F.relu(x)
            return (F.log_softmax if log else F.softmax)(x, cfg["dim"])
        return Lambda(fwd)
    return make


def concat(cfg):
    def fwd(m, *xs):
        xs = list(xs)
        if cfg.get("relu"):
            xs += [F.relu(x) for x in xs]
        return torch.cat(xs, dim=cfg["axis"])
    return Lambda(fwd)


def squeeze(cfg):
    d = cfg["dim"]
    if d is False:
        return Lambda(lambda m, x: torch.squeeze(x))
    return Lambda(lambda m, x: torch.squeeze(x, d))


def slice_(cfg):
    def fwd(m, x):
        x = F.relu(x)
        if cfg.get("flip", 0):
            return torch.flip(x, cfg["axes"])
        for i, axis in enumerate(cfg["axes"]):
            step = cfg["steps"][i] if cfg["steps"] else 1
            x = torch.ops.aten.slice.Tensor(x, axis, cfg["starts"][i], cfg["ends"][i], step)
        return x
    return Lambda(fwd)


def pad(cfg):
    pads = [int(p) for p in cfg["pads"]]
    return Lambda(lambda m, x: F.pad(F.relu(x), pads, cfg["mode"], cfg["const_value"]))


def matmul(cfg):
    members = {}
    if cfg.get("input1_is_weight") and cfg.get("input_weight_shape"):
        members["w"] = nn.Parameter(torch.randn(cfg["input_weight_shape"]))

    def fwd(m, a, *rest):
        a = torch.squeeze(a, 0)
        b = torch.squeeze(rest[0], 0) if rest else m.w
        return _act(cfg, torch.matmul(a, b))

    return Lambda(fwd, **members)


def split(cfg):
    return Lambda(lambda m, x: torch.split(F.relu(x), cfg["split_size_or_sections"], cfg["dim"]))


def gather(cfg):
    idx = torch.tensor(cfg["indices"], dtype=torch.long)

    def fwd(m, x):
        x = torch.squeeze(x, 0)
        return x[(slice(None),) * cfg["axis"] + (idx,)]

    return Lambda(fwd)


def requantize(cfg):
    """Values of one exponent added, subtracted and concatenated (sigmoid - 0.5, shifted by 20
    when `shift_left`): requantizations between the Add / Sub / Concat exponents."""
    amp = 20.0 if cfg["shift_left"] else 0.0

    def fwd(m, x):
        x = torch.sigmoid(x) - 0.5
        x = x + amp
        h, w = x.shape[2] // 2, x.shape[3] // 2
        a, b = x[:, :, :h, :w], x[:, :, h:, w:]
        y1 = (a + b) - 2 * amp
        y2 = a - b
        return torch.cat([y1, y2], dim=1)

    return Lambda(fwd)


def reduce_(fn):
    def make(cfg):
        def fwd(m, x):
            x = x.squeeze(0)
            if cfg.get("reduceall"):
                return torch.prod(x)
            return fn(x, cfg["dim"], cfg["keepdim"])
        return Lambda(fwd)
    return make


def recurrent(kind):
    def make(cfg):
        cls = nn.GRU if kind == "GRU" else nn.LSTM
        rnn = cls(input_size=cfg["input_shape"][-1], hidden_size=cfg["hidden_size"],
                  num_layers=cfg.get("num_layers", 1),
                  bidirectional=cfg.get("bidirectional", False),
                  bias=cfg.get("bias", True), batch_first=cfg.get("batch_first", False))
        # the initial state is a graph input (choose.recurrent_states says why)
        if kind == "GRU":
            return Lambda(lambda m, x, h0: m.rnn(x, h0), rnn=rnn)
        return Lambda(lambda m, x, h0, c0: (lambda o: (o[0], o[1][0], o[1][1]))(
            m.rnn(x, (h0, c0))), rnn=rnn)
    return make


def pow_(cfg):
    return Lambda(lambda m, a, b: torch.pow(torch.exp(a * 0.5), b))


# ---- ONNX-built models (package = "onnx_ops_test") -------------------------------------------


def _model(nodes, inputs, outputs, inits=(), opset=13):
    g = helper.make_graph(nodes, "ops_suite", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name="espstream ops_suite")
    m.ir_version = min(m.ir_version, 10)
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _out(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _i64(name, vals, dims=None):
    vals = list(np.asarray(vals).reshape(-1).tolist())
    return helper.make_tensor(name, TensorProto.INT64, dims if dims is not None else [len(vals)],
                              vals)


def onnx_unary_attr(op_type, **fixed):
    def make(cfg):
        attrs = {k: (cfg[c] if c in cfg else d) for k, (c, d) in fixed.items()}
        n = helper.make_node(op_type, ["x"], ["y"], **attrs)
        return _model([n], [_vi("x", cfg["input_shape"])], [_out("y")])
    return make


def reduce_onnx(op_type, exp_first):
    def make(cfg):
        nodes, src = [], "x"
        if exp_first:
            nodes.append(helper.make_node("Exp", ["x"], ["e"]))
            src = "e"
        nodes.append(helper.make_node(op_type, [src, "axes"], ["y"],
                                      keepdims=int(bool(cfg.get("keepdim", False)))))
        return _model(nodes, [_vi("x", cfg["input_shape"])], [_out("y")],
                      [_i64("axes", cfg["dim"])], opset=18)
    return make


def reverse_sequence(cfg):
    n = helper.make_node("ReverseSequence", ["x", "lens"], ["y"], batch_axis=cfg["batch_axis"],
                         time_axis=cfg["time_axis"])
    return _model([n], [_vi("x", cfg["input_shape"])], [_out("y")],
                  [_i64("lens", cfg["sequence_lens"])])


def mod(cfg):
    a, b = shapes(cfg) if len(shapes(cfg)) == 2 else shapes(cfg) * 2
    nodes = [helper.make_node("Exp", ["b"], ["eb"]),
             helper.make_node("Mod", ["a", "eb"], ["y"], fmod=cfg.get("fmod", 1))]
    return _model(nodes, [_vi("a", a), _vi("b", b)], [_out("y")])


def scatter_nd(cfg):
    data, upd = shapes(cfg)
    idx = np.asarray(cfg["indices_shape"])
    red = cfg.get("reduction", "none")
    kw = {} if red == "none" else {"reduction": red}
    nodes = [helper.make_node("Squeeze", ["data", "ax0"], ["d"]),
             helper.make_node("Squeeze", ["updates", "ax0"], ["u"]),
             helper.make_node("ScatterND", ["d", "idx", "u"], ["y"], **kw)]
    return _model(nodes, [_vi("data", data), _vi("updates", upd)], [_out("y")],
                  [_i64("idx", idx, list(idx.shape)), _i64("ax0", [0])], opset=18)


BUILDERS = {
    "Conv": conv,
    "ConvTranspose": lambda c: conv(c, transpose=True),
    "Gemm": gemm,
    "Add": binary(torch.add),
    "Sub": binary(torch.sub),
    "Mul": binary(torch.mul),
    "Div": binary(torch.div),
    "Greater": binary(torch.gt, False),
    "GreaterOrEqual": binary(torch.ge, False),
    "Equal": binary(torch.eq, False),
    "Less": binary(torch.lt, False),
    "LessOrEqual": binary(torch.le, False),
    "GlobalAveragePool": global_avg,
    "AveragePool": lambda c: pool(c, "avg"),
    "MaxPool": lambda c: pool(c, "max"),
    "Resize": resize,
    "Sigmoid": unary(lambda c, x: torch.sigmoid(x)),
    "Tanh": unary(lambda c, x: torch.tanh(x)),
    "Relu": unary(lambda c, x: F.relu(x)),
    "LeakyRelu": unary(lambda c, x: F.leaky_relu(x, c["slope"])),
    "HardSigmoid": unary(lambda c, x: F.hardsigmoid(x)),
    "HardSwish": unary(lambda c, x: F.hardswish(x)),
    "PRelu": prelu,
    "Softmax": softmax(False),
    "LogSoftmax": softmax(True),
    "RMSNormalization": rms_norm,
    "LpNormalization": onnx_unary_attr("LpNormalization", axis=("axis", -1), p=("p", 2)),
    "Exp": unary(lambda c, x: torch.exp(x)),
    "Log": unary(lambda c, x: torch.log(x)),
    "Sqrt": unary(lambda c, x: torch.sqrt(x)),
    "Neg": unary(lambda c, x: torch.neg(x)),
    "Concat": concat,
    "Clip": unary(lambda c, x: torch.clip(x, min=c["min"], max=c["max"])),
    "Flatten": unary(lambda c, x: torch.flatten(x, c["start_dim"], c["end_dim"])),
    "Reshape": unary(lambda c, x: torch.reshape(x, c["shape"])),
    "Transpose": unary(lambda c, x: torch.permute(x, c["perm"])),
    "Squeeze": squeeze,
    "Unsqueeze": unary(lambda c, x: torch.unsqueeze(x, c["dim"])),
    "Slice": slice_,
    "Pad": pad,
    "MatMul": matmul,
    "Split": split,
    "Gather": gather,
    "Requantize": requantize,
    "Elu": unary(lambda c, x: F.elu(x, alpha=c["alpha"])),
    "ReverseSequence": reverse_sequence,
    "Swish": unary(lambda c, x: F.silu(x)),
    "ReduceL1": reduce_(lambda x, d, k: torch.linalg.vector_norm(x, ord=1, dim=d, keepdim=k)),
    "ReduceL2": reduce_(lambda x, d, k: torch.linalg.vector_norm(x, ord=2, dim=d, keepdim=k)),
    "ReduceMax": reduce_(lambda x, d, k: torch.amax(x, dim=d, keepdim=k)),
    "ReduceMin": reduce_(lambda x, d, k: torch.amin(x, dim=d, keepdim=k)),
    "ReduceProd": reduce_(lambda x, d, k: torch.prod(x, dim=d, keepdim=k)),
    "ReduceSum": reduce_(lambda x, d, k: torch.sum(x, dim=d, keepdim=k)),
    "ReduceMean": reduce_(lambda x, d, k: torch.mean(x, dim=d, keepdim=k)),
    "ReduceSumSquare": reduce_onnx("ReduceSumSquare", False),
    "ReduceLogSum": reduce_onnx("ReduceLogSum", True),
    "ReduceLogSumExp": reduce_(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
    "GRU": recurrent("GRU"),
    "LSTM": recurrent("LSTM"),
    "DepthToSpace": onnx_unary_attr("DepthToSpace", blocksize=("blocksize", 2),
                                    mode=("mode", "DCR")),
    "SpaceToDepth": onnx_unary_attr("SpaceToDepth", blocksize=("blocksize", 2)),
    "Pow": pow_,
    "Mod": mod,
    "ScatterND": scatter_nd,
    "LayerNormalization": layer_norm,
}


def build(op: str, cfg: dict):
    """(torch module or onnx.ModelProto, input shapes) for one configuration."""
    if op not in BUILDERS:
        raise KeyError(f"no builder for operator {op}")
    model = BUILDERS[op](cfg)
    if isinstance(model, nn.Module):
        model.eval()
    return model, shapes(cfg, op)

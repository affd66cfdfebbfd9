"""Which configurations of ESP-DL's op_cfg.toml the suite keeps, and why.

Every configuration gets a *signature*: what it exercises, with the pure sizes taken out. The
signature holds
- every attribute of the configuration (kernel, stride, padding, axes, mode, activation, ...),
  except the keys that only give sizes (SIZE_KEYS);
- the rank of each input (and of a constant operand given as `input_weight_shape`);
- for two or more operands, the broadcast kind of every dimension (right-aligned): `=` same
  size, `<` the first operand is 1 (broadcast), `>` the second is 1, `.` one operand has no
  such dimension; a dimension of 1 in both is `1`;
- the alignment class of the innermost size (16 / 8 / other: ESP-DL's SIMD kernels take other
  code paths on unaligned sizes, and the list pairs such configurations, e.g. 48 against 49);
  for a convolution or pooling, of the channels (innermost in ESP-DL's NHWC layout);
- operator facts that the sizes hide: depthwise convolution (groups > 1), the channel alignment
  classes of a convolution, a PRelu slope per channel or shared.
Configurations with the same signature exercise the same code path; the suite keeps the one with
the fewest elements (inputs plus constants; ties: the first in the file).

Then `shrink` makes a kept configuration smaller where its sizes are free (`SHRINK`), keeping the
signature: a dimension of 1 stays 1, every other free dimension becomes at most 3 (the same
dimension of two operands shrinks alike, so the broadcast kind holds), the innermost dimension
(alignment), a reduced / concatenated / softmax axis and the channels of a convolution are kept;
the spatial size of a convolution or pooling keeps its kernel, stride, padding and the remainder
of its last window, with at most 3 outputs per axis; the channels of a convolution, pooling or
resize above 32 become 16 + (channels mod 16), which keeps their alignment class and the
remainder ESP-DL's unaligned loops see. A shrunk configuration records the sizes it came from
(`shrunk_from`).
"""

from __future__ import annotations

import math
from typing import Any

#: keys that only give sizes (the shapes are summarized by rank / broadcast / alignment)
SIZE_KEYS = {
    "input_shape", "export_name_prefix", "in_channels", "out_channels", "in_features",
    "out_features", "hidden_size", "input_weight_shape", "num_parameters", "indices_shape",
    "sequence_lens", "dispatch_table",
}


def shapes(cfg: dict, op: str | None = None) -> list[list[int]]:
    """The configuration's input shapes (one list per graph input)."""
    s = cfg["input_shape"]
    xs = [list(x) for x in s] if s and isinstance(s[0], list) else [list(s)]
    if op in ("GRU", "LSTM"):  # : the initial state(s) as graph inputs (see models)
        xs += recurrent_states(cfg, op == "LSTM")
    return xs


def recurrent_states(cfg: dict, cell: bool) -> list[list[int]]:
    """initial_h (and LSTM's initial_c with `cell`) of a GRU / LSTM configuration:
    [directions * layers, batch, hidden]. ESP-PPQ 1.3.12 cannot quantize a GRU / LSTM without
    an initial_h input (its alignment pass reads input 5: IndexError), so the suite's recurrent
    models take their initial state as graph inputs, as a streaming model does."""
    x = cfg["input_shape"]
    batch = x[0] if cfg.get("batch_first") else x[1]
    d = (2 if cfg.get("bidirectional") else 1) * cfg.get("num_layers", 1)
    return [[d, batch, cfg["hidden_size"]]] * (2 if cell else 1)


def operands(cfg: dict) -> list[list[int]]:
    """Graph inputs plus a constant operand, in operand order."""
    xs = shapes(cfg)
    w = cfg.get("input_weight_shape")
    if w and cfg.get("input0_is_weight"):
        return [list(w), *xs]
    if w and cfg.get("input1_is_weight"):
        return [*xs, list(w)]
    return xs


def align(n: int) -> str:
    return "a16" if n % 16 == 0 else "a8" if n % 8 == 0 else "odd"


def broadcast_kind(a: list[int], b: list[int]) -> str:
    n = max(len(a), len(b))
    a2 = [None] * (n - len(a)) + list(a)
    b2 = [None] * (n - len(b)) + list(b)
    out = []
    for x, y in zip(a2, b2, strict=True):
        if x is None or y is None:
            out.append(".")
        elif x == y:
            out.append("1" if x == 1 else "=")
        elif x == 1:
            out.append("<")
        elif y == 1:
            out.append(">")
        else:
            out.append("?")
    return "".join(out)


def elements(cfg: dict) -> int:
    return sum(math.prod(s) for s in operands(cfg))


def signature(op: str, cfg: dict) -> tuple:
    attrs = tuple(sorted((k, repr(v)) for k, v in cfg.items() if k not in SIZE_KEYS))
    ops = operands(cfg)
    facts: list[Any] = [("ranks", tuple(len(s) for s in ops))]
    if len(ops) >= 2 and op not in ("Concat", "MatMul", "ScatterND"):
        facts.append(("broadcast", broadcast_kind(ops[0], ops[1])))
    if op == "MatMul":
        # the batch dimensions broadcast; the last two are the product's (M, K) x (K, N)
        a, b = ops[0][:-2], ops[1][:-2]
        facts.append(("batch", broadcast_kind(a, b) if a or b else ""))
    if op == "Concat":
        facts.append(("axis_size_equal", ops[0][cfg["axis"]] == ops[1][cfg["axis"]]))
    if op in ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "GlobalAveragePool",
              "Requantize"):
        facts.append(("channels", align(ops[0][1])))  # the innermost dim of ESP-DL's NHWC
    elif op == "MatMul":  # the innermost dims of the product: K (of A) and N (of B)
        facts.append(("inner", (align(ops[0][-1]), align(ops[1][-1]))))
    else:
        facts.append(("inner", align(max(ops, key=math.prod)[-1])))
    if op in ("Conv", "ConvTranspose"):
        facts.append(("depthwise", cfg["groups"] > 1))
        facts.append(("cin", align(cfg["in_channels"])))
        facts.append(("cout", align(cfg["out_channels"])))
    if op == "PRelu":
        facts.append(("per_channel", cfg["num_parameters"] > 1))
    if op == "Requantize":
        facts.append(("dispatch", repr(sorted(cfg.get("dispatch_table", {}).items()))))
    if op in ("GRU", "LSTM"):
        facts.append(("hidden", align(cfg["hidden_size"])))
    return attrs + tuple(facts)


def select(op: str, cfgs: list[dict]) -> list[tuple[int, dict, list[int]]]:
    """[(index of the kept configuration, the configuration, indices it stands for)]."""
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(signature(op, cfg), []).append(i)
    kept = []
    for members in groups.values():
        best = min(members, key=lambda i: (elements(cfgs[i]), i))
        kept.append((best, cfgs[best], members))
    return sorted(kept, key=lambda t: t[0])


#: operators whose sizes may shrink, and how: "free" (every non-innermost dim), "window"
#: (spatial dims of a conv / pool), "keep-axis" (free except the axis named by `axis` / `dim`)
SHRINK = {
    **{op: "free" for op in (
        "Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "HardSigmoid",
        "HardSwish", "Exp", "Log", "Sqrt", "Neg", "Swish", "Elu", "Clip", "Greater",
        "GreaterOrEqual", "Equal", "Less", "LessOrEqual", "Pow", "Mod")},
    "PRelu": "keep-channels",
    "Softmax": "keep-axis", "LogSoftmax": "keep-axis", "Concat": "keep-axis",
    "LpNormalization": "keep-axis", "Transpose": "free",
    "Conv": "window", "AveragePool": "window", "MaxPool": "window",
    "GlobalAveragePool": "channels", "Resize": "channels",
    "ConvTranspose": "transpose", "MatMul": "matmul", "Pad": "pad",
    "Requantize": "requantize",
}

#: shrink only configurations larger than this many elements
BIG = 1024


def _free_dims(op: str, cfg: dict, rank: int) -> set[int]:
    """Dimensions (0-based, of an operand of `rank`) that may shrink."""
    kind = SHRINK[op]
    dims = set(range(rank - 1))  # never the innermost
    if kind == "keep-axis":
        axis = cfg.get("axis", cfg.get("dim"))
        dims.discard(axis % rank)
    if kind == "keep-channels" and rank >= 2:
        dims.discard(1)
    return dims


def _window(n: int, k: int, s: int, p: int, d: int) -> int:
    eff = d * (k - 1) + 1
    out = (n + 2 * p - eff) // s + 1
    m = n - s * (out - min(out, 3))
    while m < 1:  # wide padding: at most 3 outputs would leave no input
        m += s
    return m


def fewer_channels(c: int) -> int:
    return 16 + c % 16 if c > 32 else c


def _matmul(cfg: dict, new: dict) -> None:
    """Batch dims above 1 become 2 (broadcasts kept), the rows M at most 4; K and N kept."""
    ops = operands(cfg)
    out = []
    for j, o in enumerate(ops):
        o = [v if i == 0 else min(v, 2) for i, v in enumerate(o[:-2])] + o[-2:]
        if j == 0 and len(o) >= 2:
            o[-2] = min(o[-2], 4)
        out.append(o)
    if cfg.get("input1_is_weight") and cfg.get("input_weight_shape"):
        new["input_shape"], new["input_weight_shape"] = out[0], out[1]
    else:
        new["input_shape"] = out


def _pad(cfg: dict, new: dict) -> None:
    """Unpadded dims at most 2; padded ones (torch order: from the last dim) at most
    max(3, largest pad + 1) (reflect needs a pad below the size); the innermost kept."""
    x = list(cfg["input_shape"])
    pads = [int(p) for p in cfg["pads"]]
    need = {len(x) - 1 - i // 2: 0 for i in range(len(pads))}
    for i, p in enumerate(pads):
        d = len(x) - 1 - i // 2
        need[d] = max(need[d], p)
    for d in range(len(x) - 1):
        x[d] = min(x[d], max(3, need[d] + 1)) if d in need else min(x[d], 2)
    new["input_shape"] = x


def shrink(op: str, cfg: dict) -> dict:
    if op not in SHRINK:
        return cfg
    kind = SHRINK[op]
    if elements(cfg) <= BIG and kind not in ("window", "transpose", "matmul"):
        return cfg
    new = dict(cfg)
    if kind in ("window", "channels", "transpose"):
        x = list(cfg["input_shape"])
        x[1] = fewer_channels(x[1])
        if op in ("Conv", "ConvTranspose"):
            new["in_channels"] = x[1]
            new["out_channels"] = fewer_channels(cfg["out_channels"])
            if cfg["groups"] > 1:
                new["groups"] = x[1]
        if op == "Resize" and cfg.get("conv"):
            new["in_features"] = x[1]
            new["out_features"] = fewer_channels(cfg["out_features"])
    if kind == "channels":
        new["input_shape"] = x
    elif kind == "transpose":  # any input size is valid for a transposed convolution
        new["input_shape"] = x[:2] + [min(v, 4) for v in x[2:]]
    elif kind == "matmul":
        _matmul(cfg, new)
    elif kind == "pad":
        _pad(cfg, new)
    elif kind == "window":
        sp = len(x) - 2

        def per_axis(key, default):
            v = cfg.get(key, default)
            return list(v) if isinstance(v, list) else [v] * sp

        k, s = per_axis("kernel_size", 1), per_axis("stride", 1)
        p, d = per_axis("padding", 0), per_axis("dilation", 1)
        for i in range(sp):
            x[2 + i] = _window(x[2 + i], k[i], s[i], p[i], d[i])
        new["input_shape"] = x
    elif kind == "requantize":
        x = list(cfg["input_shape"])
        new["input_shape"] = x[:2] + [min(v, 8) for v in x[2:]]
    else:
        ops = operands(cfg)
        n = max(len(o) for o in ops)
        out = []
        for o in ops:
            off = n - len(o)
            free = _free_dims(op, cfg, len(o))
            out.append([min(v, 3) if (i in free and v > 1 and i + off != n - 1) else v
                        for i, v in enumerate(o)])
        w = cfg.get("input_weight_shape")
        if w and cfg.get("input0_is_weight"):
            new["input_weight_shape"], rest = out[0], out[1:]
        elif w and cfg.get("input1_is_weight"):
            new["input_weight_shape"], rest = out[-1], out[:-1]
        else:
            rest = out
        new["input_shape"] = rest if isinstance(cfg["input_shape"][0], list) else rest[0]
    if new == cfg:
        return cfg
    assert signature(op, new) == signature(op, cfg), (op, cfg, new)
    new["shrunk_from"] = {k: v for k, v in cfg.items() if new.get(k) != v}
    return new

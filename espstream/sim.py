"""The integer interpreter of an IntGraph: ESP-DL's arithmetic on the host, bit for bit.

`Simulator(graph).run({'x': q})` runs a model the way the chip does: integer tensors in the
runtime layout (NWC / NHWC, batch 1), each activation carrying the exponent its ValueInfo gives
(real = q * 2**e), StreamingCache state kept across `run()` calls until `reset()`.
`trace()` returns every intermediate tensor, for finding the first layer where a host result
and a device result part.

Arithmetic (ESPDL.md section 4; the target comes from `graph.target`, else the model's
`espstream.target` metadata, else the `target=` argument):

1. Rounding: esp32p4 rounds ties to even; esp32s3 and the plain `c` target round ties up
   (toward +inf), both for integer right shifts and for the float paths.
2. Conv / Gemm / MatMul with a constant weight: int32 accumulation (int64 for int16) of
   q_in * q_w over the taps inside the input (padding adds nothing); the bias is added to
   the accumulator as it is stored in the file, at exponent e_in + e_w; then one rounding
   right shift by e_out - e_in - e_w (per output channel when the weight has per-channel
   exponents, as on esp32p4); then the fused activation ('Relu': max(., 0)); then saturation.
   The shift happens once, after the bias: rounding the product sum and the bias separately
   would differ on ties.
3. esp32s3 biases: ESP-PPQ quantizes them to 20 bits (its json config: bit_width 20,
   [-524288, 524287]), so the file holds values in that range; the simulator adds the
   stored bias as it is, and warns about an esp32s3 int8 bias outside 20 bits (the chip's
   behaviour there is not modelled).
4. Add / Sub: a saturating integer add of operands already at the output's exponent
   (the exporter inserts RequantizeLinear otherwise; a mismatch is refused, not guessed).
   Shapes must broadcast the ONNX way: ESP-DL itself does not check, and with mismatched
   frame counts it reads past the end of the shorter buffer.
5. Mul: saturate(round_shift(q0 * q1, e_out - e0 - e1)).
6. Elementwise nonlinearities (Swish, Sigmoid, Tanh, ...): int8 data with a `lut` attribute
   is looked up as table[q + 128]; without a table the simulator builds the same table as
   saturate(round(f(q * 2**e_in) * 2**-e_out)) in float64 (int16: computed per element).
7. AveragePool (and GlobalAveragePool): the float path of ESP-DL, in float32: sum of
   q * 2**e_in over the taps, times float32(1 / kernel_area), divided by 2**e_out, rounded
   and saturated; the divisor is always the full kernel area (count_include_pad unread).
8. RequantizeLinear: saturate(round_shift(q, e_out - e_in)); its scale / zero-point inputs
   are not read, the exponents come from the value infos (ESP-PPQ writes a float scale of
   2**(e_out - e_in) there, e.g. 2.0 for -6 -> -5).
9. Data movement (Reshape, Flatten, Transpose, Slice, Squeeze, Unsqueeze, Gather, Split, Pad,
   Concat, MaxPool, Identity): values are copied, never rescaled; an output exponent that
   differs from the input's is reported as a warning (the chip would copy the bytes all the
   same). Pad's pads are in the runtime layout ([begins..., ends...]), its constant an integer
   at the input's exponent. Softmax outputs float32 computed on the real values (ESP-DL's
   Softmax outputs float; not bit-exact to the chip's float library).
10. StreamingCache (window_size W, frame_axis a): keeps W - 1 frames, zero at start and
    after reset(), output = [kept ; chunk] and then keeps the last W - 1 frames of that
    output. Like the runtime it copies bytes flatly, which equals a concatenation on the
    frame axis only when every axis before it has size 1.
11. Slice / Transpose / Flatten / Reshape / Concat axes and Conv pads are read as the file
    writes them, i.e. already in the runtime layout (ESP-PPQ writes the time Slice of an
    NWC tensor with axes [1], its Constant initializers as INT64 [1]).

What the ESP-PPQ 1.3.12 fixtures (tests/data/esp-ppq, `test_outputs_value`) pin down. Their
test outputs are ESP-PPQ's own simulation of the int8 model, not a device capture; the
simulator reproduces all six (tutorial_tcn, stream_tcn x esp32p4, esp32s3, c) bit for bit,
and the variants below were run against them to see which details the data can tell apart:

- The bias is added to the int32 accumulator *before* the one rounding shift. Shifting the
  product sum and the bias separately and adding changes 10-12 of tutorial_tcn's 16 outputs
  and 610-653 of stream_tcn's 1024; a truncating shift (floor) changes 9-12 and 804-819.
- The rounding: esp32p4 half to even, esp32s3 and c half up. Swapping only the Conv rounding
  changes 86-133 of stream_tcn's outputs, swapping only RequantizeLinear's 494-542 (its
  shift by 1 meets a tie on every odd input). Most Conv layers meet exact ties (up to 45 per
  layer on these inputs). tutorial_tcn's 16 outputs cannot tell the roundings apart.
- LUTs are indexed by q + 128 (reading the int8 as an unsigned index changes all 16
  tutorial_tcn outputs), and ESP-PPQ's tables equal saturate(round(swish(q * 2**e_in) *
  2**-e_out)) with the table's exponent = the output's (no entry is a tie, so float32 or
  float64 and either rounding give the same table).
- Biases: the largest |bias| in any fixture is 79403 (18 bits), so esp32s3's 20-bit bias
  range is never reached; the files store biases already quantized (int32, exponent
  e_in + e_w per channel on esp32p4).
- Not pinned by the fixtures: the AveragePool float path (tutorial_tcn's output reads only
  the last 3 pooled frames, none of which touches padding, and an average over 3 taps is
  never an exact tie, so an exact-rational pool and a count-excluding-pad pool give the same
  16 outputs); 16-bit arithmetic; MaxPool, Mul, Concat, 2-D convolutions (no fixture uses
  them). Those follow ESPDL.md and are checked against hand-worked values in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np

from espstream import log
from espstream.errors import UserError
from espstream.intgraph import IntGraph, Node

#: target -> rounding mode of its integer shifts and float roundings.
ROUNDING = {"esp32p4": "half_even", "esp32s3": "half_up", "c": "half_up"}

_INT_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.int16): (-32768, 32767)}

Fn = Callable[[list], list]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _hard_sigmoid(x: np.ndarray, node: Node) -> np.ndarray:
    alpha = float(node.attrs.get("alpha", 0.2))
    beta = float(node.attrs.get("beta", 0.5))
    return np.clip(alpha * x + beta, 0.0, 1.0)


#: Elementwise functions a node may compute through a table (float64, on real values).
ELEMENTWISE: dict[str, Callable[[np.ndarray, Node], np.ndarray]] = {
    "Sigmoid": lambda x, n: _sigmoid(x),
    "Tanh": lambda x, n: np.tanh(x),
    "Swish": lambda x, n: x * _sigmoid(x),
    "Silu": lambda x, n: x * _sigmoid(x),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda x, n: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Elu": lambda x, n: np.where(x > 0, x, float(n.attrs.get("alpha", 1.0)) * np.expm1(x)),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, float(n.attrs.get("alpha", 0.01)) * x),
    "Exp": lambda x, n: np.exp(x),
    "Log": lambda x, n: np.log(x),
    "Sqrt": lambda x, n: np.sqrt(x),
    "Softplus": lambda x, n: np.logaddexp(0.0, x),
    "Gelu": lambda x, n: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
}

#: Operators the simulator runs (for error messages and documentation).
DATA_MOVEMENT = (
    "Reshape", "Flatten", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Identity", "Gather",
)  # fmt: skip


def target_rounding(target: str) -> str:
    try:
        return ROUNDING[target]
    except KeyError:
        raise UserError(
            f"unknown target '{target}': the simulator knows {', '.join(ROUNDING)}"
        ) from None


def _round_float(y: np.ndarray, rounding: str) -> np.ndarray:
    y = np.asarray(y, np.float64)
    return np.floor(y + 0.5) if rounding == "half_up" else np.rint(y)


def _saturate(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    lo, hi = _INT_RANGE[np.dtype(dtype)]
    return np.clip(v, lo, hi).astype(dtype)


class Simulator:
    """Runs an IntGraph with ESP-DL's integer semantics (see the module docstring).

    graph: the model (from `espstream.espdl.read` or `espstream.lower.lower`).
    kernels: `espstream.kernels` (Cython, default) or `espstream.kernels.reference` (NumPy);
        both give the same bits.
    target: overrides the graph's target (decides the rounding).
    check_shapes: refuse inputs whose shape differs from the graph input's (the runtime only
        takes the declared shape); False lets an offline model run on any length.
    """

    def __init__(
        self,
        graph: IntGraph,
        kernels: ModuleType | None = None,
        target: str | None = None,
        *,
        check_shapes: bool = True,
    ) -> None:
        if kernels is None:
            from espstream import kernels as fast

            kernels = fast
        self.graph = graph
        self.kernels = kernels
        self.check_shapes = check_shapes
        self.target = target or graph.target or graph.metadata.get("espstream.target")
        if self.target is None:
            raise UserError(
                f"graph '{graph.name}': its target is unknown (no filters and no "
                "espstream.target metadata); pass target='esp32p4', 'esp32s3' or 'c'"
            )
        self.rounding = target_rounding(self.target)
        self._order = graph.topological_order()
        self._inputs = {v.name: v for v in graph.inputs}
        self._caches: dict[str, np.ndarray | None] = {}
        self._warned: set[str] = set()
        self._plan = [(node, self._compile(node)) for node in self._order]
        self.reset()

    # ---- public --------------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]

    def reset(self) -> None:
        """Zero every StreamingCache (the runtime's `Model::reset()`)."""
        for key in self._caches:
            self._caches[key] = None

    def caches(self) -> dict[str, np.ndarray | None]:
        """The frames each StreamingCache keeps, by node name (copies; None: zeros, not yet run)."""
        return {k: None if v is None else v.copy() for k, v in self._caches.items()}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the model: graph outputs by name (caches advance by one chunk)."""
        values = self.trace(inputs)
        return {name: values[name] for name in self.output_names}

    def trace(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Like `run`, but returns every tensor of the call by name: graph inputs, every node
        output (in node order) and the graph outputs. Caches advance as in `run`."""
        values: dict[str, np.ndarray] = {}
        for name, vi in self._inputs.items():
            if name not in inputs:
                raise UserError(f"graph '{self.graph.name}': no value given for input '{name}'")
            values[name] = self._check_input(name, inputs[name], vi)
        extra = sorted(set(inputs) - set(self._inputs))
        if extra:
            raise UserError(
                f"graph '{self.graph.name}' has no input named {extra[0]!r} "
                f"(inputs: {', '.join(self._inputs)})"
            )
        for node, fn in self._plan:
            args = [self._value(values, node, name) for name in node.inputs]
            try:
                outs = fn(args)
            except (ValueError, IndexError) as e:
                raise UserError(f"node '{node.name}' ({node.op_type}): {e}") from None
            for name, out in zip(node.outputs, outs, strict=False):
                if name:
                    values[name] = out
        for name in self.output_names:
            if name not in values:
                raise UserError(f"graph '{self.graph.name}': no node produces output '{name}'")
        return values

    def dequantize(self, name: str, q: np.ndarray) -> np.ndarray:
        """Real values of a tensor of this graph: q * 2**exponent (float64)."""
        return np.asarray(q, np.float64) * 2.0 ** self._exp(name)

    # ---- plumbing ------------------------------------------------------------------------

    def _check_input(self, name: str, x: np.ndarray, vi) -> np.ndarray:
        x = np.asarray(x)
        if vi.dtype is not None and x.dtype != vi.dtype:
            raise UserError(f"input '{name}' must be {vi.dtype} (quantized), got {x.dtype}")
        if vi.shape is not None and all(isinstance(d, int) for d in vi.shape):
            declared = list(vi.shape)
            if x.ndim != len(declared) or (self.check_shapes and list(x.shape) != declared):
                raise UserError(
                    f"input '{name}' must have shape {list(vi.shape)} (runtime layout), "
                    f"got {list(x.shape)}"
                )
        return x

    def _value(self, values: dict, node: Node, name: str):
        if not name:
            return None
        if name in values:
            return values[name]
        if name in self.graph.initializers:
            return self.graph.initializers[name].data
        raise UserError(
            f"node '{node.name}' ({node.op_type}) reads '{name}', which nothing produces"
        )

    def _exp(self, name: str) -> int:
        try:
            exps = self.graph.exponents(name)
        except KeyError:
            raise UserError(
                f"tensor '{name}' has no value info (its exponent is unknown)"
            ) from None
        if len(exps) != 1:
            raise UserError(f"activation '{name}' has {len(exps)} exponents; expected one")
        return int(exps[0])

    def _dtype(self, name: str, default: np.dtype) -> np.dtype:
        try:
            dt = self.graph.value_info(name).dtype
        except KeyError:
            return np.dtype(default)
        return np.dtype(default) if dt is None else np.dtype(dt)

    def _warn_once(self, node: Node, msg: str) -> None:
        if node.name not in self._warned:
            self._warned.add(node.name)
            log.warn(f"node '{node.name}' ({node.op_type}): {msg}")

    def _init(self, node: Node, index: int, what: str) -> np.ndarray:
        """A constant input of a node (an initializer), by position."""
        if index >= len(node.inputs) or not node.inputs[index]:
            raise UserError(f"node '{node.name}' ({node.op_type}) has no {what} input")
        name = node.inputs[index]
        if name not in self.graph.initializers:
            raise UserError(
                f"node '{node.name}' ({node.op_type}): its {what} '{name}' must be a constant "
                "initializer"
            )
        return self.graph.initializers[name].data

    def _compile(self, node: Node) -> Fn:
        op = node.op_type
        if op in ("Conv",):
            return self._conv(node)
        if op in ("Gemm", "MatMul"):
            return self._gemm(node)
        if op in ("Add", "Sub"):
            return self._add(node)
        if op == "Mul":
            return self._mul(node)
        if op in ("AveragePool", "GlobalAveragePool"):
            return self._avgpool(node)
        if op in ("MaxPool", "GlobalMaxPool"):
            return self._maxpool(node)
        if op == "Relu":
            return self._relu(node)
        if op == "RequantizeLinear":
            return self._requantize(node)
        if op == "QuantizeLinear":
            return self._quantize(node)
        if op == "DequantizeLinear":
            return self._dequantize(node)
        if op == "StreamingCache":
            return self._streaming_cache(node)
        if op == "Concat":
            return self._concat(node)
        if op == "Split":
            return self._split(node)
        if op == "Pad":
            return self._pad(node)
        if op == "Softmax":
            return self._softmax(node)
        if op == "Clip" and "lut" not in node.attrs:
            return self._clip(node)
        if op in DATA_MOVEMENT:
            return self._movement(node)
        if op in ELEMENTWISE or "lut" in node.attrs:
            return self._elementwise(node)
        raise UserError(
            f"node '{node.name}': operator '{op}' is not supported by the simulator "
            f"(supported: {', '.join(sorted(SUPPORTED))})"
        )

    # ---- operators -----------------------------------------------------------------------

    def _activation(self, node: Node) -> bool:
        act = node.attrs.get("activation", "Linear")
        if isinstance(act, bytes):
            act = act.decode()
        if act not in ("Linear", "Relu"):
            raise UserError(
                f"node '{node.name}' ({node.op_type}): fused activation '{act}' is not "
                "supported (Linear, Relu)"
            )
        return act == "Relu"

    def _shift_and_bias(
        self, node: Node, w_name: str, n_out: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-channel right shift e_out - e_in - e_w and the bias (checked at e_in + e_w)."""
        e_in = self._exp(node.inputs[0])
        e_out = self._exp(node.outputs[0])
        w_exp = np.asarray(self.graph.initializers[w_name].exponents, np.int64)
        if w_exp.size not in (1, n_out):
            raise UserError(
                f"node '{node.name}': weight '{w_name}' has {w_exp.size} exponents for "
                f"{n_out} output channels"
            )
        w_exp = np.broadcast_to(w_exp, (n_out,))
        shift = (e_out - e_in - w_exp).astype(np.int64)
        bias = None
        if len(node.inputs) > 2 and node.inputs[2]:
            b_name = node.inputs[2]
            bias = self._init(node, 2, "bias").reshape(-1)
            if bias.size != n_out:
                raise UserError(
                    f"node '{node.name}': bias '{b_name}' has {bias.size} values for "
                    f"{n_out} output channels"
                )
            b_exp = np.asarray(self.graph.initializers[b_name].exponents, np.int64)
            if b_exp.size not in (1, n_out):
                raise UserError(
                    f"node '{node.name}': bias '{b_name}' has {b_exp.size} exponents for "
                    f"{n_out} output channels"
                )
            b_exp = np.broadcast_to(b_exp, (n_out,))
            if (
                self.target == "esp32s3"
                and bias.dtype == np.int32
                and (bias.min() < -(2**19) or bias.max() >= 2**19)
            ):
                self._warn_once(node, f"bias '{b_name}' exceeds the 20 bits of esp32s3's bias")
            want = e_in + w_exp
            if not np.array_equal(b_exp, want):
                k = int(np.flatnonzero(b_exp != want)[0])
                raise UserError(
                    f"node '{node.name}': bias '{b_name}' channel {k} has exponent "
                    f"{int(b_exp[k])}, but ESP-DL adds it at e_in + e_w = {int(want[k])}"
                )
        return shift, bias

    def _conv(self, node: Node) -> Fn:
        w = self._init(node, 1, "weight")
        group = int(node.attrs.get("group", 1))
        nd = w.ndim - 2  # [W, C, N] (1-D) or [H, W, C, N] (2-D)
        if nd not in (1, 2):
            raise UserError(
                f"node '{node.name}': Conv weight of shape {list(w.shape)} is not 1-D or 2-D"
            )
        if group > 1 and w.shape[-1] == 1 and w.shape[-2] % group == 0:
            # depthwise [.., N, 1] -> [N, .., 1]
            kw = np.moveaxis(w, -2, 0)
        else:
            # [.., C/g, N] -> [N, .., C/g]
            kw = np.moveaxis(w, -1, 0)
        kw = np.ascontiguousarray(kw)
        n_out = kw.shape[0]
        shift, bias = self._shift_and_bias(node, node.inputs[1], n_out)
        relu = self._activation(node)
        stride = _ints(node.attrs.get("strides", [1] * nd))
        dilation = _ints(node.attrs.get("dilations", [1] * nd))
        pads = _ints(node.attrs.get("pads", [0] * (2 * nd)))
        if len(stride) != nd or len(dilation) != nd or len(pads) != 2 * nd:
            raise UserError(
                f"node '{node.name}': strides {stride}, dilations {dilation}, pads {pads} do "
                f"not fit a {nd}-D Conv"
            )
        _check_window(node, w.shape[:nd], stride, dilation, pads)
        if bias is not None:
            bias = bias.astype(np.int64)
        k = self.kernels
        rounding = self.rounding
        prepare = getattr(k, "conv_prepared", None)
        if prepare is not None:  # checks the arguments once, not on every call
            run = prepare(kw, bias, stride=stride, dilation=dilation, pads=pads, groups=group,
                          shift=shift, rounding=rounding, relu=relu)
            return lambda args: [run(args[0])]

        def fn(args: list) -> list:
            x = args[0]
            return [
                k.conv(x, kw, bias, stride=stride, dilation=dilation, pads=pads, groups=group,
                       shift=shift, rounding=rounding, relu=relu)
            ]  # fmt: skip

        return fn

    def _gemm(self, node: Node) -> Fn:
        if node.op_type == "Gemm":
            for a, default in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0)):
                if float(node.attrs.get(a, default)) != default:
                    raise UserError(
                        f"node '{node.name}' (Gemm): {a}={node.attrs[a]} is not supported "
                        f"(ESP-DL's Gemm has {a}={default})"
                    )
        relu = self._activation(node)
        w_name = node.inputs[1] if len(node.inputs) > 1 else ""
        if w_name in self.graph.initializers:
            w = self.graph.initializers[w_name].data
            if w.ndim < 2 or int(np.prod(w.shape[:-2])) != 1:
                raise UserError(
                    f"node '{node.name}': constant weight of shape {list(w.shape)} must be "
                    "[.., C, N] with leading 1s"
                )
            w2 = w.reshape(w.shape[-2], w.shape[-1])  # [C, N]
            kw = np.ascontiguousarray(w2.T[:, None, :])  # [N, kW=1, C]
            shift, bias = self._shift_and_bias(node, w_name, w2.shape[1])
            if bias is not None:
                bias = bias.astype(np.int64)
            k, rounding = self.kernels, self.rounding
            prepare = getattr(k, "conv_prepared", None)
            if prepare is not None:  # checks the arguments once, not on every call
                conv = prepare(kw, bias, shift=shift, rounding=rounding, relu=relu)
            else:
                def conv(rows: np.ndarray) -> np.ndarray:
                    return k.conv(rows, kw, bias, shift=shift, rounding=rounding, relu=relu)

            def fn(args: list) -> list:
                x = args[0]
                if x.shape[-1] != kw.shape[2]:
                    raise ValueError(
                        f"input of shape {list(x.shape)} does not fit weight [C={kw.shape[2]}, N]"
                    )
                lead = x.shape[:-1]
                rows = x.reshape(-1, x.shape[-1])  # [M, C] read as NWC with W = M
                y = conv(rows)
                return [y.reshape(*lead, kw.shape[0])]

            return fn
        if node.op_type != "MatMul":
            raise UserError(f"node '{node.name}' (Gemm): its weight must be a constant initializer")
        # MatMul of two activations: exact int64 products, one rounding shift.
        e_out = self._exp(node.outputs[0])
        shift = e_out - self._exp(node.inputs[0]) - self._exp(node.inputs[1])
        dtype = self._dtype(node.outputs[0], np.int8)
        rounding = self.rounding

        def fn2(args: list) -> list:
            from espstream.kernels.reference import round_shift

            acc = np.matmul(args[0].astype(np.int64), args[1].astype(np.int64))
            v = round_shift(acc, shift, rounding)
            if relu:
                v = np.maximum(v, 0)
            return [_saturate(v, dtype)]

        return fn2

    def _add(self, node: Node) -> Fn:
        e_out = self._exp(node.outputs[0])
        for name in node.inputs[:2]:
            e = self._exp(name) if name not in self.graph.initializers else self._init_exp(name)
            if e != e_out:
                raise UserError(
                    f"node '{node.name}' ({node.op_type}): input '{name}' has exponent {e} but "
                    f"the output has {e_out}; ESP-DL adds integers at one exponent (the "
                    "exporter must insert a RequantizeLinear)"
                )
        sub = node.op_type == "Sub"
        k = self.kernels

        def fn(args: list) -> list:
            a, b = args[0], args[1]
            _check_broadcast(a.shape, b.shape)
            if sub:
                return [_saturate(a.astype(np.int64) - b.astype(np.int64), a.dtype)]
            return [k.add(a, b)]

        return fn

    def _init_exp(self, name: str) -> int:
        exps = self.graph.initializers[name].exponents
        if len(exps) != 1:
            raise UserError(f"constant '{name}' has {len(exps)} exponents; expected one")
        return int(exps[0])

    def _mul(self, node: Node) -> Fn:
        exps = [
            self._init_exp(n) if n in self.graph.initializers else self._exp(n)
            for n in node.inputs[:2]
        ]
        shift = self._exp(node.outputs[0]) - exps[0] - exps[1]
        dtype = self._dtype(node.outputs[0], np.int8)
        k, rounding = self.kernels, self.rounding

        def fn(args: list) -> list:
            _check_broadcast(args[0].shape, args[1].shape)
            return [k.mul(args[0], args[1], shift, rounding=rounding, dtype=dtype)]

        return fn

    def _pool_params(self, node: Node):
        kernel = _ints(node.attrs.get("kernel_shape", []))
        nd = len(kernel)
        if nd not in (1, 2):
            raise UserError(
                f"node '{node.name}' ({node.op_type}): kernel_shape {kernel} is not 1-D or 2-D"
            )
        if int(node.attrs.get("ceil_mode", 0)):
            raise UserError(f"node '{node.name}' ({node.op_type}): ceil_mode=1 is not supported")
        stride = _ints(node.attrs.get("strides", [1] * nd))
        dilation = _ints(node.attrs.get("dilations", [1] * nd))
        pads = _ints(node.attrs.get("pads", [0] * (2 * nd)))
        if len(stride) != nd or len(dilation) != nd or len(pads) != 2 * nd:
            raise UserError(
                f"node '{node.name}' ({node.op_type}): strides {stride}, dilations {dilation}, "
                f"pads {pads} do not fit a {nd}-D kernel"
            )
        _check_window(node, kernel, stride, dilation, pads)
        return kernel, stride, dilation, pads

    def _avgpool(self, node: Node) -> Fn:
        e_in, e_out = self._exp(node.inputs[0]), self._exp(node.outputs[0])
        k, rounding = self.kernels, self.rounding
        if node.op_type == "GlobalAveragePool":

            def gfn(args: list) -> list:
                x = args[0]
                kernel = list(x.shape[1:-1])  # [1, W, C] or [1, H, W, C]
                y = k.avgpool(x, kernel, e_in=e_in, e_out=e_out, rounding=rounding)
                return [y]

            return gfn
        kernel, stride, dilation, pads = self._pool_params(node)

        def fn(args: list) -> list:
            return [
                k.avgpool(args[0], kernel, stride=stride, dilation=dilation, pads=pads,
                          e_in=e_in, e_out=e_out, rounding=rounding)
            ]  # fmt: skip

        return fn

    def _maxpool(self, node: Node) -> Fn:
        self._same_exponent(node)
        k = self.kernels
        if node.op_type == "GlobalMaxPool":
            return lambda args: [k.maxpool(args[0], list(args[0].shape[1:-1]))]
        kernel, stride, dilation, pads = self._pool_params(node)
        return lambda args: [
            k.maxpool(args[0], kernel, stride=stride, dilation=dilation, pads=pads)
        ]

    def _relu(self, node: Node) -> Fn:
        shift = self._exp(node.outputs[0]) - self._exp(node.inputs[0])
        k, rounding = self.kernels, self.rounding

        def fn(args: list) -> list:
            y = np.maximum(args[0], 0).astype(args[0].dtype)
            return [y if shift == 0 else k.requantize(y, shift, rounding=rounding)]

        return fn

    def _requantize(self, node: Node) -> Fn:
        shift = self._exp(node.outputs[0]) - self._exp(node.inputs[0])
        if len(node.inputs) > 2 and node.inputs[2] in self.graph.initializers:
            zp = self.graph.initializers[node.inputs[2]].data
            if np.any(zp != 0):
                raise UserError(f"node '{node.name}' (RequantizeLinear): non-zero zero point")
        k, rounding = self.kernels, self.rounding
        dtype = self._dtype(node.outputs[0], np.int8)
        return lambda args: [k.requantize(args[0], shift, rounding=rounding, dtype=dtype)]

    def _quantize(self, node: Node) -> Fn:
        e_out = self._exp(node.outputs[0])
        dtype = self._dtype(node.outputs[0], np.int8)
        rounding = self.rounding

        def fn(args: list) -> list:
            y = np.asarray(args[0], np.float32) / np.float32(2.0**e_out)
            return [_saturate(_round_float(y, rounding), dtype)]

        return fn

    def _dequantize(self, node: Node) -> Fn:
        e_in = self._exp(node.inputs[0])
        return lambda args: [(args[0].astype(np.float32) * np.float32(2.0**e_in))]

    def _streaming_cache(self, node: Node) -> Fn:
        window = int(node.attrs.get("window_size", 1))
        axis = int(node.attrs.get("frame_axis", 1))
        if window < 1:
            raise UserError(f"node '{node.name}' (StreamingCache): window_size {window} < 1")
        self._same_exponent(node)
        key, caches = node.name, self._caches
        caches[key] = None  # None: all zeros, allocated on the first call (as the runtime does)

        def fn(args: list) -> list:
            x = args[0]
            if not -x.ndim <= axis < x.ndim:
                raise ValueError(f"frame_axis {axis} is outside a rank-{x.ndim} input")
            ax = axis % x.ndim
            out_shape = list(x.shape)
            out_shape[ax] += window - 1
            kept_shape = list(x.shape)
            kept_shape[ax] = window - 1
            kept = caches[key]
            if kept is None:
                kept = np.zeros(kept_shape, x.dtype)
            elif list(kept.shape) != kept_shape or kept.dtype != x.dtype:
                raise ValueError(
                    f"the chunk changed from {kept.dtype} frames of shape {list(kept.shape)} to "
                    f"{x.dtype} {list(x.shape)} between calls; reset() first"
                )
            # Byte-flat, as the runtime: [kept ; chunk], then keep the tail of that output.
            flat = np.concatenate([kept.reshape(-1), x.reshape(-1)])
            caches[key] = flat[x.size :].reshape(kept_shape).copy()
            return [flat.reshape(out_shape)]

        return fn

    def _split(self, node: Node) -> Fn:
        axis = int(node.attrs.get("axis", 0))
        self._same_exponent(node)
        sizes = None
        if len(node.inputs) > 1 and node.inputs[1]:
            sizes = [int(v) for v in self._init(node, 1, "split").reshape(-1)]
        elif "split" in node.attrs:
            sizes = _ints(node.attrs["split"])
        n_out = len(node.outputs)

        def fn(args: list) -> list:
            x = args[0]
            dim = x.shape[axis]
            parts = sizes
            if parts is None:
                if dim % n_out:
                    raise ValueError(f"{dim} does not split into {n_out} equal parts")
                parts = [dim // n_out] * n_out
            if sum(parts) != dim or len(parts) != n_out:
                raise ValueError(f"split {parts} does not fit {n_out} outputs of axis size {dim}")
            return [np.ascontiguousarray(p) for p in np.split(x, np.cumsum(parts)[:-1], axis=axis)]

        return fn

    def _pad(self, node: Node) -> Fn:
        """Pad in the runtime layout: pads [begin per axis..., end per axis...]; constant mode
        fills with the constant input (an integer at the input's exponent) or 0."""
        self._same_exponent(node)
        pads = [int(v) for v in self._init(node, 1, "pads").reshape(-1)]
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("constant", "reflect", "edge"):
            raise UserError(f"node '{node.name}' (Pad): mode '{mode}' is not supported")
        value = 0
        if len(node.inputs) > 2 and node.inputs[2]:
            value = int(self._init(node, 2, "constant value").reshape(-1)[0])
        if min(pads) < 0:
            raise UserError(f"node '{node.name}' (Pad): negative pads {pads} are not supported")

        def fn(args: list) -> list:
            x = args[0]
            if len(pads) != 2 * x.ndim:
                raise ValueError(f"{len(pads)} pads for a rank-{x.ndim} input")
            width = list(zip(pads[: x.ndim], pads[x.ndim :], strict=True))
            if mode == "constant":
                return [np.pad(x, width, constant_values=value)]
            return [np.pad(x, width, mode=mode)]

        return fn

    def _softmax(self, node: Node) -> Fn:
        """Softmax on the real values in float32; ESP-DL's Softmax outputs float, which is not
        bit-exact to the chip's float library (the integer parts of a model are)."""
        e_in = self._exp(node.inputs[0])
        axis = int(node.attrs.get("axis", -1))

        def fn(args: list) -> list:
            x = args[0].astype(np.float32) * np.float32(2.0**e_in)
            z = np.exp(x - x.max(axis=axis, keepdims=True))
            return [(z / z.sum(axis=axis, keepdims=True)).astype(np.float32)]

        return fn

    def _clip(self, node: Node) -> Fn:
        """A Clip without a table (16 bits): min / max inputs are integers at the input's
        exponent; the output takes the input's exponent."""
        shift = self._exp(node.outputs[0]) - self._exp(node.inputs[0])
        lo = (
            self._init(node, 1, "min").reshape(-1)[0]
            if len(node.inputs) > 1 and node.inputs[1]
            else None
        )
        hi = (
            self._init(node, 2, "max").reshape(-1)[0]
            if len(node.inputs) > 2 and node.inputs[2]
            else None
        )
        k, rounding = self.kernels, self.rounding

        def fn(args: list) -> list:
            y = np.clip(args[0], lo, hi).astype(args[0].dtype)
            return [y if shift == 0 else k.requantize(y, shift, rounding=rounding)]

        return fn

    def _concat(self, node: Node) -> Fn:
        axis = int(node.attrs.get("axis", 0))
        self._same_exponent(node, all_inputs=True)

        def fn(args: list) -> list:
            return [np.concatenate([a for a in args if a is not None], axis=axis)]

        return fn

    def _movement(self, node: Node) -> Fn:
        self._same_exponent(node)
        op = node.op_type
        if op == "Identity":
            return lambda args: [args[0].copy()]
        if op == "Transpose":
            perm = node.attrs.get("perm")
            return lambda args: [
                np.ascontiguousarray(np.transpose(args[0], None if perm is None else _ints(perm)))
            ]
        if op == "Flatten":
            axis = int(node.attrs.get("axis", 1))

            def flatten(args: list) -> list:
                x = args[0]
                a = axis % x.ndim if x.ndim else 0
                return [x.reshape(int(np.prod(x.shape[:a])), int(np.prod(x.shape[a:])))]

            return flatten
        if op == "Reshape":
            shape = [int(v) for v in self._init(node, 1, "shape").reshape(-1)]
            if int(node.attrs.get("allowzero", 0)):
                return lambda args: [args[0].reshape(shape)]
            return lambda args: [args[0].reshape(_onnx_reshape(args[0].shape, shape))]
        if op == "Gather":
            idx = self._init(node, 1, "indices").astype(np.int64)
            g_axis = int(node.attrs.get("axis", 0))

            def gather(args: list) -> list:
                x = args[0]
                i = np.where(idx < 0, idx + x.shape[g_axis], idx)
                return [np.ascontiguousarray(np.take(x, i, axis=g_axis))]

            return gather
        if op in ("Squeeze", "Unsqueeze"):
            if len(node.inputs) > 1 and node.inputs[1]:
                axes = [int(v) for v in self._init(node, 1, "axes").reshape(-1)]
            else:
                axes = _ints(node.attrs.get("axes", [])) or None
            if op == "Squeeze":
                return lambda args: [
                    np.squeeze(args[0], axis=None if axes is None else tuple(axes))
                ]
            if axes is None:
                raise UserError(f"node '{node.name}' (Unsqueeze) has no axes")
            return lambda args: [np.expand_dims(args[0], tuple(axes))]
        if op == "Slice":
            return self._slice(node)
        raise AssertionError(op)

    def _slice(self, node: Node) -> Fn:
        starts = [int(v) for v in self._init(node, 1, "starts").reshape(-1)]
        ends = [int(v) for v in self._init(node, 2, "ends").reshape(-1)]
        axes = (
            [int(v) for v in self._init(node, 3, "axes").reshape(-1)]
            if len(node.inputs) > 3 and node.inputs[3]
            else list(range(len(starts)))
        )
        steps = (
            [int(v) for v in self._init(node, 4, "steps").reshape(-1)]
            if len(node.inputs) > 4 and node.inputs[4]
            else [1] * len(starts)
        )
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise UserError(f"node '{node.name}' (Slice): starts/ends/axes/steps lengths differ")
        if 0 in steps:
            raise UserError(f"node '{node.name}' (Slice): a step of 0")

        def fn(args: list) -> list:
            x = args[0]
            index = [slice(None)] * x.ndim
            for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
                if not -x.ndim <= a < x.ndim:
                    raise ValueError(f"axis {a} is outside a rank-{x.ndim} input")
                dim = x.shape[a]
                index[a] = slice(*_onnx_slice_bounds(s, e, st, dim))
            return [np.ascontiguousarray(x[tuple(index)])]

        return fn

    def _elementwise(self, node: Node) -> Fn:
        e_in, e_out = self._exp(node.inputs[0]), self._exp(node.outputs[0])
        lut_name = node.attrs.get("lut")
        if isinstance(lut_name, bytes):
            lut_name = lut_name.decode()
        if lut_name:
            if lut_name not in self.graph.initializers:
                raise UserError(f"node '{node.name}': lookup table '{lut_name}' is not in the file")
            table = self.graph.initializers[lut_name].data.reshape(-1)
            if table.size != 256 or table.dtype != np.int8:
                raise UserError(
                    f"node '{node.name}': lookup table '{lut_name}' must be 256 int8 values, "
                    f"got {table.size} {table.dtype}"
                )

            def lut(args: list) -> list:
                x = args[0]
                if x.dtype != np.int8:
                    raise ValueError(f"a 256-entry table needs int8 input, got {x.dtype}")
                return [table[x.astype(np.int16) + 128]]

            return lut
        if node.op_type not in ELEMENTWISE:
            raise UserError(f"node '{node.name}': operator '{node.op_type}' is not supported")
        f = ELEMENTWISE[node.op_type]
        dtype = self._dtype(node.outputs[0], np.int8)
        rounding = self.rounding

        def compute(q: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):
                y = f(q.astype(np.float64) * 2.0**e_in, node) * 2.0**-e_out
            y = np.nan_to_num(y, posinf=1e9, neginf=-1e9)
            return _saturate(_round_float(y, rounding), dtype)

        table8 = compute(np.arange(-128, 128)) if dtype == np.int8 else None

        def fn(args: list) -> list:
            x = args[0]
            if x.dtype == np.int8 and table8 is not None:
                return [table8[x.astype(np.int16) + 128]]
            return [compute(x)]

        return fn

    def _same_exponent(self, node: Node, all_inputs: bool = False) -> None:
        """Data movement copies values: warn when the file says the exponent changes."""
        try:
            e_out = self._exp(node.outputs[0])
            names = node.inputs if all_inputs else node.inputs[:1]
            for name in names:
                if name and name not in self.graph.initializers and self._exp(name) != e_out:
                    self._warn_once(
                        node,
                        f"input '{name}' has exponent {self._exp(name)} but the output has "
                        f"{e_out}; the runtime copies the values unchanged",
                    )
        except UserError:
            pass  # an exponent missing on a data-movement op does not matter to the values


def run_chunks(
    sim: Simulator, inputs: dict[str, np.ndarray], axis: int = 1
) -> list[dict[str, np.ndarray]]:
    """Feed whole sequences to a streaming model one chunk per call, from its current state.

    Each input is cut on `axis` into chunks of the size its graph input declares there; the
    sequences must be a whole number of chunks, all inputs the same number. Returns the
    outputs of every call, in order.
    """
    counts = set()
    sizes = {}
    for vi in sim.graph.inputs:
        if vi.name not in inputs:
            raise UserError(f"no value given for input '{vi.name}'")
        x = np.asarray(inputs[vi.name])
        if vi.shape is None or not isinstance(vi.shape[axis], int) or vi.shape[axis] < 1:
            raise UserError(f"input '{vi.name}' declares no chunk size on axis {axis}")
        c = int(vi.shape[axis])
        if x.ndim <= axis or x.shape[axis] % c:
            raise UserError(
                f"input '{vi.name}': {list(x.shape)} is not a whole number of chunks of "
                f"{c} frames on axis {axis}"
            )
        sizes[vi.name] = c
        counts.add(x.shape[axis] // c)
    if len(counts) != 1:
        raise UserError("the inputs hold different numbers of chunks")
    out = []
    for k in range(counts.pop()):
        feed = {
            n: np.take(np.asarray(inputs[n]), range(k * c, (k + 1) * c), axis=axis)
            for n, c in sizes.items()
        }
        out.append(sim.run(feed))
    return out


SUPPORTED = (
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "AveragePool", "GlobalAveragePool",
    "MaxPool", "GlobalMaxPool", "Relu", "RequantizeLinear", "QuantizeLinear",
    "DequantizeLinear", "StreamingCache", "Concat", "Split", "Pad", "Softmax", "Clip",
    *DATA_MOVEMENT, *ELEMENTWISE,
)  # fmt: skip


#: Bound on a window's pads, stride and span: far beyond any model ESP-DL runs, and small
#: enough that a corrupt file cannot make a kernel allocate an absurd output.
MAX_WINDOW = 1 << 16


def _check_window(node: Node, kernel, stride, dilation, pads) -> None:
    """Refuse window parameters no real model has (a corrupt file's, usually)."""
    span = [int(d) * (int(k) - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    ok = (all(1 <= int(v) <= MAX_WINDOW for v in (*stride, *dilation, *kernel))
          and all(0 <= int(p) <= MAX_WINDOW for p in pads)
          and all(sp <= MAX_WINDOW for sp in span))
    if not ok:
        raise UserError(
            f"node '{node.name}' ({node.op_type}): kernel {list(kernel)}, strides {stride}, "
            f"dilations {dilation}, pads {pads} are out of range (corrupt file?)"
        )


def _ints(v) -> list[int]:
    if isinstance(v, (int, np.integer)):
        return [int(v)]
    return [int(x) for x in v]


def _check_broadcast(a: Sequence[int], b: Sequence[int]) -> None:
    """ONNX multidirectional broadcasting; ESP-DL's runtime does not check it (it takes the
    larger size per axis and reads past the shorter buffer), so a mismatch is refused here."""
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y and 1 not in (x, y):
            raise ValueError(
                f"input shapes {list(a)} and {list(b)} do not broadcast; ESP-DL does not check "
                "this and would read past the end of the smaller input"
            )


def _onnx_reshape(shape: tuple[int, ...], target: list[int]) -> list[int]:
    out = [shape[i] if v == 0 and i < len(shape) else v for i, v in enumerate(target)]
    if out.count(-1) > 1:
        raise ValueError(f"reshape target {target} has more than one -1")
    if -1 in out:
        known = int(np.prod([v for v in out if v != -1]))
        total = int(np.prod(shape))
        if known == 0 or total % known:
            raise ValueError(f"cannot reshape {list(shape)} to {target}")
        out[out.index(-1)] = total // known
    if int(np.prod(out)) != int(np.prod(shape)):
        raise ValueError(f"cannot reshape {list(shape)} to {target}")
    return out


def _onnx_slice_bounds(start: int, end: int, step: int, dim: int) -> tuple[int, int | None, int]:
    """ONNX Slice clamping of one axis, as a Python slice (start, stop, step)."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start = min(max(start, 0), dim)
        end = min(max(end, 0), dim)
        return start, end, step
    start = min(max(start, -1), dim - 1)
    end = min(max(end, -1), dim - 1)
    return start, (None if end < 0 else end), step

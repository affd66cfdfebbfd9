"""The integer interpreter of an IntGraph: ESP-DL's arithmetic on the host, bit for bit.

`Simulator(graph).run({'x': q})` runs a model the way the chip does: integer tensors in the
runtime layout (NWC / NHWC, batch 1), each activation carrying the exponent its ValueInfo gives
(real = q * 2**e), StreamingCache state kept across `run()` calls until `reset()`.
`trace()` returns every intermediate tensor, for finding the first layer where a host result
and a device result part. Each ESP-DL operator's arithmetic lives in its module of
`espstream.ops` (found through the registry); this module is the interpreter around them.

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
6. Elementwise nonlinearities (Swish, Sigmoid, Tanh, ...): an 8-bit node with a `lut`
   attribute is looked up as table[q + 128]; without a table the simulator builds the same
   table as saturate(round(f(q * 2**e_in) * 2**-e_out)) in float64. A 16-bit node is computed
   per element that way whatever `lut` it carries: ESP-DL's deserializers read the table only at
   8 bits (LUT and Gelu nodes excepted: their int16 tables are read nearest neighbour).
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
11. Slice / Transpose / Flatten / Reshape / Concat axes are read as the file writes them,
    i.e. already in the runtime layout; 2-D Conv / pool pads are in ONNX order [top, left,
    bottom, right] in the file, and ESP-DL's deserializers (dl_module_conv.hpp,
    dl_module_max_pool.hpp, dl_module_average_pool.hpp) reorder them to [top, bottom, left,
    right], as `kernel_pads` does (ESP-PPQ writes the time Slice of an
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


def target_rounding(target: str) -> str:
    """Rounding of any ESP-DL target name (espstream.targets maps it onto an arithmetic)."""
    from espstream.targets import arithmetic

    return ROUNDING[arithmetic(target)]


def round_float(y: np.ndarray, rounding: str) -> np.ndarray:
    y = np.asarray(y, np.float64)
    return np.floor(y + 0.5) if rounding == "half_up" else np.rint(y)


def saturate(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    lo, hi = _INT_RANGE[np.dtype(dtype)]
    return np.clip(v, lo, hi).astype(dtype)


class Simulator:
    """Runs an IntGraph with ESP-DL's integer semantics (see the module docstring).

    graph: the model (from `espstream.espdl.read` or `espstream.lower.lower`).
    kernels: `espstream.kernels` (Cython, default) or `espstream.kernels.reference` (NumPy);
        both give the same bits.
    target: overrides the graph's target (decides the rounding): any ESP-DL target name
        (`espstream.targets`: esp32p4 / esp32s31, esp32s3, esp32 / esp32s2 / esp32c*, or 'c').
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
        if self.target is None:  # the file leaves it open: one clear error naming the choices
            from espstream.targets import resolve

            self.target = resolve(graph, None, f"graph '{graph.name}'").target
        from espstream.targets import arithmetic

        self.arithmetic = arithmetic(self.target)  # 'esp32p4', 'esp32s3' or 'c'
        self.rounding = target_rounding(self.target)
        self._order = graph.topological_order()
        self._inputs = {v.name: v for v in graph.inputs}
        self.cache_state: dict[str, np.ndarray | None] = {}
        self._warned: set[str] = set()
        self._plan = [(node, self._compile(node)) for node in self._order]
        self._prepare_run()
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
        for key in self.cache_state:
            self.cache_state[key] = None

    def caches(self) -> dict[str, np.ndarray | None]:
        """The frames each StreamingCache keeps, by node name (copies; None: zeros, not yet run)."""
        return {k: None if v is None else v.copy() for k, v in self.cache_state.items()}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the model: graph outputs by name (caches advance by one chunk)."""
        if self._lean is None:  # a graph `trace` reports an error for: its message
            values = self.trace(inputs)
            return {name: values[name] for name in self.output_names}
        return self._run_lean(inputs)

    def _prepare_run(self) -> None:
        """What `run` needs per node, found once per model: the input names each node reads
        (an initializer's data bound in advance) and the output names it writes. `trace` does
        the same work name by name with every check; `run` takes this path only when every
        read is satisfied by an earlier node, a graph input or an initializer and every graph
        output is produced, so the two return the same values (tests/test_sim.py)."""
        known = set(self._inputs)
        for node in self._order:
            if any(n and n not in known and n not in self.graph.initializers
                   for n in node.inputs):
                self._lean = None
                return
            known.update(n for n in node.outputs if n)
        if any(n not in known for n in self.output_names):
            self._lean = None
            return
        base: dict[str, np.ndarray | None] = {"": None}
        for node in self._order:
            for n in node.inputs:
                if n and n in self.graph.initializers:
                    base[n] = self.graph.initializers[n].data
        steps = []
        for node, fn in self._plan:
            outs = tuple(node.outputs)
            # one named output (most nodes): stored without the zip loop
            single = outs[0] if len(outs) == 1 and outs[0] else None
            steps.append((node, fn, tuple(node.inputs), outs, single))
        checks = []  # (name, dtype, declared shape or None) per input, for a quick check
        for name, vi in self._inputs.items():
            fixed = vi.shape is not None and all(isinstance(d, int) for d in vi.shape)
            checks.append((name, vi.dtype, tuple(vi.shape) if fixed else None, vi))
        self._lean = (base, steps, tuple(self.output_names), checks)

    def _run_lean(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        base, steps, outputs, checks = self._lean
        values = dict(base)
        strict = self.check_shapes
        for name, dtype, shape, vi in checks:
            if name not in inputs:
                raise UserError(f"graph '{self.graph.name}': no value given for input '{name}'")
            x = inputs[name]
            if type(x) is not np.ndarray or (dtype is not None and x.dtype != dtype) or (
                    shape is not None and (x.ndim != len(shape) or (strict and x.shape != shape))):
                x = self._check_input(name, x, vi)  # converts, or raises its error
            values[name] = x
        if len(inputs) != len(self._inputs):
            extra = sorted(set(inputs) - set(self._inputs))
            raise UserError(
                f"graph '{self.graph.name}' has no input named {extra[0]!r} "
                f"(inputs: {', '.join(self._inputs)})"
            )
        get = values.__getitem__
        for node, fn, ins, outs, single in steps:
            try:
                args = list(map(get, ins))
            except KeyError:  # an earlier node gave fewer outputs than it names
                args = [self._value(values, node, n) for n in ins]  # raises trace's error
            try:
                res = fn(args)
            except (ValueError, IndexError) as e:
                raise UserError(f"node '{node.name}' ({node.op_type}): {e}") from None
            if single is not None and res:
                values[single] = res[0]
                continue
            for name, out in zip(outs, res, strict=False):
                if name:
                    values[name] = out
        try:
            return {name: values[name] for name in outputs}
        except KeyError as e:
            raise UserError(
                f"graph '{self.graph.name}': no node produces output '{e.args[0]}'"
            ) from None

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
        return np.asarray(q, np.float64) * 2.0 ** self.exp(name)

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

    def exp(self, name: str) -> int:
        try:
            exps = self.graph.exponents(name)
        except KeyError:
            raise UserError(
                f"tensor '{name}' has no value info (its exponent is unknown)"
            ) from None
        if len(exps) != 1:
            raise UserError(f"activation '{name}' has {len(exps)} exponents; expected one")
        return int(exps[0])

    def dtype_of(self, name: str, default: np.dtype) -> np.dtype:
        try:
            dt = self.graph.value_info(name).dtype
        except KeyError:
            return np.dtype(default)
        return np.dtype(default) if dt is None else np.dtype(dt)

    def warn_once(self, node: Node, msg: str) -> None:
        if node.name not in self._warned:
            self._warned.add(node.name)
            log.warn(f"node '{node.name}' ({node.op_type}): {msg}")

    def init(self, node: Node, index: int, what: str) -> np.ndarray:
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
        """The node's function, from its operator module (`espstream.ops.registry`); a node
        whose `lut` table ESP-DL's module uses instead of its arithmetic (`SimSpec.lut`: most
        activations at 8 bits, LUT and Gelu always) is a table lookup."""
        from espstream.ops import registry

        spec = registry.sim(node.op_type)
        if spec is None:
            raise UserError(
                f"node '{node.name}': operator '{node.op_type}' is not supported by the "
                f"simulator (supported: {', '.join(registry.simulated())})"
            )
        lookup = registry.table_lookup()
        if node.attrs.get("lut") and lookup is not None and (
                spec.lut == "always" or (spec.lut == "s8" and self._is_8bit(node))):
            return lookup(self, node)
        return spec.compile(self, node)

    def _is_8bit(self, node: Node) -> bool:
        """ESP-DL's deserializers decide by the node's quant_type; without one, by its input."""
        qt = node.attrs.get("quant_type")
        if isinstance(qt, bytes):
            qt = qt.decode()
        if isinstance(qt, str) and qt:
            return qt == "S8"
        return bool(node.inputs) and self.dtype_of(node.inputs[0], np.int8) == np.int8

    def init_exp(self, name: str) -> int:
        exps = self.graph.initializers[name].exponents
        if len(exps) != 1:
            raise UserError(f"constant '{name}' has {len(exps)} exponents; expected one")
        return int(exps[0])


    def same_exponent(self, node: Node, all_inputs: bool = False) -> None:
        """Data movement copies values: warn when the file says the exponent changes."""
        try:
            e_out = self.exp(node.outputs[0])
            names = node.inputs if all_inputs else node.inputs[:1]
            for name in names:
                if name and name not in self.graph.initializers and self.exp(name) != e_out:
                    self.warn_once(
                        node,
                        f"input '{name}' has exponent {self.exp(name)} but the output has "
                        f"{e_out}; the runtime copies the values unchanged",
                    )
        except UserError:
            pass  # an exponent missing on a data-movement op does not matter to the values


def run_chunks(
    sim: Simulator, inputs: dict[str, np.ndarray], axis: int = 1
) -> list[dict[str, np.ndarray]]:
    """Feed whole sequences to a streaming model one chunk per call, from its current state.

    Each input is cut on `axis` into chunks of the size its graph input declares there; the
    sequences must be a whole number of chunks, all inputs the same number. A GRU / LSTM state
    input (metadata espstream.recurrent_states) starts from zeros (or the value given) and is
    fed the state output of each call, as the application does. Returns the outputs of every
    call, in order.
    """
    import json

    recurrent = json.loads(sim.graph.metadata.get("espstream.recurrent_states", "[]"))
    state: dict[str, np.ndarray] = {}
    for r in recurrent:
        vi = sim.graph.value_info(r["input"])
        state[r["input"]] = np.asarray(inputs[r["input"]]) if r["input"] in inputs else \
            np.zeros(vi.shape, vi.dtype)
    counts = set()
    sizes = {}
    for vi in sim.graph.inputs:
        if vi.name in state:
            continue
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
        res = sim.run({**feed, **state})
        for r in recurrent:
            state[r["input"]] = res[r["output"]]
        out.append(res)
    return out


#: Bound on a window's pads, stride and span: far beyond any model ESP-DL runs, and small
#: enough that a corrupt file cannot make a kernel allocate an absurd output.
MAX_WINDOW = 1 << 16


def check_window(node: Node, kernel, stride, dilation, pads) -> None:
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


def kernel_pads(pads: list[int]) -> list[int]:
    """A Conv / pool `pads` attribute as the file holds it (ONNX order: 2-D [top, left, bottom,
    right]) -> the kernels' order ([top, bottom, left, right]), as ESP-DL's deserializers
    reorder it; 1-D [begin, end] is unchanged."""
    p = [int(v) for v in pads]
    return [p[0], p[2], p[1], p[3]] if len(p) == 4 else p


def ints(v) -> list[int]:
    if isinstance(v, (int, np.integer)):
        return [int(v)]
    return [int(x) for x in v]


def check_broadcast(a: Sequence[int], b: Sequence[int]) -> None:
    """ONNX multidirectional broadcasting; ESP-DL's runtime does not check it (it takes the
    larger size per axis and reads past the shorter buffer), so a mismatch is refused here."""
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y and 1 not in (x, y):
            raise ValueError(
                f"input shapes {list(a)} and {list(b)} do not broadcast; ESP-DL does not check "
                "this and would read past the end of the smaller input"
            )


def onnx_reshape(shape: tuple[int, ...], target: list[int]) -> list[int]:
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


def onnx_slice_bounds(start: int, end: int, step: int, dim: int) -> tuple[int, int | None, int]:
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


def load(path, target: str | None = None, model: str | None = None,
         key: str | bytes | None = None, kernels: ModuleType | None = None) -> Simulator:
    """A Simulator for an `.espdl` file: any ESP-DL file (single, packed with `model` naming
    the member, encrypted with `key` a key file path or the 16 key bytes), for `target` (else
    the one the file records or its layout tells; `espstream.targets.resolve`)."""
    from espstream.espdl.open import load_graph
    from espstream.targets import resolve

    graph = load_graph(str(path), model=model, key=key)
    return Simulator(graph, kernels, resolve(graph, target, str(path)).target)

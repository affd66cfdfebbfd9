"""The IntGraph: one in-memory form of an ESP-DL model, exactly what a `.espdl` file holds.

`lower` builds it from a QDQ ONNX model, `espdl.read` / `espdl.write` convert it from / to
`.espdl` bytes, and `sim` runs it. Everything is in the runtime layout (activations NWC / NHWC,
batch 1) except one thing: weight *blocking*. Every tensor's `data` is a plain numpy array whose
shape is the tensor's `dims` in the file, and the per-target packing of filter bytes (ESP32-S3 /
P4 output-channel blocks of 16 or 8, the plain target's N-major order) is undone by the reader
and redone by the writer (`espstream.espdl.layout`). So the logical meaning of a filter array is
the dims order the runtime declares:

- Conv 2-D filter `[H, W, C, N]` (kernel height, width, input channels, output channels),
  Conv 1-D filter `[W, C, N]`; `data[h, w, c, n]` is the weight of tap (h, w) from input
  channel c to output channel n.
- Depthwise filter (group > 1) `[H, W, N, 1]` (1-D `[W, N, 1]`): `data[h, w, n, 0]`.
- Gemm filter `[1, 1, C, N]` (transB = 0); MatMul constant `[..., C, N]`.
- Biases `[N]`; LUTs `[256]`; everything else as the file declares it.

Exponents follow the logical channel order (one per tensor, or one per output channel).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from espstream.errors import UserError
from espstream.targets import CHIPS as _CHIPS

#: Targets the writer knows the weight layout of: ESP-DL 3.3's names and 'c' (espstream.targets).
TARGETS = tuple(_CHIPS)

#: ONNX / ESP-DL TensorDataType code -> numpy dtype (only the types a tensor can be read as).
CODE_TO_DTYPE: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    4: np.dtype(np.uint16),
    5: np.dtype(np.int16),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    9: np.dtype(np.bool_),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
    12: np.dtype(np.uint32),
    13: np.dtype(np.uint64),
}
DTYPE_TO_CODE: dict[np.dtype, int] = {v: k for k, v in CODE_TO_DTYPE.items()}
CODE_NAMES = {
    0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32",
    7: "INT64", 8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64",
}


def dtype_code(dtype: np.dtype | None) -> int:
    """The TensorDataType code of a numpy dtype (0 for None)."""
    if dtype is None:
        return 0
    dt = np.dtype(dtype).newbyteorder("=")
    if dt not in DTYPE_TO_CODE:
        raise UserError(f"numpy dtype {dt} has no ESP-DL TensorDataType")
    return DTYPE_TO_CODE[dt]


@dataclass(eq=False)
class Tensor:
    """An initializer or a test value.

    name: the tensor's name (initializers are referenced by node inputs under it).
    data: numpy array, `data.shape` is the file's `dims`, values in the logical (unblocked)
        layout described in the module docstring; its dtype is the file's data_type.
    exponents: power-of-two exponents, real = q * 2**e; one per tensor or one per output
        channel (logical channel order). ESP-PPQ writes [0] for plain integer constants.
    doc_string: the file's doc string, e.g. 'layout ==> (N/16)WC16' for a filter; it names the
        byte layout the writer must produce (None: absent, e.g. on ESP-PPQ's LUTs).
    """

    name: str
    data: np.ndarray
    exponents: list[int] = field(default_factory=list)
    doc_string: str | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def data_type(self) -> int:
        """The ONNX / ESP-DL TensorDataType code."""
        return dtype_code(self.data.dtype)

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)

    @property
    def layout(self) -> str | None:
        """The layout named by the doc string ('layout ==> X' -> 'X'), or None."""
        if self.doc_string and self.doc_string.startswith("layout ==> "):
            return self.doc_string[len("layout ==> "):]
        return None

    @property
    def exponent(self) -> int:
        """The single exponent of a per-tensor quantized tensor."""
        if len(self.exponents) != 1:
            raise UserError(f"tensor '{self.name}' has {len(self.exponents)} exponents, not one")
        return self.exponents[0]

    def diff(self, other: Tensor, where: str = "") -> list[str]:
        """Human-readable differences (empty when equal; arrays compared exactly)."""
        w = where or f"tensor '{self.name}'"
        out = []
        if self.name != other.name:
            out.append(f"{w}: name {self.name!r} != {other.name!r}")
        if self.dtype != other.dtype:
            out.append(f"{w}: dtype {self.dtype} != {other.dtype}")
        if self.dims != other.dims:
            out.append(f"{w}: dims {list(self.dims)} != {list(other.dims)}")
        elif self.dtype == other.dtype and not np.array_equal(self.data, other.data):
            n = int(np.count_nonzero(self.data != other.data))
            out.append(f"{w}: {n} of {self.data.size} values differ")
        if list(self.exponents) != list(other.exponents):
            out.append(f"{w}: exponents {self.exponents} != {other.exponents}")
        if self.doc_string != other.doc_string:
            out.append(f"{w}: doc_string {self.doc_string!r} != {other.doc_string!r}")
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tensor) and not self.diff(other)

    __hash__ = None  # type: ignore[assignment]


#: A node attribute value: INT, FLOAT (32-bit in the file), STRING, INTS, FLOATS, STRINGS,
#: TENSOR. An empty list is written as INTS.
AttrValue = int | float | str | bytes | list[int] | list[float] | list[str] | Tensor


def _attr_norm(v: AttrValue) -> object:
    """A comparable form: floats rounded to float32 as the file stores them, lists as tuples."""
    if isinstance(v, bool):
        return ("i", int(v))
    if isinstance(v, (int, np.integer)):
        return ("i", int(v))
    if isinstance(v, (float, np.floating)):
        return ("f", float(np.float32(v)))
    if isinstance(v, (list, tuple, np.ndarray)):
        return tuple(_attr_norm(x) for x in v)
    if isinstance(v, Tensor):
        return ("t", v.name, v.dtype.str, v.dims, v.data.tobytes(), tuple(v.exponents),
                v.doc_string)
    if isinstance(v, bytes):  # a STRING attribute that is not UTF-8 stays bytes
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return v
    return v


@dataclass(eq=False)
class Node:
    """One operator.

    op_type: ESP-DL operator name ('Conv', 'Add', 'StreamingCache', 'RequantizeLinear', ...).
    name: the node's name (unique in a well-formed graph).
    inputs / outputs: tensor names, in order ('' marks an absent optional input).
    attrs: attribute name -> value, see `AttrValue` (e.g. quant_type 'S8', activation 'Relu',
        lut 'Swish_lut_0', pads [2, 0], window_size 3, frame_axis 1). Written in dict order.
    domain / doc_string: as in the file (None when absent; ESP-PPQ writes neither).
    """

    op_type: str
    name: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    attrs: dict[str, AttrValue] = field(default_factory=dict)
    domain: str | None = None
    doc_string: str | None = None

    def diff(self, other: Node, where: str = "") -> list[str]:
        w = where or f"node '{self.name}'"
        out = []
        for f in ("op_type", "name", "inputs", "outputs", "domain", "doc_string"):
            a, b = getattr(self, f), getattr(other, f)
            if isinstance(a, tuple):
                a = list(a)
            if isinstance(b, tuple):
                b = list(b)
            if a != b:
                out.append(f"{w}: {f} {a!r} != {b!r}")
        if set(self.attrs) != set(other.attrs):
            out.append(f"{w}: attributes {sorted(self.attrs)} != {sorted(other.attrs)}")
        for k in self.attrs.keys() & other.attrs.keys():
            if _attr_norm(self.attrs[k]) != _attr_norm(other.attrs[k]):
                out.append(f"{w}: attribute {k} {self.attrs[k]!r} != {other.attrs[k]!r}")
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Node) and not self.diff(other)

    __hash__ = None  # type: ignore[assignment]


#: One dimension of a ValueInfo shape: a size, a symbolic name (dim_param), or unknown.
Dim = int | str | None


@dataclass(eq=False)
class ValueInfo:
    """Type, shape and exponents of an activation (graph input, output or intermediate).

    dtype: numpy dtype of the elements (int8 / int16 / float32 ...), None if the file gives none.
    shape: runtime-layout shape (NWC / NHWC, batch 1), None if the file gives none; only graph
        inputs' shapes are read by the runtime.
    exponents: the activation's exponent(s), usually one.
    """

    name: str
    dtype: np.dtype | None
    shape: list[Dim] | None
    exponents: list[int] = field(default_factory=list)
    doc_string: str | None = None

    @property
    def exponent(self) -> int:
        if len(self.exponents) != 1:
            raise UserError(f"value '{self.name}' has {len(self.exponents)} exponents, not one")
        return self.exponents[0]

    def diff(self, other: ValueInfo, where: str = "") -> list[str]:
        w = where or f"value info '{self.name}'"
        out = []
        if self.name != other.name:
            out.append(f"{w}: name {self.name!r} != {other.name!r}")
        if self.dtype != other.dtype:
            out.append(f"{w}: dtype {self.dtype} != {other.dtype}")
        if (None if self.shape is None else list(self.shape)) != (
            None if other.shape is None else list(other.shape)
        ):
            out.append(f"{w}: shape {self.shape} != {other.shape}")
        if list(self.exponents) != list(other.exponents):
            out.append(f"{w}: exponents {self.exponents} != {other.exponents}")
        if self.doc_string != other.doc_string:
            out.append(f"{w}: doc_string {self.doc_string!r} != {other.doc_string!r}")
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ValueInfo) and not self.diff(other)

    __hash__ = None  # type: ignore[assignment]


@dataclass(eq=False)
class IntGraph:
    """An ESP-DL model: the graph, its parameters, activations' exponents and test values.

    name: the graph's name ('main_graph' from ESP-PPQ).
    nodes: operators in file order (ESP-PPQ writes them topologically sorted).
    initializers: name -> Tensor, parameters in file order (weights, biases, LUTs, constants).
    inputs / outputs: the graph's inputs and outputs with dtype, runtime shape, exponents.
    value_infos: name -> ValueInfo for activations (ESP-PPQ lists every activation here,
        graph inputs and outputs included).
    test_inputs / test_outputs: name -> Tensor of quantized test data in the runtime layout
        (`test_inputs_value` / `test_outputs_value`), empty when the file has none.
    metadata: the model's metadata_props, in order.
    target: 'c', 'esp32s3' or 'esp32p4' (decides the filter byte layout and the arithmetic);
        None when unknown (a file with no filters). The reader infers it from the filters'
        layout doc strings where they leave one arithmetic, or takes the `espstream.target`
        the file records (`espstream.targets.resolve`); any ESP-DL target name is accepted.
    layout_targets: set by the reader: the arithmetics ('c', 'esp32s3', 'esp32p4') whose
        kernels read the file's filter layout; None when it has no filters.
    ir_version, opset_import, producer_name, producer_version, domain, model_version,
    doc_string, graph_doc_string: the Model / Graph header fields, as in the file
        (ESP-PPQ 1.3.12 writes ir_version 7 and nothing else).
    """

    name: str
    nodes: list[Node] = field(default_factory=list)
    initializers: dict[str, Tensor] = field(default_factory=dict)
    inputs: list[ValueInfo] = field(default_factory=list)
    outputs: list[ValueInfo] = field(default_factory=list)
    value_infos: dict[str, ValueInfo] = field(default_factory=dict)
    test_inputs: dict[str, Tensor] = field(default_factory=dict)
    test_outputs: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    ir_version: int = 7
    opset_import: list[tuple[str | None, int]] = field(default_factory=list)
    producer_name: str | None = None
    producer_version: str | None = None
    domain: str | None = None
    model_version: int = 0
    doc_string: str | None = None
    graph_doc_string: str | None = None
    layout_targets: tuple[str, ...] | None = field(default=None, compare=False)

    # ---- lookups -------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def value_info(self, name: str) -> ValueInfo:
        """The ValueInfo of an activation (value_infos first, then inputs and outputs)."""
        if name in self.value_infos:
            return self.value_infos[name]
        for v in (*self.inputs, *self.outputs):
            if v.name == name:
                return v
        raise KeyError(name)

    def exponents(self, name: str) -> list[int]:
        """Exponents of a tensor by name, initializer or activation."""
        if name in self.initializers:
            return self.initializers[name].exponents
        return self.value_info(name).exponents

    def producers(self) -> dict[str, Node]:
        """Tensor name -> the node that outputs it."""
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers(self) -> dict[str, list[Node]]:
        """Tensor name -> nodes that read it (in node order, once per node)."""
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in dict.fromkeys(n.inputs):
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def topological_order(self) -> list[Node]:
        """Nodes ordered so that every node comes after the producers of its inputs.

        Stable: keeps file order where the file is already sorted. A cycle is a UserError.
        """
        producers = self.producers()
        deps = [
            {id(producers[i]) for i in n.inputs if i in producers and producers[i] is not n}
            for n in self.nodes
        ]
        done: set[int] = set()
        order: list[Node] = []
        pending = list(range(len(self.nodes)))
        while pending:
            rest = []
            for k in pending:
                if deps[k] <= done:
                    order.append(self.nodes[k])
                    done.add(id(self.nodes[k]))
                else:
                    rest.append(k)
            if len(rest) == len(pending):
                names = ", ".join(self.nodes[k].name for k in rest[:5])
                raise UserError(f"graph '{self.name}' has a cycle through nodes {names}")
            pending = rest
        return order

    @property
    def streaming(self) -> bool:
        """Whether the model carries state: StreamingCache nodes, or a GRU / LSTM state the
        application feeds back (metadata espstream.recurrent_states)."""
        return (any(n.op_type == "StreamingCache" for n in self.nodes)
                or "espstream.recurrent_states" in self.metadata)

    def cache_bytes(self, node: Node) -> int | None:
        """Bytes a StreamingCache keeps between calls: (window - 1) frames of its input, which
        is an activation or an initializer (streamify's start mask); None if its shape is not
        known."""
        name = node.inputs[0]
        if name in self.initializers:
            data = self.initializers[name].data
            shape, itemsize = list(data.shape), data.dtype.itemsize
        else:
            try:
                vi = self.value_info(name)
            except KeyError:
                return None
            if vi.shape is None or vi.dtype is None:
                return None
            shape, itemsize = list(vi.shape), np.dtype(vi.dtype).itemsize
        if not all(isinstance(d, int) for d in shape):
            return None
        axis = int(node.attrs.get("frame_axis", 1))
        frame = int(np.prod(shape[axis + 1:], dtype=np.int64))
        return (int(node.attrs.get("window_size", 1)) - 1) * frame * itemsize

    # ---- equality ------------------------------------------------------------------------

    def diff(self, other: IntGraph) -> list[str]:
        """Human-readable differences (empty when the graphs are equal)."""
        out: list[str] = []
        for f in ("name", "target", "ir_version", "producer_name", "producer_version", "domain",
                  "model_version", "doc_string", "graph_doc_string"):
            if getattr(self, f) != getattr(other, f):
                out.append(f"{f}: {getattr(self, f)!r} != {getattr(other, f)!r}")
        if [tuple(x) for x in self.opset_import] != [tuple(x) for x in other.opset_import]:
            out.append(f"opset_import: {self.opset_import} != {other.opset_import}")
        if dict(self.metadata) != dict(other.metadata):
            out.append(f"metadata: {self.metadata} != {other.metadata}")
        out += _diff_seq("node", self.nodes, other.nodes)
        out += _diff_seq("input", self.inputs, other.inputs)
        out += _diff_seq("output", self.outputs, other.outputs)
        out += _diff_map("initializer", self.initializers, other.initializers)
        out += _diff_map("value info", self.value_infos, other.value_infos)
        out += _diff_map("test input", self.test_inputs, other.test_inputs)
        out += _diff_map("test output", self.test_outputs, other.test_outputs)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntGraph) and not self.diff(other)

    __hash__ = None  # type: ignore[assignment]


def _diff_seq(kind: str, a: list, b: list) -> list[str]:
    if len(a) != len(b):
        return [f"{kind}s: {len(a)} != {len(b)}"]
    out = []
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        out += x.diff(y, f"{kind} {k} '{x.name}'")
    return out


def _diff_map(kind: str, a: dict, b: dict) -> list[str]:
    out = []
    if list(a) != list(b):
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        if only_a or only_b:
            out.append(f"{kind}s: only in first {only_a[:5]}, only in second {only_b[:5]}")
        else:
            out.append(f"{kind}s: same names in a different order")
    for k in a.keys() & b.keys():
        out += a[k].diff(b[k], f"{kind} '{k}'")
    return out


def unique_by_name(items: Iterable, kind: str, where: str) -> dict:
    """name -> item, refusing duplicate names (a dict would silently keep the last one)."""
    out: dict = {}
    for it in items:
        if it.name in out:
            raise UserError(f"{where}: two {kind}s are named '{it.name}'")
        out[it.name] = it
    return out

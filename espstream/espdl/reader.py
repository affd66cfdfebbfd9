"""`.espdl` bytes -> IntGraph.

Steps: check the 16-byte EDL2 header against the file, verify the FlatBuffers payload
(`verifier.verify`: every offset bounds-checked before the generated accessors touch it), read
it with the accessors generated from schema.fbs, then undo the per-target filter blocking
(`layout.unpack`) so initializers come out in the IntGraph's logical layout. Anything wrong
with the file is a one-line UserError.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from espstream.errors import UserError
from espstream.espdl import layout
from espstream.espdl.fbs.Attribute import Attribute
from espstream.espdl.fbs.Model import Model
from espstream.espdl.fbs.Tensor import Tensor as FbTensor
from espstream.espdl.fbs.TensorTypeAndShape import TensorTypeAndShape
from espstream.espdl.verifier import verify
from espstream.intgraph import (
    CODE_NAMES,
    CODE_TO_DTYPE,
    IntGraph,
    Node,
    Tensor,
    ValueInfo,
    unique_by_name,
)
from espstream.limits import MAX_WINDOW

MAGIC = b"EDL2"
HEADER = struct.Struct("<4sIII")  # magic, mode, payload length, reserved

MAX_RANK = 16  # ESP-DL tensors have at most 4 or 5 dims; numpy refuses more than 64
MAX_DIM = 2**31 - 1

# vtable offset of Tensor.raw_data (slot 8): 4 + 2 * 8
_RAW_DATA_VT = 20


def read(data: bytes, model: str | None = None, key: bytes | None = None) -> IntGraph:
    """Parse a `.espdl` file's bytes into an IntGraph (filters unblocked, target inferred).

    Packed files (PDL2 / PDL3) give the member `model`; encrypted models need the 16-byte
    AES `key` (`espstream.espdl.open`)."""
    if data[:3] == b"PDL" or model is not None or (len(data) >= 8 and data[:4] == MAGIC
                                                   and data[4:8] == b"\x01\0\0\0"):
        from espstream.espdl.open import open_model

        data = open_model(data, model, key).data
    buf = payload(data)
    verify(buf)
    try:
        return _Reader(buf).model(Model.GetRootAs(buf, 0))
    except (struct.error, IndexError, OverflowError, UnicodeDecodeError, ValueError) as e:
        # The verifier should make these impossible; never let one reach the user as a trace.
        raise UserError(f"corrupt .espdl payload: {type(e).__name__}: {e}") from None


def payload(data: bytes) -> bytes:
    """Check the EDL2 header against the file and return the FlatBuffers payload."""
    data = bytes(data)
    if len(data) < HEADER.size:
        raise UserError(f"not an .espdl file: {len(data)} bytes is shorter than its 16-byte header")
    magic, mode, length, _ = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        if magic == b"EDL1":
            raise UserError("old EDL1 .espdl files are not supported; re-export as EDL2")
        if magic[:3] == b"PDL":
            raise UserError("a packed multi-model .espdl file (PDL): read it with "
                            "espstream.espdl.read(data, model=NAME)")
        raise UserError(f"not an .espdl file: magic {magic!r}, expected b'EDL2'")
    if mode == 1:
        raise UserError("the model is encrypted (mode 1, AES-128-CTR); give its key with "
                        "--key KEYFILE")
    if mode != 0:
        raise UserError(f"unknown .espdl mode {mode} (0 is plain, 1 encrypted)")
    body = len(data) - HEADER.size
    padded = length + (-length % 16)
    if length > body:
        raise UserError(f"truncated .espdl file: the header announces a {length}-byte payload, "
                        f"the file holds {body} bytes after the header")
    if body > padded:
        raise UserError(f"the .espdl header announces a {length}-byte payload but the file has "
                        f"{body - length} bytes after it (more than its 16-byte padding)")
    return data[HEADER.size:HEADER.size + length]


def _s(b: bytes | None, what: str) -> str | None:
    if b is None:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"corrupt .espdl payload: {what} is not UTF-8 text") from None


#: string attributes the operators (espstream.ops) read as words
TEXT_ATTRS = frozenset({"activation", "activations", "auto_pad", "coordinate_transformation_mode",
                        "direction", "layout", "lut", "mode", "nearest_mode", "quant_type",
                        "reduction"})


def _check_graph(g: IntGraph) -> None:
    """What every reader of the graph relies on (a corrupted word must not reach them):

    1. every node has an output, and no output of a node is unnamed; an attribute the
       operators read as text (`TEXT_ATTRS`) is UTF-8 text (other string attributes may hold
       bytes, as a custom operator's can);
    2. a StreamingCache has one input and one output, a `window_size` in 1..MAX_WINDOW and a
       `frame_axis` below its input's rank; the frames it keeps hold at most
       `limits.MAX_ARRAY_BYTES` bytes;
    3. a graph input's shape holds at most `limits.MAX_ELEMENTS` elements (the simulator
       allocates it).
    """
    from espstream.limits import check_shape

    for n in g.nodes:
        where = f"node '{n.name}' ({n.op_type})"
        if not n.outputs or any(not o for o in n.outputs):
            raise UserError(f"corrupt .espdl graph: {where} has a missing output")
        for k in TEXT_ATTRS & set(n.attrs):
            v = n.attrs[k]
            if isinstance(v, bytes) or (isinstance(v, list) and any(isinstance(x, bytes)
                                                                    for x in v)):
                raise UserError(f"corrupt .espdl graph: attribute '{k}' of {where} is not "
                                "UTF-8 text")
        if n.op_type == "StreamingCache":
            _check_cache(g, n, where)
    for v in g.inputs:
        if v.shape is not None and all(isinstance(d, int) for d in v.shape):
            check_shape(v.shape, 1 if v.dtype is None else np.dtype(v.dtype).itemsize,
                        f"graph input '{v.name}'")


def _check_cache(g: IntGraph, n: Node, where: str) -> None:
    from espstream.limits import check_shape

    if len(n.inputs) != 1 or not n.inputs[0] or len(n.outputs) != 1:
        raise UserError(f"corrupt .espdl graph: {where} has {len(n.inputs)} input(s) and "
                        f"{len(n.outputs)} output(s); ESP-DL's takes one and gives one")
    w, ax = n.attrs.get("window_size"), n.attrs.get("frame_axis")
    if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WINDOW:
        raise UserError(f"{where}: window_size {w!r} is not between 1 and {MAX_WINDOW}")
    if isinstance(ax, bool) or not isinstance(ax, int) or ax < 0:
        raise UserError(f"{where}: frame_axis {ax!r} is not a non-negative integer")
    name = n.inputs[0]
    if name in g.initializers:
        shape, itemsize = list(g.initializers[name].data.shape), \
            g.initializers[name].data.dtype.itemsize
    else:
        vi = g.value_infos.get(name) or next((v for v in g.inputs if v.name == name), None)
        if vi is None or vi.shape is None or not all(isinstance(d, int) for d in vi.shape):
            return
        shape = list(vi.shape)
        itemsize = 1 if vi.dtype is None else np.dtype(vi.dtype).itemsize
    if ax >= len(shape):
        raise UserError(f"{where}: frame_axis {ax} is out of range for its input's rank "
                        f"{len(shape)}")
    check_shape([w - 1, *shape[ax + 1:]], itemsize, f"{where}: the frames it keeps")


def _rank(v: ValueInfo) -> int | None:
    return None if v.shape is None else len(v.shape)


MAX_EXPONENT = 127  # a power-of-two exponent of an int8 / int16 / int32 value: far inside this


def _exponents(values: list[int], where: str) -> list[int]:
    bad = [e for e in values if not -MAX_EXPONENT <= e <= MAX_EXPONENT]
    if bad:
        raise UserError(f"corrupt .espdl payload: {where}: exponent {bad[0]} is out of range "
                        f"(-{MAX_EXPONENT}..{MAX_EXPONENT})")
    return values


def _ints(fn_is_none, fn_as_numpy) -> list[int]:
    return [] if fn_is_none() else [int(x) for x in fn_as_numpy()]


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def model(self, m: Model) -> IntGraph:
        if m.FunctionsLength():
            raise UserError("the .espdl model defines functions, which are not supported")
        g = m.Graph()
        if g is None:
            raise UserError("the .espdl model has no graph")
        if g.QuantizationAnnotationLength():
            raise UserError("the .espdl graph has quantization_annotation entries, which are "
                            "not supported (ESP-DL keeps exponents on tensors)")
        gname = _s(g.Name(), "the graph name") or ""
        where = f"graph '{gname}'"

        inits = unique_by_name(
            (self.tensor(g.Initializer(i), "initializer") for i in range(g.InitializerLength())),
            "initializer", where)
        nodes = [self.node(g.Node(i)) for i in range(g.NodeLength())]
        allowed = self.unblock(nodes, inits)
        # ESP-PPQ lists the '' of an omitted optional input (Resize's roi) as a value info
        omitted = any(not name for n in nodes for name in n.inputs)

        meta: dict[str, str] = {}
        for i in range(m.MetadataPropsLength()):
            e = m.MetadataProps(i)
            key = _s(e.Key(), "a metadata key") or ""
            if key in meta:
                raise UserError(f"the .espdl metadata_props repeat the key '{key}'")
            meta[key] = _s(e.Value(), f"metadata '{key}'") or ""

        graph = IntGraph(
            name=gname,
            nodes=nodes,
            initializers=inits,
            inputs=[self.value_info(g.Input(i)) for i in range(g.InputLength())],
            outputs=[self.value_info(g.Output(i)) for i in range(g.OutputLength())],
            value_infos=unique_by_name(
                (vi for i in range(g.ValueInfoLength())
                 if (vi := self.value_info(g.ValueInfo(i), unnamed_ok=omitted)) is not None),
                "value info", where),
            test_inputs=unique_by_name(
                (self.tensor(g.TestInputsValue(i), "test input")
                 for i in range(g.TestInputsValueLength())), "test input", where),
            test_outputs=unique_by_name(
                (self.tensor(g.TestOutputsValue(i), "test output")
                 for i in range(g.TestOutputsValueLength())), "test output", where),
            metadata=meta,
            ir_version=m.IrVersion(),
            opset_import=[
                (_s(m.OpsetImport(i).Domain(), "an opset domain"), m.OpsetImport(i).Version())
                for i in range(m.OpsetImportLength())
            ],
            producer_name=_s(m.ProducerName(), "producer_name"),
            producer_version=_s(m.ProducerVersion(), "producer_version"),
            domain=_s(m.Domain(), "the model domain"),
            model_version=m.ModelVersion(),
            doc_string=_s(m.DocString(), "the model doc_string"),
            graph_doc_string=_s(g.DocString(), "the graph doc_string"),
            layout_targets=allowed,
        )
        _check_graph(graph)
        from espstream import metadata

        metadata.check(meta, {v.name: _rank(v) for v in graph.inputs},
                       {v.name: _rank(v) for v in graph.outputs})
        graph.target = resolved_target(graph)
        return graph

    def tensor(self, t: FbTensor, kind: str) -> Tensor:
        name = _s(t.Name(), f"the name of a {kind}")
        if not name:
            raise UserError(f"the .espdl file has an unnamed {kind}")
        where = f"{kind} '{name}'"
        code = t.DataType()
        dtype = CODE_TO_DTYPE.get(code)
        if dtype is None:
            raise UserError(f"{where}: data type {CODE_NAMES.get(code, code)} is not supported")
        if t.DataLocation() != 0:
            raise UserError(f"{where}: external data is not supported")
        for field, n in (("float_data", t.FloatDataLength()), ("int32_data", t.Int32DataLength()),
                         ("int64_data", t.Int64DataLength()), ("string_data", t.StringDataLength()),
                         ("double_data", t.DoubleDataLength()),
                         ("uint64_data", t.Uint64DataLength())):
            if n:
                raise UserError(f"{where}: values stored in {field}; only raw_data is supported")
        dims = _ints(t.DimsIsNone, t.DimsAsNumpy)
        if len(dims) > MAX_RANK:
            raise UserError(f"{where}: {len(dims)} dimensions, more than the {MAX_RANK} supported")
        if any(d < 0 or d > MAX_DIM for d in dims):
            raise UserError(f"{where}: impossible dimension in dims {dims}")
        count = math.prod(dims)
        o = t._tab.Offset(_RAW_DATA_VT)
        start, nbytes = (t._tab.Vector(o), t._tab.VectorLen(o) * 16) if o else (0, 0)
        if count * dtype.itemsize > nbytes:
            raise UserError(f"{where}: dims {dims} need {count * dtype.itemsize} bytes of "
                            f"{dtype}, raw_data holds {nbytes}")
        flat = np.frombuffer(self.buf, dtype=dtype.newbyteorder("<"), count=count, offset=start)
        return Tensor(
            name=name,
            data=flat.astype(dtype).reshape(dims),  # a native-order copy, independent of buf
            exponents=_exponents(_ints(t.ExponentsIsNone, t.ExponentsAsNumpy), where),
            doc_string=_s(t.DocString(), f"{where} doc_string"),
        )

    def node(self, n) -> Node:
        name = _s(n.Name(), "a node name") or ""
        where = f"node '{name}'"
        attrs = {}
        for i in range(n.AttributeLength()):
            a = n.Attribute(i)
            aname = _s(a.Name(), f"{where} attribute name") or ""
            if aname in attrs:
                raise UserError(f"{where}: attribute '{aname}' appears twice")
            attrs[aname] = self.attribute(a, f"{where} attribute '{aname}'")
        return Node(
            op_type=_s(n.OpType(), f"{where} op_type") or "",
            name=name,
            inputs=[_s(n.Input(i), f"{where} input") for i in range(n.InputLength())],
            outputs=[_s(n.Output(i), f"{where} output") for i in range(n.OutputLength())],
            attrs=attrs,
            domain=_s(n.Domain(), f"{where} domain"),
            doc_string=_s(n.DocString(), f"{where} doc_string"),
        )

    def attribute(self, a: Attribute, where: str):
        kind = a.AttrType()
        if kind == 1:  # FLOAT (32-bit)
            f = a.F()
            if f is None:
                raise UserError(f"{where}: FLOAT attribute without a value")
            return float(f.F())
        if kind == 2:  # INT
            i = a.I()
            if i is None:
                raise UserError(f"{where}: INT attribute without a value")
            return int(i.I())
        if kind == 3:  # STRING
            raw = b"" if a.SIsNone() else a.SAsNumpy().tobytes()
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw
        if kind == 4:  # TENSOR
            if a.T() is None:
                raise UserError(f"{where}: TENSOR attribute without a tensor")
            return self.tensor(a.T(), "attribute tensor")
        if kind == 6:  # FLOATS
            return [] if a.FloatsIsNone() else [float(x) for x in a.FloatsAsNumpy()]
        if kind == 7:  # INTS
            return _ints(a.IntsIsNone, a.IntsAsNumpy)
        if kind == 8:  # STRINGS
            return [_s(a.Strings(i), where) for i in range(a.StringsLength())]
        names = {0: "UNDEFINED", 5: "GRAPH", 9: "TENSORS", 10: "GRAPHS", 11: "TYPE_PROTO",
                 12: "TYPE_PROTOS"}
        raise UserError(f"{where}: attribute type {names.get(kind, kind)} is not supported")

    def value_info(self, v, unnamed_ok: bool = False) -> ValueInfo | None:
        """A value info; None for an unnamed one when `unnamed_ok` (a node has an omitted
        optional input, which ESP-PPQ describes under the name '' and ESP-DL ignores)."""
        name = _s(v.Name(), "a value info name")
        if not name and unnamed_ok:
            return None
        if not name:
            raise UserError("the .espdl file has a value info without a name")
        where = f"value info '{name}'"
        dtype, shape = None, None
        ti = v.ValueInfoType()
        if ti is not None and ti.ValueType() != 0:
            if ti.ValueType() != 1:
                raise UserError(f"{where}: only tensor types are supported")
            tt = TensorTypeAndShape()
            table = ti.Value()
            tt.Init(table.Bytes, table.Pos)
            code = tt.ElemType()
            if code != 0:
                dtype = CODE_TO_DTYPE.get(code)
                if dtype is None:
                    raise UserError(f"{where}: element type {CODE_NAMES.get(code, code)} "
                                    "is not supported")
            sh = tt.Shape()
            if sh is not None:
                shape = []
                for i in range(sh.DimLength()):
                    dv = sh.Dim(i).Value()
                    kind = 0 if dv is None else dv.DimType()
                    if kind == 1:
                        shape.append(int(dv.DimValue()))
                    elif kind == 2:
                        shape.append(_s(dv.DimParam(), f"{where} dim_param") or "")
                    else:
                        shape.append(None)
        return ValueInfo(
            name=name, dtype=dtype, shape=shape,
            exponents=_exponents(_ints(v.ExponentsIsNone, v.ExponentsAsNumpy), where),
            doc_string=_s(v.DocString(), f"{where} doc_string"),
        )

    def unblock(self, nodes: list[Node], inits: dict[str, Tensor]) -> tuple[str, ...] | None:
        """Undo the filters' per-target byte order in place; return the arithmetics the
        layout allows (`layout.layout_arithmetics`)."""
        uses = layout.filter_uses(nodes, inits)
        seen = []
        for name, t in inits.items():
            fl = layout.layout_of(t.doc_string)
            if fl is None:
                continue
            use = uses.get(name)
            if use is None:
                raise UserError(f"initializer '{name}' has filter layout '{fl.name}' but no "
                                "Conv, Gemm or MatMul reads it as a filter")
            layout.check_dims(name, t.dims, use, fl)
            t.data = layout.unpack(t.data.reshape(-1), t.dims, fl, use)
            seen.append((name, fl, len(t.exponents)))
        return layout.layout_arithmetics(seen)


def resolved_target(graph: IntGraph) -> str | None:
    """The target recorded in the file or the one its layout allows (`espstream.targets`),
    None when the file leaves it open (then the simulator needs one given)."""
    from espstream.targets import resolve

    try:
        return resolve(graph).target
    except UserError:
        if graph.metadata.get("espstream.target") is not None:
            raise  # a recorded target the file contradicts (or an unknown name)
        return None

"""IntGraph -> `.espdl` bytes.

The file: `EDL2`, mode 0 (plain), the payload length, four zero bytes, then the FlatBuffers
payload built with the accessors generated from schema.fbs, zero-padded to a multiple of 16.
Raw tensor data goes into 16-byte `AlignedBytes` blocks (so it starts 16-byte aligned in the
file), zero-padded to a whole block; filters are re-blocked for the target by
`layout.pack`, following each filter's layout doc string.
"""

from __future__ import annotations

import flatbuffers
import numpy as np

import espstream.espdl.fbs.Attribute as A
import espstream.espdl.fbs.Dimension as D
import espstream.espdl.fbs.DimensionValue as DV
import espstream.espdl.fbs.Graph as G
import espstream.espdl.fbs.Model as M
import espstream.espdl.fbs.Node as N
import espstream.espdl.fbs.OperatorSetId as OS
import espstream.espdl.fbs.StringStringEntry as SSE
import espstream.espdl.fbs.Tensor as T
import espstream.espdl.fbs.TensorShape as TS
import espstream.espdl.fbs.TensorTypeAndShape as TTS
import espstream.espdl.fbs.TypeInfo as TI
import espstream.espdl.fbs.ValueInfo as VI
from espstream.errors import UserError
from espstream.espdl import layout
from espstream.espdl.fbs.AttributeF import CreateAttributeF
from espstream.espdl.fbs.AttributeI import CreateAttributeI
from espstream.espdl.reader import HEADER, MAGIC
from espstream.intgraph import TARGETS, IntGraph, Node, Tensor, ValueInfo, dtype_code
from espstream.targets import arithmetic

_I64 = np.iinfo(np.int64)


def write(graph: IntGraph, share_strings: bool = True) -> bytes:
    """Serialise an IntGraph as a plain (mode 0) EDL2 `.espdl` file.

    share_strings: store each distinct string once (tensor names recur in node inputs, value
    infos and initializers); FlatBuffers readers cannot tell, and the file is ~13% smaller than
    ESP-PPQ's on the fixtures. False writes every string separately, as ESP-PPQ does.
    """
    if graph.target is not None and graph.target not in TARGETS:
        raise UserError(f"unknown target '{graph.target}'; expected one of {', '.join(TARGETS)}")
    size = sum(t.data.nbytes for t in graph.initializers.values()) + 65536
    w = _Writer(flatbuffers.Builder(size), graph, share_strings)
    b = w.b
    b.Finish(w.model())
    body = bytes(b.Output())
    return HEADER.pack(MAGIC, 0, len(body), 0) + body + b"\0" * (-len(body) % 16)


def _check_names(kind: str, items: dict) -> None:
    for key, v in items.items():
        if key != v.name:
            raise UserError(f"{kind} stored under '{key}' is named '{v.name}'")


class _Writer:
    def __init__(self, b: flatbuffers.Builder, graph: IntGraph, share_strings: bool) -> None:
        self.b = b
        self.share = share_strings
        self.g = graph
        self.uses = layout.filter_uses(graph.nodes, graph.initializers)

    # ---- primitives ----------------------------------------------------------------------

    def string(self, s: str | bytes | None) -> int:
        if s is None:
            return 0
        if not isinstance(s, (str, bytes)):
            raise UserError(f"expected a string, got {type(s).__name__} {s!r}")
        return self.b.CreateSharedString(s) if self.share else self.b.CreateString(s)

    def ints(self, xs, what: str) -> int:
        vals = [int(x) for x in xs]
        if any(x < _I64.min or x > _I64.max for x in vals):
            raise UserError(f"{what}: value out of the int64 range")
        return self.b.CreateNumpyVector(np.asarray(vals, dtype="<i8"))

    def offsets(self, start, offs: list[int]) -> int:
        start(self.b, len(offs))
        for o in reversed(offs):
            self.b.PrependUOffsetTRelative(o)
        return self.b.EndVector()

    def raw(self, data: bytes) -> int:
        """A raw_data vector of 16-byte blocks holding `data`, zero-padded to a whole block."""
        padded = data + b"\0" * (-len(data) % 16)
        T.TensorStartRawDataVector(self.b, len(padded) // 16)  # aligns the vector to 16 bytes
        self.b.head -= len(padded)
        self.b.Bytes[self.b.head:self.b.head + len(padded)] = padded
        return self.b.EndVector()

    # ---- tables ----------------------------------------------------------------------------

    def tensor(self, t: Tensor, kind: str, pack: bool = False) -> int:
        if not isinstance(t, Tensor):
            raise UserError(f"{kind}: expected a Tensor, got {type(t).__name__}")
        if not t.name:
            raise UserError(f"a {kind} has no name")
        code = dtype_code(t.data.dtype)
        values = self.file_order(t) if pack else t.data
        data = np.ascontiguousarray(values, dtype=t.data.dtype.newbyteorder("<")).tobytes()
        b = self.b
        name, doc = self.string(t.name), self.string(t.doc_string)
        dims = self.ints(t.data.shape, f"{kind} '{t.name}' dims")
        exps = self.ints(t.exponents, f"{kind} '{t.name}' exponents")
        raw = self.raw(data)
        T.TensorStart(b)
        T.TensorAddDims(b, dims)
        T.TensorAddDataType(b, code)
        T.TensorAddName(b, name)
        if t.doc_string is not None:
            T.TensorAddDocString(b, doc)
        T.TensorAddRawData(b, raw)
        T.TensorAddExponents(b, exps)
        return T.TensorEnd(b)

    def file_order(self, t: Tensor) -> np.ndarray:
        """A filter's values in the file's byte order for its layout doc string."""
        fl = layout.layout_of(t.doc_string)
        use = self.uses[t.name]
        layout.check_dims(t.name, t.dims, use, fl)
        n = t.dims[-2] if use.depthwise else t.dims[-1]
        if len(t.exponents) not in (1, n):
            raise UserError(f"filter '{t.name}' has {len(t.exponents)} exponents; expected one "
                            f"per tensor or one per output channel ({n})")
        target = self.g.target
        if target is not None and (arithmetic(target) == layout.PLAIN_TARGET) != (fl.align == 0):
            raise UserError(f"filter '{t.name}' has layout '{fl.name}', which is not a "
                            f"{target} layout; set its doc string with "
                            "espdl.layout.filter_layout for that target")
        return layout.pack(t.data, fl, use)

    def initializer(self, t: Tensor) -> int:
        use = self.uses.get(t.name)
        fl = layout.layout_of(t.doc_string)
        if fl is not None and use is None:
            raise UserError(f"initializer '{t.name}' has filter layout '{fl.name}' but no "
                            "Conv, Gemm or MatMul reads it as a filter")
        if fl is None and use is not None and t.data.dtype.kind in "iu" and t.doc_string is None:
            raise UserError(f"filter '{t.name}' of {use.op_type} '{use.node}' has no layout doc "
                            "string; set it with espdl.layout.annotate_filters(graph)")
        return self.tensor(t, "initializer", pack=fl is not None)

    def attribute(self, key: str, v, where: str) -> int:
        b = self.b
        where = f"{where} attribute '{key}'"
        sub = 0
        if isinstance(v, Tensor):
            kind, sub = 4, self.tensor(v, where)
        elif isinstance(v, (bool, int, np.integer)):
            kind = 2
            if not _I64.min <= int(v) <= _I64.max:
                raise UserError(f"{where}: {v} is out of the int64 range")
        elif isinstance(v, (float, np.floating)):
            kind = 1
        elif isinstance(v, (str, bytes)):
            kind = 3
            sub = b.CreateByteVector(v.encode("utf-8") if isinstance(v, str) else v)
        elif isinstance(v, (list, tuple, np.ndarray)):
            vals = list(v)
            if all(isinstance(x, (bool, int, np.integer)) for x in vals):
                kind, sub = 7, self.ints(vals, where)
            elif all(isinstance(x, (int, float, np.integer, np.floating)) for x in vals):
                kind, sub = 6, b.CreateNumpyVector(np.asarray(vals, dtype="<f4"))
            elif all(isinstance(x, str) for x in vals):
                kind = 8
                sub = self.offsets(A.AttributeStartStringsVector, [self.string(x) for x in vals])
            else:
                raise UserError(f"{where}: a list must hold only ints, floats or strings")
        else:
            raise UserError(f"{where}: values of type {type(v).__name__} cannot be written")
        name = self.string(key)
        A.AttributeStart(b)
        A.AttributeAddName(b, name)
        A.AttributeAddAttrType(b, kind)
        if kind == 1:
            A.AttributeAddF(b, CreateAttributeF(b, float(v)))
        elif kind == 2:
            A.AttributeAddI(b, CreateAttributeI(b, int(v)))
        elif kind == 3:
            A.AttributeAddS(b, sub)
        elif kind == 4:
            A.AttributeAddT(b, sub)
        elif kind == 6:
            A.AttributeAddFloats(b, sub)
        elif kind == 7:
            A.AttributeAddInts(b, sub)
        else:
            A.AttributeAddStrings(b, sub)
        return A.AttributeEnd(b)

    def node(self, n: Node) -> int:
        if not isinstance(n, Node):
            raise UserError(f"expected a Node, got {type(n).__name__}")
        where = f"node '{n.name}'"
        b = self.b
        attrs = [self.attribute(k, v, where) for k, v in n.attrs.items()]
        ins = self.offsets(N.NodeStartInputVector, [self.string(s) for s in n.inputs])
        outs = self.offsets(N.NodeStartOutputVector, [self.string(s) for s in n.outputs])
        attr_vec = self.offsets(N.NodeStartAttributeVector, attrs)
        name, op, dom, doc = (self.string(n.name), self.string(n.op_type),
                              self.string(n.domain), self.string(n.doc_string))
        N.NodeStart(b)
        N.NodeAddInput(b, ins)
        N.NodeAddOutput(b, outs)
        N.NodeAddName(b, name)
        N.NodeAddOpType(b, op)
        if n.domain is not None:
            N.NodeAddDomain(b, dom)
        N.NodeAddAttribute(b, attr_vec)
        if n.doc_string is not None:
            N.NodeAddDocString(b, doc)
        return N.NodeEnd(b)

    def value_info(self, v: ValueInfo) -> int:
        if not isinstance(v, ValueInfo):
            raise UserError(f"expected a ValueInfo, got {type(v).__name__}")
        b = self.b
        shape = 0
        if v.shape is not None:
            dims = []
            for d in v.shape:
                param = self.string(d) if isinstance(d, str) else 0
                DV.DimensionValueStart(b)
                if d is None:
                    DV.DimensionValueAddDimType(b, 0)
                elif isinstance(d, str):
                    DV.DimensionValueAddDimType(b, 2)
                    DV.DimensionValueAddDimParam(b, param)
                else:
                    DV.DimensionValueAddDimType(b, 1)
                    DV.DimensionValueAddDimValue(b, int(d))
                value = DV.DimensionValueEnd(b)
                D.DimensionStart(b)
                D.DimensionAddValue(b, value)
                dims.append(D.DimensionEnd(b))
            dim_vec = self.offsets(TS.TensorShapeStartDimVector, dims)
            TS.TensorShapeStart(b)
            TS.TensorShapeAddDim(b, dim_vec)
            shape = TS.TensorShapeEnd(b)
        TTS.TensorTypeAndShapeStart(b)
        TTS.TensorTypeAndShapeAddElemType(b, dtype_code(v.dtype))
        if v.shape is not None:
            TTS.TensorTypeAndShapeAddShape(b, shape)
        tts = TTS.TensorTypeAndShapeEnd(b)
        TI.TypeInfoStart(b)
        TI.TypeInfoAddValueType(b, 1)  # TypeInfoValue.tensor_type
        TI.TypeInfoAddValue(b, tts)
        ti = TI.TypeInfoEnd(b)
        name, doc = self.string(v.name), self.string(v.doc_string)
        exps = self.ints(v.exponents, f"value info '{v.name}' exponents")
        VI.ValueInfoStart(b)
        VI.ValueInfoAddName(b, name)
        VI.ValueInfoAddValueInfoType(b, ti)
        if v.doc_string is not None:
            VI.ValueInfoAddDocString(b, doc)
        VI.ValueInfoAddExponents(b, exps)
        return VI.ValueInfoEnd(b)

    def graph(self) -> int:
        g, b = self.g, self.b
        _check_names("initializer", g.initializers)
        _check_names("value info", g.value_infos)
        _check_names("test input", g.test_inputs)
        _check_names("test output", g.test_outputs)
        nodes = self.offsets(G.GraphStartNodeVector, [self.node(n) for n in g.nodes])
        inits = self.offsets(G.GraphStartInitializerVector,
                             [self.initializer(t) for t in g.initializers.values()])
        ins = self.offsets(G.GraphStartInputVector, [self.value_info(v) for v in g.inputs])
        outs = self.offsets(G.GraphStartOutputVector, [self.value_info(v) for v in g.outputs])
        vis = self.offsets(G.GraphStartValueInfoVector,
                           [self.value_info(v) for v in g.value_infos.values()])
        tin = self.offsets(G.GraphStartTestInputsValueVector,
                           [self.tensor(t, "test input") for t in g.test_inputs.values()])
        tout = self.offsets(G.GraphStartTestOutputsValueVector,
                            [self.tensor(t, "test output") for t in g.test_outputs.values()])
        name, doc = self.string(g.name), self.string(g.graph_doc_string)
        G.GraphStart(b)
        G.GraphAddNode(b, nodes)
        G.GraphAddName(b, name)
        G.GraphAddInitializer(b, inits)
        if g.graph_doc_string is not None:
            G.GraphAddDocString(b, doc)
        G.GraphAddInput(b, ins)
        G.GraphAddOutput(b, outs)
        G.GraphAddValueInfo(b, vis)
        if g.test_inputs:
            G.GraphAddTestInputsValue(b, tin)
        if g.test_outputs:
            G.GraphAddTestOutputsValue(b, tout)
        return G.GraphEnd(b)

    def model(self) -> int:
        g, b = self.g, self.b
        graph = self.graph()
        opsets = []
        for domain, version in g.opset_import:
            d = self.string(domain)
            OS.OperatorSetIdStart(b)
            if domain is not None:
                OS.OperatorSetIdAddDomain(b, d)
            OS.OperatorSetIdAddVersion(b, int(version))
            opsets.append(OS.OperatorSetIdEnd(b))
        opset_vec = self.offsets(M.ModelStartOpsetImportVector, opsets) if opsets else 0
        entries = []
        for k, v in g.metadata.items():
            ko, vo = self.string(str(k)), self.string(str(v))
            SSE.StringStringEntryStart(b)
            SSE.StringStringEntryAddKey(b, ko)
            SSE.StringStringEntryAddValue(b, vo)
            entries.append(SSE.StringStringEntryEnd(b))
        meta = self.offsets(M.ModelStartMetadataPropsVector, entries) if entries else 0
        strs = [self.string(s) for s in (g.producer_name, g.producer_version, g.domain,
                                         g.doc_string)]
        M.ModelStart(b)
        M.ModelAddIrVersion(b, int(g.ir_version))
        if opset_vec:
            M.ModelAddOpsetImport(b, opset_vec)
        if g.producer_name is not None:
            M.ModelAddProducerName(b, strs[0])
        if g.producer_version is not None:
            M.ModelAddProducerVersion(b, strs[1])
        if g.domain is not None:
            M.ModelAddDomain(b, strs[2])
        M.ModelAddModelVersion(b, int(g.model_version))
        if g.doc_string is not None:
            M.ModelAddDocString(b, strs[3])
        M.ModelAddGraph(b, graph)
        if meta:
            M.ModelAddMetadataProps(b, meta)
        return M.ModelEnd(b)


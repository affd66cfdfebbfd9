"""A bounds-checking walk over a `.espdl` FlatBuffers payload, run before any accessor reads it.

The flatbuffers Python runtime trusts its input: a bad offset raises an arbitrary exception or,
worse, reads garbage that later drives a huge allocation. `verify(buf)` follows every offset the
reader will follow, in the schema's shape (`SCHEMA`, which mirrors schema.fbs field for field),
and checks before each step:

1. every table, vtable, string and vector lies inside the buffer;
2. a vtable has an even size >= 4 and every present field fits inside its table;
3. a vector's length times its element size fits in the rest of the buffer (no absurd lengths);
4. a string ends with its NUL byte inside the buffer;
5. a union's type tag is one the schema knows;
6. nesting is at most MAX_DEPTH tables deep, and the walk visits at most len(buf) // 2 + 1024
   objects, so a payload that shares sub-tables to multiply the work fails fast (offsets only
   point forward, so there are no cycles).

The reader walks a subset of the same paths, so after `verify` it cannot leave the buffer and
its work is bounded by the same visit budget.
"""

from __future__ import annotations

import struct

from espstream.errors import UserError

MAX_DEPTH = 32

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")

# Field kinds: ("scalar", size), ("struct", size), ("str",), ("vec", elem_size), ("vecstr",),
# ("vectab", table), ("tab", table), ("utype",), ("union", {type_code: table}).
_S = ("str",)
_VS = ("vecstr",)

#: table -> [(field name, kind)] in vtable-slot order, exactly as in schema.fbs.
SCHEMA: dict[str, list[tuple[str, tuple]]] = {
    "Attribute": [
        ("name", _S), ("ref_attr_name", _S), ("doc_string", _S), ("attr_type", ("scalar", 4)),
        ("f", ("struct", 4)), ("i", ("struct", 8)), ("s", ("vec", 1)), ("t", ("tab", "Tensor")),
        ("g", ("tab", "Graph")), ("tp", ("tab", "TypeInfo")), ("floats", ("vec", 4)),
        ("ints", ("vec", 8)), ("strings", _VS), ("tensors", ("vectab", "Tensor")),
        ("graphs", ("vectab", "Graph")), ("type_protos", ("vectab", "TypeInfo")),
    ],
    "ValueInfo": [
        ("name", _S), ("value_info_type", ("tab", "TypeInfo")), ("doc_string", _S),
        ("exponents", ("vec", 8)),
    ],
    "Node": [
        ("input", _VS), ("output", _VS), ("name", _S), ("op_type", _S), ("domain", _S),
        ("attribute", ("vectab", "Attribute")), ("doc_string", _S),
    ],
    "Model": [
        ("ir_version", ("scalar", 4)), ("opset_import", ("vectab", "OperatorSetId")),
        ("producer_name", _S), ("producer_version", _S), ("domain", _S),
        ("model_version", ("scalar", 8)), ("doc_string", _S), ("graph", ("tab", "Graph")),
        ("metadata_props", ("vectab", "StringStringEntry")),
        ("functions", ("vectab", "Function")),
    ],
    "StringStringEntry": [("key", _S), ("value", _S)],
    "TensorAnnotation": [
        ("tensor_name", _S), ("quant_parameter_tensor_names", ("vectab", "StringStringEntry")),
    ],
    "Graph": [
        ("node", ("vectab", "Node")), ("name", _S), ("initializer", ("vectab", "Tensor")),
        ("doc_string", _S), ("input", ("vectab", "ValueInfo")),
        ("output", ("vectab", "ValueInfo")), ("value_info", ("vectab", "ValueInfo")),
        ("quantization_annotation", ("vectab", "TensorAnnotation")),
        ("test_inputs_value", ("vectab", "Tensor")), ("test_outputs_value", ("vectab", "Tensor")),
    ],
    "Tensor": [
        ("dims", ("vec", 8)), ("data_type", ("scalar", 4)), ("float_data", ("vec", 4)),
        ("int32_data", ("vec", 4)), ("string_data", _VS), ("int64_data", ("vec", 8)),
        ("name", _S), ("doc_string", _S), ("raw_data", ("vec", 16)),
        ("external_data", ("vectab", "StringStringEntry")), ("data_location", ("scalar", 4)),
        ("double_data", ("vec", 8)), ("uint64_data", ("vec", 8)), ("exponents", ("vec", 8)),
    ],
    "TensorShape": [("dim", ("vectab", "Dimension"))],
    "Dimension": [("value", ("tab", "DimensionValue")), ("denotation", _S)],
    "DimensionValue": [
        ("dim_type", ("scalar", 1)), ("dim_value", ("scalar", 8)), ("dim_param", _S),
    ],
    "TensorTypeAndShape": [("elem_type", ("scalar", 4)), ("shape", ("tab", "TensorShape"))],
    "SequenceType": [("elem_type", ("tab", "TypeInfo"))],
    "MapType": [("key_type", ("scalar", 4)), ("value_type", ("tab", "TypeInfo"))],
    "OptionalType": [("elem_type", ("tab", "TypeInfo"))],
    "TypeInfo": [
        ("value_type", ("utype",)),
        ("value", ("union", {1: "TensorTypeAndShape", 2: "SequenceType", 3: "MapType",
                             4: "OptionalType"})),
        ("denotation", _S),
    ],
    "OperatorSetId": [("domain", _S), ("version", ("scalar", 8))],
    "Function": [
        ("name", _S), ("input", _VS), ("output", _VS), ("attribute", _VS),
        ("attribute_proto", ("vectab", "Attribute")), ("node", ("vectab", "Node")),
        ("doc_string", _S), ("opset_import", ("vectab", "OperatorSetId")), ("domain", _S),
    ],
}

def _inline_size(kind: tuple) -> int:
    if kind[0] in ("scalar", "struct"):
        return kind[1]
    if kind[0] == "utype":
        return 1
    return 4  # an offset


class _Walk:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.n = len(buf)
        self.budget = self.n // 2 + 1024

    def fail(self, what: str, at: int) -> None:
        raise UserError(f"corrupt .espdl payload: {what} (payload byte {at})")

    def tick(self, at: int) -> None:
        self.budget -= 1
        if self.budget < 0:
            self.fail("too many objects for the payload size (shared or looping structure)", at)

    def u32(self, at: int) -> int:
        if at < 0 or at + 4 > self.n:
            self.fail("offset field outside the payload", at)
        return _U32.unpack_from(self.buf, at)[0]

    def follow(self, at: int) -> int:
        """The position an offset field at `at` points to, with room for a 4-byte header."""
        target = at + self.u32(at)
        if target + 4 > self.n:
            self.fail("offset points outside the payload", at)
        return target

    def string(self, at: int) -> None:
        self.tick(at)
        s = self.follow(at)
        length = _U32.unpack_from(self.buf, s)[0]
        end = s + 4 + length
        if end >= self.n:
            self.fail(f"string of {length} bytes runs past the end", s)
        if self.buf[end] != 0:
            self.fail("string is not NUL-terminated", s)

    def vector(self, at: int, elem: int) -> tuple[int, int]:
        v = self.follow(at)
        length = _U32.unpack_from(self.buf, v)[0]
        if length > (self.n - v - 4) // elem:
            self.fail(f"vector of {length} elements of {elem} bytes runs past the end", v)
        return v + 4, length

    def table(self, pos: int, name: str, depth: int) -> None:
        self.tick(pos)
        if depth > MAX_DEPTH:
            self.fail(f"{name} tables nested more than {MAX_DEPTH} deep", pos)
        if pos < 0 or pos + 4 > self.n:
            self.fail(f"{name} table outside the payload", pos)
        vt = pos - _I32.unpack_from(self.buf, pos)[0]
        if vt < 0 or vt + 4 > self.n:
            self.fail(f"{name} vtable outside the payload", pos)
        vsize, tsize = _U16.unpack_from(self.buf, vt)[0], _U16.unpack_from(self.buf, vt + 2)[0]
        if vsize < 4 or vsize % 2 or vt + vsize > self.n:
            self.fail(f"{name} vtable has a bad size {vsize}", vt)
        if tsize < 4 or pos + tsize > self.n:
            self.fail(f"{name} table size {tsize} runs past the end", pos)
        utype = 0
        for k, (field, kind) in enumerate(SCHEMA[name]):
            slot = 4 + 2 * k
            if slot >= vsize:
                break
            fo = _U16.unpack_from(self.buf, vt + slot)[0]
            if fo == 0:
                continue
            if fo + _inline_size(kind) > tsize:
                self.fail(f"{name}.{field} lies outside its table", pos)
            at = pos + fo
            tag = kind[0]
            if tag == "utype":
                utype = _U8.unpack_from(self.buf, at)[0]
            elif tag in ("scalar", "struct"):
                pass
            elif tag == "str":
                self.string(at)
            elif tag == "vec":
                self.tick(at)
                self.vector(at, kind[1])
            elif tag == "vecstr":
                start, length = self.vector(at, 4)
                for j in range(length):
                    self.string(start + 4 * j)
            elif tag == "vectab":
                start, length = self.vector(at, 4)
                for j in range(length):
                    self.table(self.follow(start + 4 * j), kind[1], depth + 1)
            elif tag == "tab":
                self.table(self.follow(at), kind[1], depth + 1)
            elif tag == "union":
                if utype == 0:
                    continue
                if utype not in kind[1]:
                    self.fail(f"{name}.{field} has unknown union type {utype}", at)
                self.table(self.follow(at), kind[1][utype], depth + 1)


def verify(buf: bytes) -> None:
    """Raise UserError unless `buf` is a FlatBuffers `Model` the reader can walk safely."""
    w = _Walk(buf)
    if len(buf) < 8:
        w.fail(f"payload of {len(buf)} bytes is too short for a FlatBuffers root table", 0)
    w.table(w.follow(0), "Model", 0)

"""The .espdl format layer: schema, verifier, reader, writer, per-target filter layouts.

Expected values come from outside the code under test: ESP-PPQ's own `.info` dumps of its
fixtures, the float ONNX weights quantized by hand, the fixture bytes read through the raw
generated accessors, and small hand-written byte orders.
"""

from __future__ import annotations

import ast
import re
import struct
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from espstream.errors import UserError
from espstream.espdl import layout, read, write
from espstream.espdl.fbs.Model import Model
from espstream.espdl.fbs.TensorTypeAndShape import TensorTypeAndShape
from espstream.espdl.reader import payload
from espstream.espdl.verifier import SCHEMA
from espstream.intgraph import IntGraph, Node, Tensor, ValueInfo

DATA = Path(__file__).parent / "data" / "esp-ppq"
MODELS = ("tutorial_tcn", "stream_tcn")
TARGETS = ("c", "esp32s3", "esp32p4")
FIXTURES = sorted(DATA.glob("*/*/*.espdl"))
IDS = [f"{p.parent.parent.name}-{p.parent.name}-{p.stem}" for p in FIXTURES]
SCHEMA_FBS = Path(__file__).parent.parent / "espstream" / "espdl" / "schema.fbs"

_cache: dict[Path, IntGraph] = {}


def fixture_graph(path: Path) -> IntGraph:
    if path not in _cache:
        _cache[path] = read(path.read_bytes())
    return _cache[path]


# ---- the schema ------------------------------------------------------------------------------


def _fbs_tables() -> dict[str, list[tuple[str, str]]]:
    text = re.sub(r"//[^\n]*", "", SCHEMA_FBS.read_text())
    out = {}
    for name, body in re.findall(r"table\s+(\w+)\s*\{(.*?)\}", text, re.S):
        out[name] = re.findall(r"(\w+)\s*:\s*([^;]+);", body)
    return out


def _kind_of(fbs_type: str, structs: dict[str, int], enums: dict[str, int]) -> tuple:
    scalars = {"int8": 1, "uint8": 1, "int32": 4, "int64": 8, "float": 4, "uint64": 8,
               "double": 8}
    t = fbs_type.strip()
    if t.startswith("["):
        inner = t[1:-1].strip()
        if inner == "string":
            return ("vecstr",)
        if inner in scalars:
            return ("vec", scalars[inner])
        if inner in structs:
            return ("vec", structs[inner])
        return ("vectab", inner)
    if t == "string":
        return ("str",)
    if t in scalars:
        return ("scalar", scalars[t])
    if t in enums:
        return ("scalar", enums[t])
    if t in structs:
        return ("struct", structs[t])
    if t == "TypeInfoValue":
        return ("union",)
    return ("tab", t)


def test_verifier_schema_matches_schema_fbs():
    structs = {"AttributeF": 4, "AttributeI": 8, "AlignedBytes": 16}
    enums = {"AttributeType": 4, "TensorDataType": 4, "DataLocation": 4, "Version": 4,
             "DimensionValueType": 1}
    tables = _fbs_tables()
    assert set(tables) == set(SCHEMA)
    for name, fields in tables.items():
        expected = []
        for fname, ftype in fields:
            kind = _kind_of(ftype, structs, enums)
            if kind == ("union",):  # a union field takes two slots: its type, then its value
                expected += [(f"{fname}_type", ("utype",)), (fname, ("union",))]
            else:
                expected.append((fname, kind))
        got = [(f, k[:1] if k[0] == "union" else k) for f, k in SCHEMA[name]]
        assert got == expected, name


def test_generated_accessors_work_with_the_flatbuffers_runtime():
    import flatbuffers

    assert int(flatbuffers.__version__.split(".")[0]) >= 24
    m = Model.GetRootAs(payload(FIXTURES[0].read_bytes()), 0)
    assert m.Graph().Name() == b"main_graph"


# ---- reading: against ESP-PPQ's own .info dumps ------------------------------------------------


def _array_values(text: str) -> list:
    body = text[text.index("[") + 1:text.rindex("]")]
    return [ast.literal_eval(x) for x in re.findall(r"-?\d+(?:\.\d*)?(?:e[+-]?\d+)?", body)]


def parse_info(path: Path) -> dict:
    """ESP-PPQ's .info dump: nodes, initializer headers and values, value infos, test values."""
    text = path.read_text()
    info: dict = {"nodes": [], "tensors": {}, "value_infos": {}, "tests": {}}
    graph = text[text.index(") {") + 3:text.index("\n}\n")]
    for line in graph.strip().splitlines():
        line = line.strip()
        if not line or line.startswith("return "):
            continue
        m = re.match(r"(.+?) = (\w+)\[(.*)\]\((.*)\)$", line)
        if not m:
            m2 = re.match(r"(.+?) = (\w+)\((.*)\)$", line)
            assert m2, line
            outs, op, attrs, ins = m2.group(1), m2.group(2), "", m2.group(3)
        else:
            outs, op, attrs, ins = m.groups()
        parsed = {}
        for part in re.split(r", (?=\w+ = )", attrs) if attrs else []:
            k, v = part.split(" = ", 1)
            parsed[k] = ast.literal_eval(v)
        info["nodes"].append({
            "op": op,
            "outputs": [s.strip().lstrip("%") for s in outs.split(",")],
            "inputs": [s.strip().lstrip("%") for s in ins.split(", ")] if ins else [],
            "attrs": parsed,
        })
    section = None
    current = None
    for line in text[text.index("\n}\n"):].splitlines():
        if line.startswith("initializers value:"):
            section = "tensors"
        elif line.startswith("values info:"):
            section = "value_infos"
        elif line.startswith("test inputs value:") or line.startswith("test outputs value:"):
            section = "tests"
        elif section == "value_infos" and line.startswith("%"):
            m = re.match(r"%(.+)\[(\w+), ([\dx]*)\], exponents: (\[.*\])", line)
            dims = [int(d) for d in m.group(3).split("x")] if m.group(3) else []
            info["value_infos"][m.group(1)] = (m.group(2), dims, ast.literal_eval(m.group(4)))
        elif section in ("tensors", "tests") and line.startswith("%"):
            m = re.match(
                r"%(.+?), shape: (\[.*?\]), exponents: (\[.*?\]),(?: docString: b'(.*)',)?", line)
            current = {"shape": ast.literal_eval(m.group(2)),
                       "exponents": ast.literal_eval(m.group(3)), "doc": m.group(4), "text": ""}
            info[section][m.group(1)] = current
        elif current is not None and section in ("tensors", "tests") and line:
            current["text"] += line
    for t in (*info["tensors"].values(), *info["tests"].values()):
        t["values"] = _array_values(t.pop("text"))
    return info


def _file_order_padded(t: Tensor, g: IntGraph) -> np.ndarray:
    """The tensor's values as the file stores them (blocked, zero-padded to 16 bytes)."""
    fl = layout.layout_of(t.doc_string)
    flat = t.data.reshape(-1)
    if fl is not None:
        use = layout.filter_uses(g.nodes, g.initializers)[t.name]
        flat = layout.pack(t.data, fl, use)
    pad = -flat.nbytes % 16 // t.dtype.itemsize
    return np.concatenate([flat, np.zeros(pad, t.dtype)])


@pytest.mark.parametrize("path", FIXTURES, ids=IDS)
def test_read_matches_esp_ppq_info_dump(path):
    g = fixture_graph(path)
    info = parse_info(path.with_suffix(".info"))

    assert [n.op_type for n in g.nodes] == [n["op"] for n in info["nodes"]]
    for node, expected in zip(g.nodes, info["nodes"], strict=True):
        assert node.outputs == expected["outputs"]
        assert node.inputs == expected["inputs"]
        assert set(node.attrs) == set(expected["attrs"])
        for k, v in expected["attrs"].items():
            assert node.attrs[k] == v, (node.name, k)
            assert type(node.attrs[k]) is type(v) or isinstance(node.attrs[k], float)

    assert set(g.initializers) == set(info["tensors"])
    for name, exp in info["tensors"].items():
        t = g.initializers[name]
        assert list(t.dims) == exp["shape"], name
        assert t.exponents == exp["exponents"], name
        assert t.doc_string == (None if exp["doc"] is None else exp["doc"]), name
        np.testing.assert_array_equal(_file_order_padded(t, g), np.array(exp["values"]),
                                      err_msg=name)

    assert set(g.value_infos) == set(info["value_infos"])
    for name, (dtype, dims, exps) in info["value_infos"].items():
        v = g.value_infos[name]
        assert (v.dtype.name.upper(), v.shape, v.exponents) == (dtype, dims, exps)

    tests = {**g.test_inputs, **g.test_outputs}
    assert set(tests) == set(info["tests"])
    assert ("offline" in path.stem) == bool(tests)
    for name, exp in info["tests"].items():
        t = tests[name]
        assert list(t.dims) == exp["shape"] and t.exponents == exp["exponents"]
        assert t.dtype == np.int8
        np.testing.assert_array_equal(_file_order_padded(t, g), np.array(exp["values"]))


@pytest.mark.parametrize("path", FIXTURES, ids=IDS)
def test_read_fixture_structure(path):
    g = fixture_graph(path)
    # ESP-PPQ records no target; S3 files (blocked, per-tensor) fit esp32p4 as well
    assert g.target == (None if path.parent.name == "esp32s3" else path.parent.name)
    assert g.name == "main_graph" and g.ir_version == 7 and g.metadata == {}
    assert [v.name for v in g.inputs] == ["x"] and [v.name for v in g.outputs] == ["y"]
    assert g.inputs[0].dtype == np.int8 and g.inputs[0].shape[0] == 1
    caches = [n for n in g.nodes if n.op_type == "StreamingCache"]
    assert g.streaming == (path.stem == "streaming") == bool(caches)
    for n in caches:
        assert n.attrs["frame_axis"] == 1 and n.attrs["quant_type"] == "S8"
        assert isinstance(n.attrs["window_size"], int) and n.attrs["window_size"] >= 2
    luts = [n for n in g.nodes if "lut" in n.attrs]
    for n in luts:
        lut = g.initializers[n.attrs["lut"]]
        assert lut.dtype == np.int8 and lut.dims == (256,) and len(lut.exponents) == 1
    if path.parent.parent.name == "tutorial_tcn":
        assert len(luts) == 3
        gemm = next(n for n in g.nodes if n.op_type == "Gemm")
        assert gemm.attrs["alpha"] == 1.0 and isinstance(gemm.attrs["alpha"], float)
    # topological order of a file that is already sorted is the file order
    assert [n.name for n in g.topological_order()] == [n.name for n in g.nodes]


def _onnx_weights(model: str) -> dict[str, np.ndarray]:
    m = onnx.load(str(DATA / model / "model.onnx"))
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


@pytest.mark.parametrize("model", MODELS)
def test_unblocked_filters_agree_across_targets_and_with_onnx(model):
    """c and esp32s3 store the same per-tensor values in two byte orders; once unblocked,
    every filter is identical. esp32p4's per-channel filters equal the ONNX weights quantized
    by hand (round half to even, per output channel), transposed to [W, C, N] / [1, 1, C, N]."""
    c = fixture_graph(DATA / model / "c" / "offline.espdl")
    s3 = fixture_graph(DATA / model / "esp32s3" / "offline.espdl")
    p4 = fixture_graph(DATA / model / "esp32p4" / "offline.espdl")
    filters = layout.filter_uses(c.nodes, c.initializers)
    assert len(filters) >= 7
    for name in filters:
        assert c.initializers[name].exponents == s3.initializers[name].exponents
        np.testing.assert_array_equal(c.initializers[name].data, s3.initializers[name].data)
    checked = 0
    for name, w in _onnx_weights(model).items():
        if name not in filters or name not in p4.initializers:
            continue  # BatchNorm-folded filters have no float twin in the ONNX file
        t = p4.initializers[name]
        e = np.array(t.exponents, dtype=np.float64)
        if w.ndim == 2:  # Gemm weight [N, C] with transB = 1
            q = np.clip(np.rint(w / 2.0 ** e[:, None]), -128, 127)
            expected = q.T[None, None]
        elif filters[name].depthwise:  # [N, 1, W] -> [W, N, 1]
            q = np.clip(np.rint(w / 2.0 ** e[:, None, None]), -128, 127)
            expected = q.transpose(2, 0, 1)
        else:  # [N, C, W] -> [W, C, N]
            q = np.clip(np.rint(w / 2.0 ** e[:, None, None]), -128, 127)
            expected = q.transpose(2, 1, 0)
        np.testing.assert_array_equal(t.data, expected.astype(np.int8), err_msg=name)
        checked += 1
    assert checked >= 3


# ---- writing: compatibility with ESP-PPQ's files and the round trip --------------------------


def raw_dump(data: bytes) -> dict:
    """Everything issue 6 compares, read through the bare generated accessors."""
    assert data[:4] == b"EDL2" and struct.unpack_from("<I", data, 4)[0] == 0
    buf = payload(data)
    m = Model.GetRootAs(buf, 0)
    g = m.Graph()

    def tensor(t):
        o = t._tab.Offset(20)
        start, n = t._tab.Vector(o), t._tab.VectorLen(o) * 16
        return (t.Name(), tuple(t.DimsAsNumpy().tolist()) if t.DimsLength() else (),
                t.DataType(), tuple(t.ExponentsAsNumpy().tolist()), buf[start:start + n],
                t.DocString())

    def attr(a):
        kind = a.AttrType()
        value = {1: lambda: a.F().F(), 2: lambda: a.I().I(),
                 3: lambda: a.SAsNumpy().tobytes(),
                 6: lambda: tuple(a.FloatsAsNumpy().tolist()),
                 7: lambda: tuple(a.IntsAsNumpy().tolist())}[kind]()
        return (a.Name(), kind, value)

    def value_info(v):
        ti = v.ValueInfoType()
        tt = TensorTypeAndShape()
        tt.Init(ti.Value().Bytes, ti.Value().Pos)
        sh = tt.Shape()
        dims = [(sh.Dim(i).Value().DimType(), sh.Dim(i).Value().DimValue())
                for i in range(sh.DimLength())]
        return (v.Name(), ti.ValueType(), tt.ElemType(), dims,
                tuple(v.ExponentsAsNumpy().tolist()))

    return {
        "ir_version": m.IrVersion(),
        "metadata": [(m.MetadataProps(i).Key(), m.MetadataProps(i).Value())
                     for i in range(m.MetadataPropsLength())],
        "graph": g.Name(),
        "nodes": [(n.OpType(), n.Name(), [n.Input(i) for i in range(n.InputLength())],
                   [n.Output(i) for i in range(n.OutputLength())],
                   [attr(n.Attribute(i)) for i in range(n.AttributeLength())])
                  for n in (g.Node(k) for k in range(g.NodeLength()))],
        "initializers": [tensor(g.Initializer(i)) for i in range(g.InitializerLength())],
        "inputs": [value_info(g.Input(i)) for i in range(g.InputLength())],
        "outputs": [value_info(g.Output(i)) for i in range(g.OutputLength())],
        "value_infos": [value_info(g.ValueInfo(i)) for i in range(g.ValueInfoLength())],
        "test_inputs": [tensor(g.TestInputsValue(i)) for i in range(g.TestInputsValueLength())],
        "test_outputs": [tensor(g.TestOutputsValue(i))
                         for i in range(g.TestOutputsValueLength())],
    }


@pytest.mark.parametrize("share_strings", [True, False])
@pytest.mark.parametrize("path", FIXTURES, ids=IDS)
def test_rewrite_keeps_every_tensor_node_and_value_info(path, share_strings):
    original = path.read_bytes()
    ours = write(fixture_graph(path), share_strings=share_strings)
    assert ours[:4] == b"EDL2" and struct.unpack_from("<II", ours, 4) == (0, len(ours) - 16)
    assert len(ours) % 16 == 0
    a, b = raw_dump(original), raw_dump(ours)
    for key in a:
        assert a[key] == b[key], key
    # raw data starts 16-byte aligned in the file
    m = Model.GetRootAs(payload(ours), 0)
    for i in range(m.Graph().InitializerLength()):
        t = m.Graph().Initializer(i)
        assert t._tab.Vector(t._tab.Offset(20)) % 16 == 0


@pytest.mark.parametrize("path", FIXTURES, ids=IDS)
def test_read_write_round_trip_is_exact(path):
    g = fixture_graph(path)
    data = write(g)
    again = read(data)
    assert again == g, again.diff(g)
    assert write(again) == data  # deterministic


def test_file_sizes_against_esp_ppq(capsys):
    rows = []
    for path in FIXTURES:
        theirs = path.stat().st_size
        g = fixture_graph(path)
        shared, plain = len(write(g)), len(write(g, share_strings=False))
        rows.append((path.parent.parent.name, path.parent.name, path.stem, theirs, shared, plain))
        assert shared <= theirs  # sharing strings only removes bytes
        assert abs(plain - theirs) <= 0.05 * theirs
    with capsys.disabled():
        print("\nmodel target file: ESP-PPQ bytes / ours (shared strings) / ours (plain)")
        for r in rows:
            print(f"  {r[0]} {r[1]} {r[2]}: {r[3]} / {r[4]} ({r[4] / r[3]:.1%}) / {r[5]} "
                  f"({r[5] / r[3]:.1%})")


# ---- a hand-made graph with what the fixtures lack --------------------------------------------


def _q(rng, shape, dtype=np.int8):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, size=shape, dtype=dtype)


def synthetic_graph(target: str) -> IntGraph:
    """Unaligned channel counts, int16 (8-channel blocks), 2-D and depthwise filters, MatMul,
    every attribute kind, symbolic dims, metadata and test values."""
    rng = np.random.default_rng(7)
    g = IntGraph(name="synthetic", target=target, metadata={"chunk": "4", "delay": "2"},
                 producer_name="espstream", opset_import=[("", 13)])
    conv_specs = [  # name, dims, group, quant_type, dtype
        ("w2d", (3, 3, 5, 20), 1, "S8", np.int8),
        ("w1d", (3, 7, 18), 1, "S8", np.int8),
        ("wdw", (3, 3, 21, 1), 21, "S8", np.int8),
        ("wdw1", (5, 35, 1), 35, "S8", np.int8),
        ("w16", (1, 3, 12), 1, "S16", np.int16),
        ("w16dw", (3, 11, 1), 11, "S16", np.int16),
    ]
    prev = "x"
    for k, (name, dims, group, qt, dtype) in enumerate(conv_specs):
        use = layout.FilterUse(f"conv{k}", "Conv", group > 1, 16 if qt == "S8" else 8)
        n = dims[-2] if group > 1 else dims[-1]
        g.initializers[name] = Tensor(
            name, _q(rng, dims, dtype), exponents=[-7] if target != "esp32p4" else [-7] * n,
            doc_string=layout.LAYOUT_PREFIX + layout.filter_layout(target, dims, use))
        g.nodes.append(Node("Conv", f"conv{k}", [prev, name], [f"a{k}"], {
            "activation": "Relu", "group": group, "quant_type": qt,
            "pads": [1, 1] if len(dims) == 3 else [1, 1, 1, 1], "strides": [1] * (len(dims) - 2)}))
        prev = f"a{k}"
    gemm_use = layout.FilterUse("fc", "Gemm", False, 16)
    g.initializers["fcw"] = Tensor("fcw", _q(rng, (1, 1, 40, 10)), [-8], layout.LAYOUT_PREFIX
                                   + layout.filter_layout(target, (1, 1, 40, 10), gemm_use))
    g.initializers["fcb"] = Tensor("fcb", _q(rng, (10,), np.int32), [-15], "layout ==> UNK")
    g.nodes.append(Node("Gemm", "fc", [prev, "fcw", "fcb"], ["g"], {
        "alpha": 1.0, "beta": 0.5, "transB": 0, "quant_type": "S8", "activation": "Linear"}))
    mm_use = layout.FilterUse("mm", "MatMul", False, 16)
    g.initializers["mmw"] = Tensor("mmw", _q(rng, (2, 6, 17)), [-6], layout.LAYOUT_PREFIX
                                   + layout.filter_layout(target, (2, 6, 17), mm_use))
    g.nodes.append(Node("MatMul", "mm", ["g", "mmw"], ["m"], {"quant_type": "S8"}))
    g.initializers["lut"] = Tensor("lut", _q(rng, (256,)), [-7])
    g.initializers["scale"] = Tensor("scale", np.array(2.0, np.float32), [0], "layout ==> UNK")
    g.initializers["big"] = Tensor("big", np.array([2**62, -(2**63)], np.int64), [0])
    g.nodes.append(Node("Swish", "act", ["m"], ["s"], {"lut": "lut", "quant_type": "S8"}))
    g.nodes.append(Node("StreamingCache", "cache", ["s"], ["c"], {
        "window_size": 3, "frame_axis": 1, "quant_type": "S8"}, domain="ai.espressif",
        doc_string="keeps 2 frames"))
    g.nodes.append(Node("Custom", "custom", ["c", "", "scale"], ["y", "y2"], {
        "floats": [0.25, -1.5, 3.0], "strings": ["a", "bé"], "empty": [],
        "tensor": Tensor("t", np.arange(6, dtype=np.int16).reshape(2, 3), [-3]),
        "raw": b"\xff\x00", "neg": -(2**40), "f": 0.1}))
    g.inputs = [ValueInfo("x", np.dtype(np.int8), [1, "T", 5], [-5])]
    g.outputs = [ValueInfo("y", np.dtype(np.int8), [1, None, 10], [-4]),
                 ValueInfo("y2", None, None, [])]
    g.value_infos = {v: ValueInfo(v, np.dtype(np.int16), [1, 4, 8], [-9], "doc")
                     for v in ("a0", "a1", "g", "m")}
    g.test_inputs = {"x": Tensor("x", _q(rng, (1, 4, 5)), [-5])}
    g.test_outputs = {"y": Tensor("y", _q(rng, (1, 4, 10), np.int16), [-4])}
    return g


@pytest.mark.parametrize("target", TARGETS)
def test_synthetic_graph_round_trip(target):
    g = synthetic_graph(target)
    data = write(g)
    back = read(data)
    if target == "esp32s3":  # blocked, per-tensor: the file alone cannot tell S3 from P4
        assert back.target is None and back.layout_targets == ("esp32s3", "esp32p4")
        back.target = target
    assert back.diff(g) == []
    assert back == g
    assert back.nodes[-1].attrs["f"] == float(np.float32(0.1))  # FLOAT attributes are 32-bit
    assert back.nodes[-1].attrs["empty"] == []
    blocked = target != "c"
    assert back.initializers["w1d"].layout == ("(N/16)WC16_UNALIGNED" if blocked else "NWC")
    assert back.initializers["w16"].layout == ("(N/8)WC8_UNALIGNED" if blocked else "NWC")
    assert back.initializers["wdw"].layout == ("(N/16)HWC16_UNALIGNED" if blocked else "HWCN")


def _raw_of(data: bytes, name: str) -> bytes:
    for t in raw_dump(data)["initializers"]:
        if t[0] == name.encode():
            return t[4]
    raise KeyError(name)


@pytest.mark.parametrize("target", TARGETS)
def test_filter_bytes_hand_written_orders(target):
    """Tiny filters whose file byte order is written out by hand (value = its logical index)."""
    blocked = target != "c"
    # ordinary 1x1 conv, C = 2, N = 18: value n * 2 + c
    w = np.array([[[[n * 2 + c for n in range(18)] for c in range(2)]]], np.int8)  # [1,1,2,18]
    if blocked:  # block of 16 channels (channel fastest), then the 2 leftover channels N-major
        expected = [n * 2 + c for c in range(2) for n in range(16)] + [32, 33, 34, 35]
    else:  # N H W C
        expected = list(range(36))
    # depthwise 1-D, W = 2, N = 18: value w * 18 + n
    dw = np.arange(36, dtype=np.int8).reshape(2, 18, 1)
    if blocked:
        expected_dw = [w_ * 18 + n for w_ in range(2) for n in range(16)] + [16, 17, 34, 35]
    else:
        expected_dw = list(range(36))
    # int16 ordinary 1-D, W = 1, C = 1, N = 9: blocks of 8
    w16 = np.arange(9, dtype=np.int16).reshape(1, 1, 9)
    g = IntGraph("tiny", target=target)
    for name, arr, group, qt in (("w", w, 1, "S8"), ("dw", dw, 18, "S8"), ("w16", w16, 1, "S16")):
        use = layout.filter_uses([Node("Conv", "n", ["x", "w"], ["y"], {"group": group,
                                                                       "quant_type": qt})],
                                 {"w": Tensor("w", arr)})["w"]
        doc = layout.LAYOUT_PREFIX + layout.filter_layout(target, arr.shape, use)
        n_out = arr.shape[-2] if group > 1 else arr.shape[-1]
        exps = [0] * n_out if target == "esp32p4" else [0]  # how the reader tells P4 from S3
        g.initializers[name] = Tensor(name, arr, exps, doc)
        g.nodes.append(Node("Conv", f"conv_{name}", ["x", name], [f"y_{name}"],
                            {"group": group, "quant_type": qt}))
    data = write(g)
    assert list(np.frombuffer(_raw_of(data, "w"), np.int8)[:36]) == expected
    assert list(np.frombuffer(_raw_of(data, "dw"), np.int8)[:36]) == expected_dw
    assert list(np.frombuffer(_raw_of(data, "w16"), "<i2")[:9]) == list(range(9))
    back = read(data)
    assert back.target == (None if target == "esp32s3" else target)  # S3 or P4: not told
    back.target = target
    assert back == g


@settings(max_examples=150, deadline=None)
@given(
    op=st.sampled_from(["conv1d", "conv2d", "dw1d", "dw2d", "gemm", "matmul"]),
    h=st.integers(1, 3), w=st.integers(1, 4), c=st.integers(1, 5), n=st.integers(1, 40),
    align=st.sampled_from([0, 8, 16]), seed=st.integers(0, 2**16),
)
def test_pack_unpack_are_inverse_permutations(op, h, w, c, n, align, seed):
    dims = {"conv1d": (w, c, n), "conv2d": (h, w, c, n), "dw1d": (w, n, 1), "dw2d": (h, w, n, 1),
            "gemm": (1, 1, c, n), "matmul": (h, c, n)}[op]
    kind = {"gemm": "Gemm", "matmul": "MatMul"}.get(op, "Conv")
    use = layout.FilterUse("node", kind, op.startswith("dw"), align or 16)
    spatial = 1 if op in ("conv1d", "dw1d") else 2
    fl = layout.FilterLayout("x", spatial, align, None)
    data = np.arange(int(np.prod(dims)), dtype=np.int32).reshape(dims)
    data = np.random.default_rng(seed).permutation(data.ravel()).reshape(dims)
    flat = layout.pack(data, fl, use)
    assert flat.shape == (data.size,)
    assert np.array_equal(np.sort(flat), np.sort(data.ravel()))  # a permutation
    np.testing.assert_array_equal(layout.unpack(flat, dims, fl, use), data)


# ---- writer refusals -----------------------------------------------------------------------------


def test_writer_refuses_inconsistent_graphs():
    g = synthetic_graph("esp32s3")
    g.target = "c"  # blocked doc strings on the plain target
    with pytest.raises(UserError, match="not a c layout"):
        write(g)
    g = synthetic_graph("c")
    g.initializers["w2d"].doc_string = None
    with pytest.raises(UserError, match="no layout doc string"):
        write(g)
    g.initializers["w2d"].doc_string = None
    assert layout.annotate_filters(g) == ["w2d"] and read(write(g)) == synthetic_graph("c")
    g.initializers["w2d"].exponents = [-7, -7]
    with pytest.raises(UserError, match="one per output channel"):
        write(g)
    g = synthetic_graph("c")
    g.nodes[-1].attrs["bad"] = {"a": 1}
    with pytest.raises(UserError, match="cannot be written"):
        write(g)
    g = synthetic_graph("c")
    g.initializers["lut"].name = "other"
    with pytest.raises(UserError, match="stored under 'lut'"):
        write(g)
    g = synthetic_graph("c")
    g.target = "esp32x9"
    with pytest.raises(UserError, match="unknown target"):
        write(g)
    g = synthetic_graph("c")
    g.initializers["wdw"].data = np.zeros((3, 3, 21, 2), np.int8)  # grouped, not depthwise
    with pytest.raises(UserError, match="depthwise"):
        write(g)


# ---- IntGraph helpers ---------------------------------------------------------------------------


def test_intgraph_lookups_and_order():
    g = fixture_graph(DATA / "tutorial_tcn" / "esp32s3" / "streaming.espdl")
    prod, cons = g.producers(), g.consumers()
    for n in g.nodes:
        for o in n.outputs:
            assert prod[o] is n
        for i in n.inputs:
            assert n in cons[i]
    assert g.exponents("x") == [-5] and g.value_info("y").exponent == g.outputs[0].exponent
    assert g.node("/pre/Conv").op_type == "Conv"
    shuffled = IntGraph(g.name, nodes=list(reversed(g.nodes)))
    order = shuffled.topological_order()
    position = {n.name: k for k, n in enumerate(order)}
    for n in order:
        for i in n.inputs:
            if i in prod:
                assert position[prod[i].name] < position[n.name]
    cyclic = IntGraph("c", nodes=[Node("Add", "a", ["q"], ["p"]), Node("Add", "b", ["p"], ["q"])])
    with pytest.raises(UserError, match="cycle"):
        cyclic.topological_order()


def test_intgraph_equality_is_exact():
    g = synthetic_graph("esp32p4")
    h = read(write(g))
    assert g == h
    h.initializers["w2d"].data[0, 0, 0, 0] ^= 1
    assert g != h and any("values differ" in d for d in g.diff(h))
    h = read(write(g))
    h.value_infos["a0"].exponents = [-8]
    assert g != h


# ---- hostile input -------------------------------------------------------------------------------

GOOD = (DATA / "tutorial_tcn" / "esp32s3" / "offline.espdl").read_bytes()


def _with_header(body: bytes, mode: int = 0, length: int | None = None,
                 magic: bytes = b"EDL2") -> bytes:
    return struct.pack("<4sIII", magic, mode, len(body) if length is None else length, 0) + body


def _user_error(data: bytes, match: str) -> None:
    with pytest.raises(UserError, match=match) as e:
        read(data)
    assert "\n" not in str(e.value)


def _patch(data: bytes, at: int, value: int, fmt: str = "<I") -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _raw_positions() -> tuple[int, int, int]:
    """(vector header offset in the file, dims vector offset, a string offset) in GOOD."""
    buf = payload(GOOD)
    t = Model.GetRootAs(buf, 0).Graph().Initializer(0)
    raw = t._tab.Vector(t._tab.Offset(20)) - 4
    dims = t._tab.Vector(t._tab.Offset(4)) - 4
    name_field = t._tab.Pos + t._tab.Offset(16)
    name = name_field + struct.unpack_from("<I", buf, name_field)[0]
    return raw + 16, dims + 16, name + 16


def test_hostile_headers():
    body = GOOD[16:]
    _user_error(b"", "shorter than its 16-byte header")
    _user_error(GOOD[:10], "shorter than its 16-byte header")
    _user_error(b"\x89PNG" + GOOD[4:], r"not an \.espdl file: magic")
    _user_error(_with_header(body, magic=b"EDL1"), "EDL1")
    _user_error(_with_header(body, magic=b"PDL2"), "packed file")
    _user_error(_with_header(body, mode=1), "wrong key|give its key with --key")
    _user_error(_with_header(body, mode=7), "unknown .espdl mode 7")
    _user_error(_with_header(body, length=len(body) + 16), "truncated")
    _user_error(_with_header(body, length=0xFFFFFFFF), "truncated")
    _user_error(_with_header(body, length=len(body) - 64), "bytes after it")
    _user_error(GOOD[:-1000], "truncated")
    _user_error(_with_header(b"\0" * 4), "too short")


def test_hostile_payloads():
    length = struct.unpack_from("<I", GOOD, 8)[0]
    raw_at, dims_at, name_at = _raw_positions()
    cases = {
        # a payload cut short, with the length field made to match it
        "cut": _with_header(GOOD[16:16 + length // 2]),
        "root outside": _patch(GOOD, 16, 0xFFFFFFF0),
        "root past end": _patch(GOOD, 16, length - 2),
        "huge raw_data vector": _patch(GOOD, raw_at, 0x7FFFFFFF),
        "huge dims vector": _patch(GOOD, dims_at, 0x10000000),
        "huge string": _patch(GOOD, name_at, 0x7FFFFFF0),
        "huge dims value": _patch(GOOD, dims_at + 4, 1 << 30, "<q"),
        "negative dim": _patch(GOOD, dims_at + 4, -3, "<q"),
        "absurd dim": _patch(GOOD, dims_at + 4, 1 << 40, "<q"),
        "bad utf-8": _patch(GOOD, name_at + 4, 0xFF, "<B"),
    }
    expected = {
        "cut": "corrupt .espdl payload", "root outside": "outside the payload",
        "root past end": "corrupt .espdl payload", "huge raw_data vector": "runs past the end",
        "huge dims vector": "runs past the end", "huge string": "runs past the end",
        "huge dims value": "need .* bytes", "absurd dim": "impossible dimension",
        "negative dim": "impossible dimension",
        "bad utf-8": "not UTF-8",
    }
    for key, data in cases.items():
        start = time.perf_counter()
        _user_error(data, expected[key])
        assert time.perf_counter() - start < 1.0, key


def test_shared_subtables_cannot_multiply_the_work():
    """A node vector whose 50,000 entries all point at one node: small file, huge tree."""
    import flatbuffers

    import espstream.espdl.fbs.Attribute as A
    import espstream.espdl.fbs.Graph as G
    import espstream.espdl.fbs.Model as M
    import espstream.espdl.fbs.Node as N

    b = flatbuffers.Builder(1024)
    attrs = []
    for k in range(8):
        s = b.CreateString(f"attr{k}")
        A.AttributeStart(b)
        A.AttributeAddName(b, s)
        A.AttributeAddAttrType(b, 3)
        attrs.append(A.AttributeEnd(b))
    N.NodeStartAttributeVector(b, len(attrs))
    for a in reversed(attrs):
        b.PrependUOffsetTRelative(a)
    av = b.EndVector()
    op = b.CreateString("Relu")
    N.NodeStart(b)
    N.NodeAddOpType(b, op)
    N.NodeAddAttribute(b, av)
    node = N.NodeEnd(b)
    G.GraphStartNodeVector(b, 50000)
    for _ in range(50000):
        b.PrependUOffsetTRelative(node)
    nodes = b.EndVector()
    G.GraphStart(b)
    G.GraphAddNode(b, nodes)
    graph = G.GraphEnd(b)
    M.ModelStart(b)
    M.ModelAddGraph(b, graph)
    b.Finish(M.ModelEnd(b))
    body = bytes(b.Output())
    start = time.perf_counter()
    _user_error(_with_header(body + b"\0" * (-len(body) % 16), length=len(body)), "too many")
    assert time.perf_counter() - start < 2.0


def test_reader_refuses_unsupported_content():
    g = synthetic_graph("c")
    g.nodes.append(Node("Foo", "foo", ["x"], ["z"], {"k": 1}))
    data = bytearray(write(g))
    # turn the INT attribute 'k' into a GRAPH attribute: find its attr_type field via accessors
    m = Model.GetRootAs(payload(bytes(data)), 0)
    n = m.Graph().Node(m.Graph().NodeLength() - 1)
    a = n.Attribute(0)
    at = a._tab.Pos + a._tab.Offset(10)  # attr_type, slot 3
    struct.pack_into("<i", data, 16 + at, 5)
    _user_error(bytes(data), "attribute type GRAPH is not supported")


# ---- fuzzing a real fixture -------------------------------------------------------------------


def _structure_positions() -> list[int]:
    """File offsets of GOOD that are not tensor data (flipping those exercises the verifier)."""
    buf = payload(GOOD)
    g = Model.GetRootAs(buf, 0).Graph()
    in_raw = np.zeros(len(GOOD), bool)
    tensors = [g.Initializer(i) for i in range(g.InitializerLength())]
    tensors += [g.TestInputsValue(0), g.TestOutputsValue(0)]
    for t in tensors:
        o = t._tab.Offset(20)
        s = t._tab.Vector(o)
        in_raw[16 + s:16 + s + 16 * t._tab.VectorLen(o)] = True
    return [int(i) for i in np.flatnonzero(~in_raw)]


STRUCTURE = _structure_positions()


def _read_or_user_error(data: bytes) -> None:
    start = time.perf_counter()
    try:
        g = read(data)
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(g, IntGraph)
    assert time.perf_counter() - start < 1.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.sampled_from(STRUCTURE), st.integers(1, 255)),
                      min_size=1, max_size=4))
def test_fuzz_flipped_structure_bytes(flips):
    data = bytearray(GOOD)
    for at, x in flips:
        data[at] ^= x
    _read_or_user_error(bytes(data))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(at=st.integers(0, len(GOOD) - 1), x=st.integers(1, 255))
def test_fuzz_flipped_bytes_anywhere(at, x):
    data = bytearray(GOOD)
    data[at] ^= x
    _read_or_user_error(bytes(data))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, len(GOOD) - 1), fix_length=st.booleans())
def test_fuzz_truncated(cut, fix_length):
    data = GOOD[:cut]
    if fix_length and cut >= 16:
        data = _patch(data, 8, cut - 16)
    _read_or_user_error(data)

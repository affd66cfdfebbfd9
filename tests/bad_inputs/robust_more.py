"""More of issue 18's classes as bad-input cases (imported by make.py), each class through every
command that reads the file:

- forged `espstream.*` metadata (invalid JSON, wrong types, out-of-range values, missing keys,
  state pairs naming no graph input / output, JSON nested too deep) in streaming and QDQ ONNX
  models, float models and streaming `.espdl` files;
- `.espdl` graphs corrupted where the FlatBuffers stay valid (a StreamingCache without input, a
  window of 2^40 or 0, a frame axis past the rank, a node without output, an input of 2^30
  elements), and every corrupt `.espdl` as the streaming half of `verify A B`;
- ONNX files declaring dimensions no array can have (2^40, -5, 2^31) in inputs, outputs and
  initializers, sparse initializers, and kernels that do not fit their input (the model fails
  in onnxruntime) met by calibrate / convert;
- names with newlines and escape characters (the one line shows them escaped), and device
  nodes as outputs of a failing command (the node stays a node).
File names start with `m_` (made from the stages' outputs, like `tiny.espdl`).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

DEEP = "[" * 5000 + "]" * 5000

# (key, tag, value or None to remove the key, message fragment)
STREAM_FORGERIES = [
    ("chunk", "bad_json", "{", "metadata espstream.chunk is not valid JSON"),
    ("chunk", "string", '"2"', "metadata espstream.chunk is not an integer"),
    ("chunk", "zero", "0", "metadata espstream.chunk is not an integer between 1 and"),
    ("chunk", "negative", "-3", "metadata espstream.chunk is not an integer between 1 and"),
    ("chunk", "huge", str(2**40), "metadata espstream.chunk is not an integer between 1 and"),
    ("chunk", "missing", None, "metadata espstream.chunk is missing"),
    ("time_axes", "list", "[2]", "metadata espstream.time_axes is not a JSON object"),
    ("time_axes", "bad_json", '{"x": 2', "metadata espstream.time_axes is not valid JSON"),
    ("time_axes", "axis_string", '{"x": "2", "y": 2}', "metadata espstream.time_axes is not"),
    ("time_axes", "axis_past_rank", '{"x": 7, "y": 2}', "axis 7 of 'x' is out of range"),
    ("time_axes", "deep", DEEP, "metadata espstream.time_axes is not JSON nested at most 64"),
    ("states", "object", "{}", "metadata espstream.states is not a JSON list"),
    ("states", "single", '[["x"]]', "metadata espstream.states is not a JSON list of"),
    ("states", "integers", "[[1, 2]]", "metadata espstream.states is not a JSON list of"),
    ("states", "unknown_names", '[["nope", "nada"]]',
     "the state pair ['nope', 'nada'] does not name a graph input and a graph output"),
    ("delay", "list", "[1]", "metadata espstream.delay is not a JSON object"),
    ("delay", "negative", '{"y": -1}', "metadata espstream.delay is not a JSON object"),
    ("delay", "null", "null", "metadata espstream.delay is not a JSON object"),
    ("warmup", "string", '"all"', "metadata espstream.warmup is not a JSON object"),
    ("warmup", "huge", '{"y": 1099511627777}', "metadata espstream.warmup is not a JSON object"),
]
QDQ_FORGERIES = [
    ("target", "unknown", "esp99", "metadata espstream.target is not one of"),
    ("bits", "twelve", "12", "metadata espstream.bits is not one of 8, 16"),
    ("rounding", "odd", "odd", "metadata espstream.rounding is not one of"),
    ("per_channel", "yes", "yes", "metadata espstream.per_channel is not one of"),
    ("percentile", "nan", "nan", "metadata espstream.percentile is not a finite number"),
    ("int16", "object", '{"conv1": 1}', "metadata espstream.int16 is not a JSON list"),
    ("gate_exponents", "string", '{"g": "x"}', "metadata espstream.gate_exponents is not"),
    ("stage", "list", "[0]", "metadata espstream.stage is not a JSON object"),
    ("stage", "index_past_count", '{"index": 5, "count": 2}',
     "metadata espstream.stage is not a JSON object {index, count, ...}"),
    ("chunk", "string_on_offline", '"x"', "metadata espstream.chunk is not an integer"),
]
FLOAT_FORGERIES = [
    ("chunk", "float", "1.5", "metadata espstream.chunk is not an integer"),
    ("bits", "empty", "", "metadata espstream.bits is not one of 8, 16"),
    ("states", "bad_json", "[[", "metadata espstream.states is not valid JSON"),
]
ESPDL_FORGERIES = [
    ("chunk", "string", '"2"', "metadata espstream.chunk is not an integer"),
    ("chunk", "zero", "0", "metadata espstream.chunk is not an integer between 1 and"),
    ("chunk", "missing", None, "metadata espstream.chunk is missing"),
    ("time_axes", "list", "[1]", "metadata espstream.time_axes is not a JSON object"),
    ("time_axes", "axis_past_rank", '{"x": 9, "y": 1}', "axis 9 of 'x' is out of range"),
    ("delay", "list", "[0]", "metadata espstream.delay is not a JSON object"),
    ("warmup", "bad_json", "{", "metadata espstream.warmup is not valid JSON"),
    ("recurrent_states", "integers", "[[1, 2]]",
     "metadata espstream.recurrent_states is not a JSON list"),
    ("recurrent_states", "unknown_names", '[{"input": "h", "output": "h_out"}]',
     "the state pair ['h', 'h_out'] does not name a graph input and a graph output"),
    ("layout", "not_permutation", '{"x": [0, 0, 1]}',
     "metadata espstream.layout is not a JSON object of axis permutations"),
    ("layout", "string", '"NWC"', "metadata espstream.layout is not a JSON object"),
    ("target", "unknown", "esp8266", "metadata espstream.target is not one of"),
]


def _forge_onnx(data: bytes, key: str, value: str | None) -> bytes:
    m = onnx.load_from_string(data)
    key = f"espstream.{key}"
    keep = [p for p in m.metadata_props if p.key != key]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    if value is not None:
        m.metadata_props.add(key=key, value=value)
    return m.SerializeToString()


def _forge_espdl(data: bytes, key: str, value: str | None) -> bytes:
    from espstream import espdl

    g = espdl.read(data)
    key = f"espstream.{key}"
    g.metadata.pop(key, None)
    if value is not None:
        g.metadata[key] = value
    return espdl.write(g)


def _espdl_edit(data: bytes, edit) -> bytes:
    from espstream import espdl

    g = espdl.read(data)
    edit(g)
    return espdl.write(g)


def _cache(g):
    return next(n for n in g.nodes if n.op_type == "StreamingCache")


def _cache_no_input(g):
    _cache(g).inputs = []


def _window(v):
    def f(g):
        _cache(g).attrs["window_size"] = v
    return f


def _frame_axis(g):
    _cache(g).attrs["frame_axis"] = 99


def _no_output(g):
    g.nodes[1].outputs = []


def _activation_bytes(g):
    next(n for n in g.nodes if n.op_type == "Conv").attrs["activation"] = b"\xff\xfe"


def _input_no_shape(g):
    g.inputs[0].shape = None


def _input_open_dim(g):
    g.inputs[0].shape = [1, None, 4]


def _exponent_huge(g):
    w = g.initializers["conv1_w"]
    w.exponents = [2**40] * len(w.exponents)


def _huge_input(g):
    g.inputs[0].shape = [2, 1 << 15, 1 << 15]


def _onnx_window(data: bytes, name: str, value: int) -> bytes:
    m = onnx.load_from_string(data)
    n = next(n for n in m.graph.node if n.op_type == "StreamingCache")
    next(a for a in n.attribute if a.name == name).i = value
    return m.SerializeToString()


ONNX_WINDOWS = [("window_size", 2**40, "window_size 1099511627776 is not between 1 and"),
                ("window_size", 2**31, "window_size 2147483648 is not between 1 and"),
                ("window_size", 0, "window_size 0 is not between 1 and"),
                ("axis", 99, "axis 99 is not between 0 and 63")]


def _onnx_dims(data: bytes, where: str, value: int) -> bytes:
    m = onnx.load_from_string(data)
    if where == "input":
        m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = value
    elif where == "output":
        m.graph.output[0].type.tensor_type.shape.dim[2].dim_value = value
    else:
        m.graph.initializer.append(onnx.TensorProto(name="unused", data_type=1,
                                                    dims=[value, 0]))
    return m.SerializeToString()


def _sparse(data: bytes, name: str = "conv1_b") -> bytes:
    """conv1's bias stored as a sparse initializer."""
    m = onnx.load_from_string(data)
    b = next(t for t in m.graph.initializer if t.name == name)
    a = numpy_helper.to_array(b)
    m.graph.initializer.remove(b)
    idx = np.flatnonzero(a).astype(np.int64)
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(a[idx], name), numpy_helper.from_array(idx), list(a.shape)))
    return m.SerializeToString()


def _channels_wrong(data: bytes) -> bytes:
    """The input declares 1024 channels where conv1 takes 4: passes onnx.checker, fails in
    onnxruntime once it runs."""
    m = onnx.load_from_string(data)
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1024
    return m.SerializeToString()


def _node_named(data: bytes, name: str) -> bytes:
    m = onnx.load_from_string(data)
    old = m.graph.node[-1].name
    m.graph.node[-1].name = name
    for n in m.graph.node:
        assert n.name != name or n is m.graph.node[-1], old
    return m.SerializeToString()


def _npy_header(shape) -> bytes:
    from robust_cases import _npy_header as header

    return header(shape)


def _zip(members: dict[str, bytes]) -> bytes:
    from robust_cases import _zip as z

    return z(members)


def files(valid: dict[str, bytes]) -> dict[str, bytes]:
    from espstream.export import export_model
    from espstream.stream.streamify import streamify_model

    qdq = onnx.load_from_string(valid["tiny.qdq.onnx"])
    stream = streamify_model(qdq, 2).model.SerializeToString()
    stream_espdl = export_model(onnx.load_from_string(stream), test_random=True).data
    out = {"m_stream.onnx": stream, "m_stream_1.onnx": valid["tiny.qdq.onnx"],
           "m_stream.espdl": stream_espdl}
    for key, tag, value, _ in STREAM_FORGERIES:
        out[f"m_stream_{key}_{tag}.onnx"] = _forge_onnx(stream, key, value)
    for name, value, _ in ONNX_WINDOWS:
        out[f"m_stream_{name}_{value}.onnx"] = _onnx_window(stream, name, value)
    for key, tag, value, _ in QDQ_FORGERIES:
        out[f"m_qdq_{key}_{tag}.onnx"] = _forge_onnx(valid["tiny.qdq.onnx"], key, value)
    for key, tag, value, _ in FLOAT_FORGERIES:
        out[f"m_float_{key}_{tag}.onnx"] = _forge_onnx(valid["tiny.onnx"], key, value)
    for key, tag, value, _ in ESPDL_FORGERIES:
        out[f"m_espdl_{key}_{tag}.espdl"] = _forge_espdl(stream_espdl, key, value)
    for tag, edit in ESPDL_EDITS.items():
        out[f"m_espdl_{tag}.espdl"] = _espdl_edit(stream_espdl, edit[0])
    for tag, edit in (("input_no_shape", _input_no_shape), ("input_open_dim", _input_open_dim)):
        out[f"m_espdl_{tag}.espdl"] = _espdl_edit(stream_espdl, edit)
    for where, value, _ in DIMS:
        out[f"m_dims_{where}_{value}.onnx"] = _onnx_dims(valid["tiny.onnx"], where, value)
    out["m_sparse.onnx"] = _sparse(valid["tiny.onnx"])
    out["m_sparse.qdq.onnx"] = _sparse(valid["tiny.qdq.onnx"], "conv1_b_quantized")
    out["m_channels_wrong.onnx"] = _channels_wrong(valid["tiny.onnx"])
    out["m_softmax_named_newline.onnx"] = _node_named(valid["softmax_time.onnx"],
                                                      "soft\nmax\x1b[31m")
    out["m_npy_negative.npy"] = _npy_header((-1, 4, 16))
    out["m_npy_negative_inner.npy"] = _npy_header((3, -4, 16))
    out["m_npz_negative.npz"] = _zip({"x.npy": _npy_header((3, 4, -16))})
    out["m_overrides_newline.json"] = json.dumps(
        {"tensors": {"h\nnext": {"window": 0}}}).encode()
    return out


ESPDL_EDITS = {
    "cache_no_input": (_cache_no_input, "has 0 input(s) and 1 output(s)"),
    "window_2_40": (_window(2**40), "window_size 1099511627776 is not between 1 and"),
    "window_zero": (_window(0), "window_size 0 is not between 1 and"),
    "frame_axis_99": (_frame_axis, "frame_axis 99 is out of range for its input's rank 3"),
    "node_no_output": (_no_output, "has a missing output"),
    "exponent_2_40": (_exponent_huge, "initializer 'conv1_w': exponent 1099511627776 is out of "
                      "range (-127..127)"),
    "activation_not_text": (_activation_bytes, "attribute 'activation' of node 'conv1' (Conv) "
                            "is not UTF-8 text"),
    "input_2_31": (_huge_input, "graph input 'x': shape (2, 32768, 32768) holds 2147483648"),
}
DIMS = [
    ("input", 2**40, "input 'x' declares dimension 1099511627776"),
    ("input", -5, "input 'x' declares dimension -5"),
    ("input", 2**31, "input 'x' declares dimension 2147483648"),
    ("output", 2**40, "output 'y' declares dimension 1099511627776"),
    ("initializer", 2**40, "initializer 'unused' declares dims [1099511627776, 0]"),
]


def _c(id, args, message, output="{out}/o"):
    # split on spaces only: some names hold a newline
    return {"id": f"m_{id}", "args": [a for a in args.split(" ") if a], "exit": 2,
            "message": message, "output": output}


def cases() -> list[dict]:
    out = []
    for key, tag, _, msg in STREAM_FORGERIES:
        f = f"{{in}}/m_stream_{key}_{tag}.onnx"
        t = f"stream_{key}_{tag}"
        out += [
            _c(f"export_{t}", f"export {f} -o {{out}}/o", msg),
            _c(f"verify_{t}", f"verify {{in}}/tiny.qdq.onnx {f} --random 1", msg, None),
            _c(f"inspect_{t}", f"inspect {f}", msg, None),
            _c(f"streamify_{t}", f"streamify {f} --chunk 2 -o {{out}}/o", msg),
        ]
    for name, value, msg in ONNX_WINDOWS:  # a StreamingCache node's window / axis forged
        f = f"{{in}}/m_stream_{name}_{value}.onnx"
        t = f"stream_{name}_{value}"
        out += [
            _c(f"export_{t}", f"export {f} -o {{out}}/o", msg),
            _c(f"verify_{t}", f"verify {{in}}/tiny.qdq.onnx {f} --random 1", msg, None),
            _c(f"verify_int8_{t}", f"verify {{in}}/tiny.qdq.onnx {f} --random 1 --engine int8",
               msg, None),
            _c(f"inspect_{t}", f"inspect {f}", msg, None),
        ]
    for key, tag, _, msg in QDQ_FORGERIES:
        f = f"{{in}}/m_qdq_{key}_{tag}.onnx"
        t = f"qdq_{key}_{tag}"
        out += [
            _c(f"export_{t}", f"export {f} -o {{out}}/o", msg),
            _c(f"streamify_{t}", f"streamify {f} --chunk 2 -o {{out}}/o", msg),
            _c(f"inspect_{t}", f"inspect {f}", msg, None),
            _c(f"verify_{t}", f"verify {f} --chunks 2 --random 1", msg, None),
        ]
    for key, tag, _, msg in FLOAT_FORGERIES:
        f = f"{{in}}/m_float_{key}_{tag}.onnx"
        t = f"float_{key}_{tag}"
        out += [
            _c(f"optimize_{t}", f"optimize {f} -o {{out}}/o", msg),
            _c(f"calibrate_{t}", f"calibrate {f} --random 2 -o {{out}}/o", msg),
            _c(f"convert_{t}", f"convert {f} --random 2 --chunk 2 -o {{out}}/o", msg),
            _c(f"verify_{t}", f"verify {f} --chunks 2 --random 1", msg, None),
        ]
    espdl = [(f"{{in}}/m_espdl_{k}_{t}.espdl", f"espdl_{k}_{t}", msg)
             for k, t, _, msg in ESPDL_FORGERIES]
    espdl += [(f"{{in}}/m_espdl_{t}.espdl", f"espdl_{t}", msg)
              for t, (_, msg) in ESPDL_EDITS.items()]
    for f, t, msg in espdl:
        out += [
            _c(f"inspect_{t}", f"inspect {f}", msg, None),
            _c(f"verify_{t}", f"verify {f}", msg, None),
            _c(f"verify_streaming_half_{t}", f"verify {{in}}/tiny.espdl {f} --random 1", msg,
               None),
            _c(f"app_{t}", f"app {f} -o {{out}}/app --target esp32p4", msg, "{out}/app"),
        ]  # (pack packs bytes as ESP-DL's packer does: it checks headers, not graphs)
    # every corrupt .espdl as the streaming half of `verify A B` (exit 2 as when alone)
    for name, msg in (("espdl_truncated", "truncated .espdl file"),
                      ("espdl_flipped_root", "corrupt .espdl payload"),
                      ("espdl_bias_no_exponent", "has 0 exponents for 8 output channels"),
                      ("espdl_bad_magic", "not an .espdl file"),
                      ("espdl_random", "unknown .espdl mode"),
                      ("espdl_empty", "the file is empty"),
                      ("espdl_header_only", "shorter than its 16-byte header"),
                      ("espdl_length_huge", "announces a 2147483647-byte payload"),
                      ("espdl_pack_bad_hash", "PDL3 SHA-256 mismatch"),
                      ("espdl_encrypted", "is encrypted")):
        out.append(_c(f"verify_streaming_half_{name}",
                      f"verify {{in}}/tiny.espdl {{in}}/{name}.espdl --random 1", msg, None))
        out.append(_c(f"verify_offline_half_{name}",
                      f"verify {{in}}/{name}.espdl {{in}}/m_stream.espdl --random 1", msg, None))
    # (a streaming half without a fixed input shape runs its test values, but not in chunks)
    for tag in ("input_no_shape", "input_open_dim"):
        out.append(_c(f"verify_streaming_half_espdl_{tag}",
                      f"verify {{in}}/tiny.espdl {{in}}/m_espdl_{tag}.espdl --random 1",
                      "graph input 'x' has no fixed shape", None))
    for where, value, msg in DIMS:
        f = f"{{in}}/m_dims_{where}_{value}.onnx"
        t = f"dims_{where}_{value}".replace("-", "minus")
        out += [
            _c(f"optimize_{t}", f"optimize {f} -o {{out}}/o", msg),
            _c(f"calibrate_{t}", f"calibrate {f} --random 2 -o {{out}}/o", msg),
            _c(f"convert_{t}", f"convert {f} --random 2 --chunk 2 -o {{out}}/o", msg),
            _c(f"streamify_{t}", f"streamify {f} --chunk 2 -o {{out}}/o", msg),
            _c(f"verify_{t}", f"verify {f} --chunks 2 --random 1", msg, None),
            _c(f"inspect_{t}", f"inspect {f}", msg, None),
        ]
    sparse = "' is a sparse tensor"
    for st, args in (("optimize", "optimize {in}/m_sparse.onnx -o {out}/o"),
                     ("calibrate", "calibrate {in}/m_sparse.onnx --random 2 -o {out}/o"),
                     ("convert", "convert {in}/m_sparse.onnx --random 2 -o {out}/o"),
                     ("verify", "verify {in}/m_sparse.onnx --chunks 2 --random 1"),
                     ("inspect", "inspect {in}/m_sparse.onnx"),
                     ("streamify", "streamify {in}/m_sparse.qdq.onnx --chunk 2 -o {out}/o"),
                     ("export", "export {in}/m_sparse.qdq.onnx -o {out}/o")):
        out.append(_c(f"{st}_sparse_initializer", args, sparse,
                      None if st in ("verify", "inspect") else "{out}/o"))
    # calibrate meets it in its own runs (guard rule 4); convert in optimize's check
    ort = "m_channels_wrong.onnx: the model is malformed: it does not run in onnxruntime"
    for st, args, msg in (
            ("calibrate", "calibrate {in}/m_channels_wrong.onnx --random 2 -o {out}/o", ort),
            ("calibrate_data", "calibrate {in}/m_channels_wrong.onnx -d {in}/tiny.data.npy -o "
             "{out}/o", "has shape [3, 4, 16], but the model's input 'x' is [1, 1024, 16]"),
            ("convert", "convert {in}/m_channels_wrong.onnx --random 2 --chunk 2 -o {out}/o",
             "the input model fails in onnxruntime"),
            ("convert_offline", "convert {in}/m_channels_wrong.onnx --random 2 -o {out}/o",
             "the input model fails in onnxruntime"),
            ("optimize", "optimize {in}/m_channels_wrong.onnx -o {out}/o",
             "the input model fails in onnxruntime"),
            ("streamify", "streamify {in}/m_channels_wrong.onnx --chunk 2 -o {out}/o",
             "does not run in onnxruntime"),
            ("verify_chunks", "verify {in}/m_channels_wrong.onnx --chunks 2 --random 1",
             "does not run in onnxruntime"),
            ("verify_pair", "verify {in}/m_channels_wrong.onnx {in}/m_stream.onnx --random 1",
             "onnxruntime cannot run the model on this data")):
        out.append(_c(f"{st}_fails_in_onnxruntime", args, msg,
                      None if st.startswith("verify") else "{out}/o"))
    # array headers declaring negative dimensions (numpy's OverflowError / ValueError)
    for name in ("m_npy_negative.npy", "m_npy_negative_inner.npy", "m_npz_negative.npz"):
        t = name.split(".")[0][2:]
        out += [
            _c(f"calibrate_{t}", f"calibrate {{in}}/tiny.onnx -d {{in}}/{name} -o {{out}}/o", name),
            _c(f"convert_{t}", f"convert {{in}}/tiny.onnx -d {{in}}/{name} -o {{out}}/o", name),
            _c(f"export_test_data_{t}",
               f"export {{in}}/tiny.qdq.onnx --test-data {{in}}/{name} -o {{out}}/o", name),
            _c(f"verify_data_{t}", f"verify {{in}}/tiny.onnx --chunks 1 -d {{in}}/{name}", name,
               None),
        ]
    # input names too long for the file system
    long = "{in}/" + "y" * 300
    for st, args, output in (
            ("optimize", f"optimize {long} -o {{out}}/o", "{out}/o"),
            ("inspect", f"inspect {long}", None),
            ("calibrate_data", f"calibrate {{in}}/tiny.onnx -d {long} -o {{out}}/o", "{out}/o"),
            ("streamify_overrides", f"streamify {{in}}/tiny.qdq.onnx --chunk 2 --overrides {long} "
             "-o {out}/o", "{out}/o"),
            ("export_test_data", f"export {{in}}/tiny.qdq.onnx --test-data {long} -o {{out}}/o",
             "{out}/o"),
            ("verify", f"verify {long} --chunks 2", None),
            ("verify_data", f"verify {{in}}/tiny.onnx --chunks 2 -d {long}", None),
            ("pack", f"pack {long} -o {{out}}/p", "{out}/p"),
            ("app", f"app {long} -o {{out}}/app --target esp32p4", "{out}/app")):
        out.append(_c(f"{st}_input_name_too_long", args, "too long", output))
    out.append(_c("export_cpp_name_too_long", "export {in}/tiny.qdq.onnx --format cpp --name "
                  + "n" * 300 + " -o {out}", "_coefficient.hpp: file name too long", None))
    # names with newlines / escape characters: shown escaped on the one line
    out += [
        _c("optimize_input_name_newline", "optimize {in}/no\nsuch.onnx -o {out}/o",
           "no\\nsuch.onnx: no such file"),
        _c("calibrate_data_name_escape", "calibrate {in}/tiny.onnx -d {in}/no\x1b[31m.npy "
           "-o {out}/o", "no\\x1b[31m.npy"),
        _c("optimize_output_name_newline", "optimize {in}/tiny.onnx -o {out}/no/a\nb",
           "does not exist", "{out}/no/a\nb"),
        _c("streamify_node_name_newline",
           "streamify {in}/m_softmax_named_newline.onnx --chunk 2 -o {out}/o",
           "soft\\nmax\\x1b[31m"),
        _c("streamify_overrides_name_newline", "streamify {in}/tiny.qdq.onnx --chunk 2 "
           "--overrides {in}/m_overrides_newline.json -o {out}/o", "window must be positive"),
        _c("convert_node_name_newline",
           "convert {in}/m_softmax_named_newline.onnx --random 2 --chunk 2 -o {out}/o",
           "soft\\nmax\\x1b[31m"),
    ]
    # outputs a command derives from -o (convert --offline-too, streamify --stages) vs --json
    out += [
        _c("convert_json_is_offline_output", "convert {in}/tiny.onnx --random 2 --chunk 2 "
           "--offline-too -o {out}/o.espdl --json {out}/o.offline.espdl",
           "named twice as an output", "{out}/o.espdl"),
        _c("streamify_json_is_a_part", "streamify {in}/tiny.qdq.onnx --chunk 2 --stages 2 "
           "-o {out}/s.onnx --json {out}/s_0.onnx", "named twice as an output", "{out}/s_0.onnx"),
        _c("streamify_part_is_input", "streamify {in}/m_stream_1.onnx --chunk 2 --stages 2 "
           "-o {in}/m_stream.onnx", "the output would overwrite the input", None),
    ]
    # a device node as the output of a command that fails: the node stays a node
    out += [
        _c("optimize_truncated_to_device", "optimize {in}/onnx_truncated.onnx -o {dev}/null",
           "not an ONNX model", None),
        _c("export_float_to_device", "export {in}/tiny.onnx -o {dev}/null",
           "calibrate it first", None),
        _c("convert_bad_chunk_to_device",
           "convert {in}/strided.onnx --random 2 --chunk 3 -o {dev}/null",
           "every strided op must see whole strides", None),
        _c("inspect_json_device_bad_input", "inspect {in}/espdl_truncated.espdl --json "
           "{dev}/null", "truncated .espdl file", None),
        _c("calibrate_data_device", "calibrate {in}/tiny.onnx -d {dev}/zero -o {out}/o",
           "calibration data must be a .npy, a .npz or a folder of them"),
        _c("export_test_data_device", "export {in}/tiny.qdq.onnx --test-data {dev}/urandom "
           "-o {out}/o", "a device or special file"),
        _c("streamify_overrides_device", "streamify {in}/tiny.qdq.onnx --chunk 2 --overrides "
           "{dev}/zero -o {out}/o", "a device or special file"),
        _c("inspect_key_device", "inspect {in}/espdl_encrypted.espdl --key {dev}/zero",
           "a device or special file", None),
        _c("export_encrypt_key_device", "export {in}/tiny.qdq.onnx --encrypt-key {dev}/urandom "
           "-o {out}/o", "a device or special file"),
        _c("verify_data_device", "verify {in}/tiny.onnx --chunks 1 -d {dev}/zero",
           "a device or special file", None),
    ]
    return out

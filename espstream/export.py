"""The `export` stage: QDQ ONNX (streaming or not) -> a `.espdl` file, or C++ coefficient files.

`export_model(model, ...)` lowers the model (`espstream.lower`), optionally embeds test values
computed by the integer simulator, and serialises the IntGraph:

1. Target: the one `calibrate` recorded (`espstream.target`); a different `target` is an error
   (the exponents follow that target's rounding and bias width).
2. `.espdl` (`fmt='espdl'`): `espstream.espdl.write` — EDL2, mode 0, 16-byte aligned raw data,
   filters blocked for the target.
3. Test values (`test_data` float array(s) in the ONNX layout, or `test_random`): the first
   sample, quantized with the graph input's exponent and the target's rounding, put in the
   runtime layout; the outputs are what `espstream.sim.Simulator` computes from zero state.
   A streaming model gets one chunk (the first `espstream.chunk` frames of the data).
4. C++ (`fmt='cpp'`): `NAME_coefficient.hpp` / `NAME_coefficient.cpp` in the style of
   ESP-DL's older flow: per Conv / Gemm / MatMul layer `get_<layer>_filter()`,
   `get_<layer>_bias()`, `get_<layer>_activation()` returning the integer data with exponent(s)
   and shape (filters in the IntGraph's logical layout: [H, W, C, N], depthwise [H, W, N, 1],
   1-D with H = 1), and a constant `<layer>_output_exponent` for every node; the header is
   self-contained (only <cstdint>), so a hand-written `Model<int8_t>` / `Model<int16_t>` can
   wrap the arrays in its own tensor types.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from espstream import log
from espstream.errors import UserError
from espstream.espdl import write
from espstream.intgraph import IntGraph, Tensor
from espstream.lower import check_target, lower
from espstream.quant import scheme

FORMATS = ("espdl", "cpp")


@dataclass
class ExportResult:
    graph: IntGraph
    files: dict[str, bytes]  # file name -> bytes ('model.espdl' or the two C++ files)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> bytes:
        """The `.espdl` bytes (fmt='espdl')."""
        if len(self.files) != 1:
            raise UserError("this export wrote C++ files, not one .espdl")
        return next(iter(self.files.values()))

    def to_json(self) -> dict[str, Any]:
        return self.report


def export_model(
    model: onnx.ModelProto,
    target: str | None = None,
    test_data: np.ndarray | dict[str, np.ndarray] | None = None,
    test_random: bool = False,
    fmt: str = "espdl",
    name: str | None = None,
    seed: int = 0,
    encrypt_key: bytes | None = None,
) -> ExportResult:
    """Lower `model` and serialise it (rules in the module docstring); `encrypt_key` (16
    bytes) writes ESP-DL's encrypted .espdl (mode 1, `espstream.espdl.crypt`)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if test_data is not None and test_random:
        raise UserError("give --test-data or --test-random, not both")
    target = check_target(model, target) if _is_qdq(model) else target
    graph = lower(model, target)
    _check_batch_one(graph)
    if name:
        graph.name = name
    if test_data is not None or test_random:
        add_test_values(graph, test_data, seed if test_random else None)
    if encrypt_key is not None and fmt != "espdl":
        raise UserError("--encrypt-key encrypts .espdl files; --format cpp writes C++")
    if fmt == "espdl":
        data = write(graph)
        if encrypt_key is not None:
            from espstream.espdl.crypt import encrypt

            data = encrypt(data, encrypt_key)
        files = {f"{name or 'model'}.espdl": data}
    else:
        cname = c_identifier(name or graph.name or "model")
        hpp, cpp = cpp_files(graph, cname)
        files = {f"{cname}_coefficient.hpp": hpp, f"{cname}_coefficient.cpp": cpp}
    return ExportResult(graph, files, _report(graph, files, fmt))


def _is_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


# ---- test values ---------------------------------------------------------------------------


def _layouts(graph: IntGraph) -> dict[str, list[int]]:
    return json.loads(graph.metadata.get("espstream.layout", "{}"))


def onnx_shape(graph: IntGraph, name: str) -> list:
    """The ONNX-order shape of a graph input or output."""
    vi = graph.value_info(name)
    perm = _layouts(graph).get(name, list(range(len(vi.shape or []))))
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return [vi.shape[i] for i in inv]


def _strings(v) -> set[str]:
    if isinstance(v, str):
        return {v}
    if isinstance(v, dict):
        return set().union(*(_strings(x) for x in (*v.keys(), *v.values()))) if v else set()
    if isinstance(v, list):
        return set().union(*(_strings(x) for x in v)) if v else set()
    return set()


def _check_batch_one(graph: IntGraph) -> None:
    """ESP-DL runs one sample per call: a data input whose axis 0 (the batch, espstream's one
    rule) is fixed above 1 is refused here, before test values are made for it. State inputs
    (caches, recurrent states, [directions, batch, hidden]) are not data inputs."""
    states: set[str] = set()
    for key in ("espstream.recurrent_states", "espstream.states"):
        if key in graph.metadata:
            try:
                states |= _strings(json.loads(graph.metadata[key]))
            except ValueError:
                pass
    for vi in graph.inputs:
        if vi.name in states:
            continue
        shape = onnx_shape(graph, vi.name)
        if len(shape) >= 2 and isinstance(shape[0], int) and shape[0] > 1:
            rest = ",".join(str(d) for d in shape[1:])
            raise UserError(f"input '{vi.name}' {shape}: axis 0 is the batch, and ESP-DL runs one "
                            f"sample per call; give --input-shape {vi.name}:1,{rest} (or export "
                            "the model with batch 1)")


def quantize_input(graph: IntGraph, name: str, x: np.ndarray) -> np.ndarray:
    """Float data in the ONNX layout -> the integer input of `graph` in the runtime layout."""
    vi = graph.value_info(name)
    want = onnx_shape(graph, name)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == len(want) - 1:
        x = x[None]
    elif not want and x.size == 1:
        x = x.reshape(())  # a scalar (0-d) input given as one value
    if x.ndim != len(want):
        raise UserError(f"test data for input '{name}' has shape {list(x.shape)}; expected "
                        f"{want} (ONNX layout, batch first)")
    x = x[:1] if x.ndim else x
    if graph.streaming and "espstream.time_axes" in graph.metadata:
        axes = json.loads(graph.metadata["espstream.time_axes"])
        if name in axes:
            perm = _layouts(graph).get(name, list(range(x.ndim)))
            ax = perm[int(axes[name])]  # runtime axis -> ONNX axis
            c = want[ax]
            if x.shape[ax] < c:
                raise UserError(f"test data for input '{name}' has {x.shape[ax]} frames; the "
                                f"streaming model takes chunks of {c}")
            x = np.take(x, range(c), axis=ax)
    if list(x.shape) != [d if isinstance(d, int) else x.shape[i] for i, d in enumerate(want)]:
        raise UserError(f"test data for input '{name}' has shape {list(x.shape)}; expected "
                        f"{want} (ONNX layout)")
    if not np.all(np.isfinite(x)):
        raise UserError(f"test data for input '{name}' holds NaN or infinite values")
    bits = 8 if vi.dtype == np.int8 else 16
    q = scheme.quantize(x, vi.exponent, bits, scheme.get_target(graph.target).rounding)
    perm = _layouts(graph).get(name, list(range(q.ndim)))
    return np.array(np.transpose(q, perm), order="C")  # ascontiguousarray makes 0-d 1-D


def add_test_values(graph: IntGraph, data: np.ndarray | dict[str, np.ndarray] | None,
                    seed: int | None) -> None:
    """Fill graph.test_inputs / test_outputs (one sample, one chunk) from data or random."""
    try:
        from espstream.sim import Simulator
    except ImportError:  # pragma: no cover - the simulator is part of the package
        raise UserError("test values need the integer simulator (espstream.sim), which is not "
                        "available yet") from None
    names = [v.name for v in graph.inputs]
    if data is None:
        rng = np.random.default_rng(seed)
        data = {n: rng.standard_normal(onnx_shape(graph, n)).astype(np.float32) for n in names}
    elif not isinstance(data, dict):
        if len(names) != 1:
            raise UserError(f"the model has {len(names)} inputs ({', '.join(names)}); give test "
                            "data as an .npz with one array per input name")
        data = {names[0]: data}
    data = dict(data)
    for st in json.loads(graph.metadata.get("espstream.recurrent_states", "[]")):
        if st["input"] not in data:  # a GRU / LSTM state: the zero state a stream starts from
            data[st["input"]] = np.zeros(onnx_shape(graph, st["input"]), np.float32)
    missing = [n for n in names if n not in data]
    if missing:
        raise UserError(f"no test data for input(s) {', '.join(missing)}")
    q = {n: quantize_input(graph, n, data[n]) for n in names}
    out = Simulator(graph).run(q)
    graph.test_inputs = {n: Tensor(n, q[n], [graph.value_info(n).exponent]) for n in names}
    graph.test_outputs = {
        v.name: Tensor(v.name, np.ascontiguousarray(out[v.name]), list(v.exponents))
        for v in graph.outputs
    }


# ---- report --------------------------------------------------------------------------------


def cache_bytes(graph: IntGraph) -> int:
    """Bytes the runtime keeps across calls: (window - 1) frames per StreamingCache."""
    total = 0
    for n in graph.nodes:
        if n.op_type == "StreamingCache":
            b = graph.cache_bytes(n)
            if b is None:  # lower gives every tensor a fixed shape
                raise ValueError(f"StreamingCache '{n.name}': its input has no known shape")
            total += b
    return total


def _report(graph: IntGraph, files: dict[str, bytes], fmt: str) -> dict[str, Any]:
    params = sum(t.data.nbytes for t in graph.initializers.values())
    rep: dict[str, Any] = {
        "target": graph.target,
        "format": fmt,
        "files": {k: len(v) for k, v in files.items()},
        "nodes": len(graph.nodes),
        "ops": dict(Counter(n.op_type for n in graph.nodes)),
        "parameter_bytes": params,
        "streaming": graph.streaming,
        "cache_bytes": cache_bytes(graph),
        "inputs": [{"name": v.name, "shape": v.shape, "dtype": str(v.dtype),
                    "exponent": v.exponents} for v in graph.inputs],
        "outputs": [{"name": v.name, "shape": v.shape, "dtype": str(v.dtype),
                     "exponent": v.exponents} for v in graph.outputs],
        "test_values": bool(graph.test_inputs),
        "metadata": dict(graph.metadata),
        "layers": [
            {"name": n.name, "op": n.op_type,
             "output_exponent": graph.exponents(n.outputs[0]) if n.outputs else None}
            for n in graph.nodes
        ],
    }
    return rep


def print_summary(result: ExportResult, output: str | None = None) -> None:
    """The stderr report; `output` is where the files go (`-o`: a path, '-' stdout, or the C++
    folder), so the line names what the user will find, not the export's own file names."""
    from pathlib import Path

    r = result.report
    names = dict(r["files"])
    if output is not None and r["format"] == "espdl":
        names = {("stdout" if output == "-" else output): v for v in names.values()}
    elif output is not None:
        names = {str(Path(output) / k): v for k, v in names.items()}
    files = ", ".join(f"{k} ({v} bytes)" for k, v in names.items())
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(r["ops"].items()))
    log.info(f"export: target {r['target']}, {r['nodes']} nodes ({ops}); {files}")
    log.info(f"parameters {r['parameter_bytes']} bytes"
             + (f", caches {r['cache_bytes']} bytes (chunk {r['metadata'].get('espstream.chunk')})"
                if r["streaming"] else "")
             + ("; with test values" if r["test_values"] else ""))


# ---- C++ coefficient files -----------------------------------------------------------------


def c_identifier(name: str) -> str:
    """A C identifier from a node / model name ('/blocks.0/dw/Conv' -> 'blocks_0_dw_conv')."""
    s = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()
    if not s or s[0].isdigit():
        s = "m_" + s
    return s


_CTYPE = {np.dtype(np.int8): "int8_t", np.dtype(np.int16): "int16_t",
          np.dtype(np.int32): "int32_t", np.dtype(np.int64): "int64_t"}


def _array(ctype: str, name: str, values: np.ndarray) -> str:
    flat = [str(int(v)) for v in np.asarray(values).reshape(-1)]
    rows = [", ".join(flat[i:i + 16]) for i in range(0, len(flat), 16)] or ["0"]
    body = ",\n    ".join(rows)
    return f"alignas(16) static const {ctype} {name}[] = {{\n    {body}}};\n"


def _ints(name: str, values: list[int]) -> str:
    return f"static const int {name}[] = {{{', '.join(str(int(v)) for v in values) or '0'}}};\n"


def cpp_files(graph: IntGraph, cname: str) -> tuple[bytes, bytes]:
    """The header and source text (see rule 4 of the module docstring)."""
    ns = f"{cname}_coefficient"
    layers = [n for n in graph.nodes if n.op_type in ("Conv", "Gemm", "MatMul")
              and len(n.inputs) > 1 and n.inputs[1] in graph.initializers]
    dtypes = {graph.initializers[n.inputs[1]].dtype for n in layers} or {np.dtype(np.int8)}
    if len(dtypes) != 1:
        raise UserError("the model mixes 8- and 16-bit layers; C++ export needs one bit width")
    feat = _CTYPE[dtypes.pop()]
    bias_t = "int32_t" if feat == "int8_t" else "int64_t"
    seen: set[str] = set()
    ids = {}
    for n in graph.nodes:
        base = c_identifier(n.name)
        ident, k = base, 1
        while ident in seen:
            ident, k = f"{base}_{k}", k + 1
        seen.add(ident)
        ids[n.name] = ident
    h = [
        "// Generated by espstream export --format cpp: integer coefficients for ESP-DL's",
        f"// hand-written Model<{feat}> flow. Target {graph.target}; real value = q * 2^exponent.",
        "// Filters are in the logical layout [H, W, C, N] (depthwise [H, W, N, 1]; 1-D: H = 1;",
        "// Gemm [1, 1, K, N]); re-block them for the target if your kernels expect it.",
        "#pragma once",
        "#include <cstdint>",
        "",
        f"namespace {ns} {{",
        "",
        "struct Filter {",
        f"    const {feat} *element;",
        "    int exponent;          // the exponent of channel 0 (all of them when per tensor)",
        "    const int *exponents;  // one per output channel, or one",
        "    int exponent_count;",
        "    int shape[4];          // [H, W, C, N] or [H, W, N, 1]",
        "    int dilation[2];",
        "    int stride[2];",
        "    int padding[4];        // top, bottom, left, right",
        "    int group;",
        "};",
        "",
        "struct Bias {",
        f"    const {bias_t} *element;",
        "    int exponent;",
        "    const int *exponents;",
        "    int exponent_count;",
        "    int size;",
        "};",
        "",
        "struct Activation {",
        "    const char *type;  // \"Linear\" or \"ReLU\"",
        "    int exponent;      // the layer's output exponent",
        "};",
        "",
    ]
    c = [f'#include "{cname}_coefficient.hpp"', "", f"namespace {ns} {{", ""]
    for n in layers:
        ident = ids[n.name]
        w = graph.initializers[n.inputs[1]]
        data = w.data
        if n.op_type == "Conv" and data.ndim == 3:
            data = data[None]
        if n.op_type == "MatMul" and data.ndim == 2:
            data = data[None, None]
        if data.ndim != 4:
            raise UserError(f"layer '{n.name}': a {data.ndim}-D filter has no C++ layout here")
        out_exp = graph.exponents(n.outputs[0])[0]
        nsp = 2 if n.op_type == "Conv" and w.data.ndim == 4 else 1
        dil = list(n.attrs.get("dilations", [1, 1]))
        strides = list(n.attrs.get("strides", [1, 1]))
        # the file's ONNX order -> the Filter's [top, bottom, left, right]
        from espstream.sim import kernel_pads

        pads = kernel_pads(list(n.attrs.get("pads", [0, 0, 0, 0])))
        if nsp == 1 and n.op_type == "Conv":
            dil, strides, pads = [1, dil[0]], [1, strides[0]], [0, 0, pads[0], pads[1]]
        h += [
            f"// {n.op_type} '{n.name}': input exponent "
            f"{graph.exponents(n.inputs[0])[0]}, output exponent {out_exp}",
            f"constexpr int {ident}_output_exponent = {out_exp};",
            f"const Filter *get_{ident}_filter();",
        ]
        c.append(_array(feat, f"{ident}_filter_element", data))
        c.append(_ints(f"{ident}_filter_exponents", w.exponents))
        c.append(
            f"static const Filter {ident}_filter = {{{ident}_filter_element, {w.exponents[0]}, "
            f"{ident}_filter_exponents, {len(w.exponents)}, "
            f"{{{', '.join(str(d) for d in data.shape)}}}, "
            f"{{{', '.join(str(int(d)) for d in dil)}}}, "
            f"{{{', '.join(str(int(s)) for s in strides)}}}, "
            f"{{{', '.join(str(int(p)) for p in pads)}}}, {int(n.attrs.get('group', 1))}}};\n"
            f"const Filter *get_{ident}_filter() {{ return &{ident}_filter; }}\n"
        )
        if len(n.inputs) > 2 and n.inputs[2]:
            b = graph.initializers[n.inputs[2]]
            h.append(f"const Bias *get_{ident}_bias();")
            c.append(_array(bias_t, f"{ident}_bias_element", b.data))
            c.append(_ints(f"{ident}_bias_exponents", b.exponents))
            c.append(
                f"static const Bias {ident}_bias = {{{ident}_bias_element, {b.exponents[0]}, "
                f"{ident}_bias_exponents, {len(b.exponents)}, {b.data.size}}};\n"
                f"const Bias *get_{ident}_bias() {{ return &{ident}_bias; }}\n"
            )
        act = "ReLU" if n.attrs.get("activation") == "Relu" else "Linear"
        h += [f"const Activation *get_{ident}_activation();", ""]
        c.append(
            f'static const Activation {ident}_activation = {{"{act}", {out_exp}}};\n'
            f"const Activation *get_{ident}_activation() {{ return &{ident}_activation; }}\n"
        )
    h.append("// Output exponent of every node, in node order:")
    layer_names = {n.name for n in layers}
    for n in graph.nodes:
        if n.name in layer_names or not n.outputs:
            continue
        e = graph.exponents(n.outputs[0])
        h.append(f"constexpr int {ids[n.name]}_output_exponent = {e[0]};  // {n.op_type}")
    for v in graph.inputs:
        h.append(f"constexpr int input_{c_identifier(v.name)}_exponent = {v.exponents[0]};")
    h += ["", f"}}  // namespace {ns}", ""]
    c += [f"}}  // namespace {ns}", ""]
    return "\n".join(h).encode(), "\n".join(c).encode()


# ---- files ---------------------------------------------------------------------------------


def read_test_data(path: str) -> np.ndarray | dict[str, np.ndarray]:
    """A .npy (one input) or .npz (one array per input name) of float test data."""
    import io
    import zipfile
    import zlib

    from espstream.errors import first_line
    from espstream.modelio import read_bytes
    from espstream.quant.data import _check_npy_header, npz_member

    raw = read_bytes(path, "test data")
    try:
        if not raw.startswith(b"PK"):
            _check_npy_header(io.BytesIO(raw), path, "not a .npy / .npz array file")
        obj = np.load(io.BytesIO(raw), allow_pickle=False)
        if isinstance(obj, np.lib.npyio.NpzFile):
            data = {k: npz_member(obj, k, path) for k in obj.files}
            arrays = list(data.values())
        else:
            data, arrays = obj, [obj]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: not a .npy / .npz array file ({first_line(e)})") from None
    for a in arrays:
        if a.dtype.kind not in "fiu":
            raise UserError(f"{path}: test data must be numbers, got dtype {a.dtype}")
    return data


def check_cpp_folder(output: str) -> None:
    """--format cpp writes NAME_coefficient.hpp / .cpp into an existing folder."""
    from pathlib import Path

    if output == "-":
        raise UserError("--format cpp writes two files: give -o FOLDER")
    if not Path(output).is_dir():
        raise UserError(f"{output}: not an existing folder (--format cpp writes "
                        "NAME_coefficient.hpp and NAME_coefficient.cpp into -o FOLDER)")


def write_files(result: ExportResult, output: str, fmt: str) -> list[str]:
    """Write the export: the .espdl to `output` ('-': stdout); C++ files into folder `output`.

    Every file is written atomically; if a later file fails, the earlier ones are removed.
    """
    from pathlib import Path

    from espstream.modelio import write_bytes

    if fmt == "espdl":
        write_bytes(result.data, output)
        return [output]
    check_cpp_folder(output)
    folder = Path(output)
    written: list[str] = []
    try:
        for fname, data in result.files.items():
            p = str(folder / fname)
            write_bytes(data, p, binary=False)
            written.append(p)
    except BaseException:
        for p in written:
            Path(p).unlink(missing_ok=True)
        raise
    return written

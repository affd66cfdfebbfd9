"""Reading and writing models from a path or '-', with every check a user's file deserves.

Writes are atomic (a temporary file in the target folder, then a rename), so an error never
leaves a partial output behind, and an output that would overwrite the input is refused.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from espstream.errors import UserError, first_line

MIN_OPSET = 11
UPGRADE_OPSET = 13  # what `upgrade_opset=True` converts an older model to
STDIO = "-"

# stdout kept for the model while stray prints go to stderr: `espstream.stdio` (no onnx import,
# so `espstream --version` stays fast)
from espstream.stdio import real_stdout, stdout_reserved_for_output  # noqa: E402, F401


def _label(path: str) -> str:
    return "<stdin>" if path == STDIO else str(path)


def read_bytes(path: str, what: str = "input") -> bytes:
    """Read a whole file, or stdin for '-'."""
    from espstream.limits import MAX_FILE_BYTES, check_file_size

    if path == STDIO:
        stdin = sys.stdin
        if stdin is None or getattr(stdin, "closed", False):
            raise UserError(f"no {what} given: stdin is closed; pass a file")
        if stdin.isatty():
            raise UserError(f"no {what} given: pass a file or pipe one into stdin")
        try:
            check_stream(stdin.fileno(), "<stdin>")
            data = stdin.buffer.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise UserError(f"<stdin>: cannot read ({e.strerror})") from None
        check_file_size(len(data), "<stdin>")
    else:
        from espstream.outputs import _short

        label = _short(path)
        try:
            p = Path(path)
            if not p.exists():
                raise UserError(f"{label}: no such file")
            if p.is_dir():
                raise UserError(f"{label}: is a folder, expected a file")
            with open(p, "rb") as f:  # bounded (espstream.limits rule 1)
                check_stream(f.fileno(), label)
                data = f.read(MAX_FILE_BYTES + 1)
        except (OSError, ValueError) as e:
            raise UserError(f"{label}: cannot read ({getattr(e, 'strerror', None) or e})") \
                from None
        check_file_size(len(data), label)
    if not data:
        raise UserError(f"{_label(path)}: the file is empty")
    return data


def check_stream(fd: int, label: str) -> None:
    """An input is a regular file (of at most MAX_FILE_BYTES), a pipe or a socket; a device
    such as /dev/zero or /dev/urandom never ends and is refused."""
    import stat

    from espstream.limits import check_file_size

    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        check_file_size(st.st_size, label)
    elif not (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
        raise UserError(f"{label}: a device or special file, not a file to read")


def check_input_file(path: str) -> None:
    """`check_stream` for a path read by another library (numpy)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        check_stream(fd, path)
    finally:
        os.close(fd)


def _opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(model)
    )


def parse_model(
    data: bytes, label: str, base_dir: str | None = None, upgrade_opset: bool = False
) -> onnx.ModelProto:
    """Parse and validate ONNX bytes; every failure is a `UserError` naming `label`.

    An opset older than `MIN_OPSET` is refused unless `upgrade_opset`, which converts the model
    to opset `UPGRADE_OPSET` with onnx.version_converter and says so on stderr.
    """
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise UserError(
            f"{label}: not an ONNX model "
            "(the protobuf does not parse: truncated or another format?)"
        ) from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise UserError(f"{label}: not an ONNX model (no graph or no IR version)")
    sparse = _sparse_tensor(model)
    if sparse:
        raise UserError(f"{label}: {sparse} is a sparse tensor, which espstream does not read; "
                        "store it dense (onnx.numpy_helper.to_array of the sparse values)")
    bad = _non_utf8_string(model)
    if bad:
        raise UserError(f"{label}: corrupt ONNX model: field {bad} is not valid UTF-8 text")
    dims = _dims_problem(model) or _cache_problem(model)
    if dims:
        raise UserError(f"{label}: {dims}")
    for t in _graph_tensors(model.graph):
        problem = _tensor_data_problem(t)
        if problem:
            raise UserError(f"{label}: corrupt ONNX model: tensor {t.name!r} {problem}")
    if _has_external_data(model):
        if base_dir is None:
            raise UserError(
                f"{label}: the model keeps its weights in external data files; "
                "pass the .onnx path instead of stdin so they can be found beside it"
            )
        try:
            onnx.load_external_data_for_model(model, base_dir)
        except Exception as e:  # onnx raises OSError or ValidationError depending on the case
            reason = first_line(e)
            raise UserError(
                f"{label}: external data file missing or unreadable ({reason}); "
                "keep the data files next to the .onnx file"
            ) from None
    opset = _opset(model)
    if opset is None:
        raise UserError(f"{label}: the model imports no default ONNX opset")
    if opset < MIN_OPSET and upgrade_opset:
        model = _upgrade_opset(model, opset, label)
    elif opset < MIN_OPSET:
        raise UserError(
            f"{label}: opset {opset} is older than {MIN_OPSET}; re-export the model with "
            f"opset >= {MIN_OPSET}, or pass --upgrade-opset to convert it with "
            "onnx.version_converter"
        )
    if len(model.graph.node) == 0:
        raise UserError(f"{label}: the graph is empty (no nodes)")
    if len(model.graph.output) == 0:
        raise UserError(f"{label}: the graph has no outputs (nothing it computes is used)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = first_line(e, "invalid model")
        raise UserError(f"{label}: fails onnx.checker: {first}") from None
    _check_metadata(model, label)
    empty = _empty_list_attribute(model)
    if empty:
        raise UserError(f"{label}: {empty} is declared as a list but holds no values; "
                        "give its values or remove the attribute")
    return model


def _sparse_tensor(model: onnx.ModelProto) -> str | None:
    """The first sparse initializer or sparse Constant anywhere in the model, described."""
    def graphs(g: onnx.GraphProto):
        yield g
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    yield from graphs(a.g)
                for sub in a.graphs:
                    yield from graphs(sub)

    bodies = [*(("graph", g.node, g.sparse_initializer) for g in graphs(model.graph)),
              *((f"function {f.name!r}", f.node, ()) for f in model.functions)]
    for where, nodes, sparse in bodies:
        for t in sparse:
            return f"initializer {t.values.name!r}"
        for n in nodes:
            for a in n.attribute:
                if a.HasField("sparse_tensor") or len(a.sparse_tensors):
                    return f"attribute {a.name!r} of node {n.name!r} ({n.op_type}) in the {where}"
    return None


def _dims_problem(model: onnx.ModelProto) -> str | None:
    """A declared dimension no array can have (espstream.limits rule 2): below 0 or at least
    MAX_DIM in a graph input, output, value info or initializer; a graph input or initializer
    of more than MAX_ELEMENTS elements. None if all are fine."""
    from espstream.limits import MAX_DIM, MAX_ELEMENTS

    g = model.graph
    for kind, vis in (("input", g.input), ("output", g.output), ("value info", g.value_info)):
        for vi in vis:
            t = vi.type.tensor_type
            if not (vi.type.HasField("tensor_type") and t.HasField("shape")):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            shown = [d if d is not None else "?" for d in dims]
            for d in dims:
                if d is not None and not 0 <= d < MAX_DIM:
                    return (f"{kind} {vi.name!r} declares dimension {d} (shape {shown}), out of "
                            f"range (0..{MAX_DIM - 1})")
            n = math.prod(d for d in dims if d is not None)
            if kind == "input" and n > MAX_ELEMENTS:
                return (f"input {vi.name!r} declares shape {shown}: {n} elements, over the "
                        f"limit of {MAX_ELEMENTS}")
    for t in g.initializer:
        if any(not 0 <= d < MAX_DIM for d in t.dims):
            return (f"initializer {t.name!r} declares dims {list(t.dims)}, out of range "
                    f"(0..{MAX_DIM - 1})")
        if math.prod(t.dims) > MAX_ELEMENTS:
            return (f"initializer {t.name!r} declares dims {list(t.dims)}: over the limit of "
                    f"{MAX_ELEMENTS} elements")
    return None


def _cache_problem(model: onnx.ModelProto) -> str | None:
    """A StreamingCache node (streamify's) whose window or axis no cache can have: the window
    is the frames kept (espstream.limits, like an .espdl file's), the axis an array's."""
    from espstream.limits import MAX_WINDOW
    from espstream.stream.cache import DOMAIN, OP

    for n in model.graph.node:
        if n.domain != DOMAIN or n.op_type != OP:
            continue
        attrs = {a.name: a for a in n.attribute}
        w, ax = attrs.get("window_size"), attrs.get("axis")
        if w is None or w.type != onnx.AttributeProto.INT or not 1 <= w.i <= MAX_WINDOW:
            shown = w.i if w is not None and w.type == onnx.AttributeProto.INT else None
            return (f"node {n.name!r} ({OP}): window_size {shown} is not between 1 and "
                    f"{MAX_WINDOW}")
        if ax is None or ax.type != onnx.AttributeProto.INT or not 0 <= ax.i < 64:
            shown = ax.i if ax is not None and ax.type == onnx.AttributeProto.INT else None
            return f"node {n.name!r} ({OP}): axis {shown} is not between 0 and 63"
    return None


def _rank(vi: onnx.ValueInfoProto) -> int | None:
    t = vi.type.tensor_type
    return len(t.shape.dim) if vi.type.HasField("tensor_type") and t.HasField("shape") else None


def _check_metadata(model: onnx.ModelProto, label: str) -> None:
    """espstream's own metadata holds what espstream writes (espstream.metadata); no key of
    espstream's twice (readers would disagree on which one counts)."""
    from espstream import metadata

    meta: dict[str, str] = {}
    for p in model.metadata_props:
        if p.key.startswith("espstream.") and p.key in meta:
            raise UserError(f"{label}: metadata {p.key} is given twice")
        meta[p.key] = p.value
    try:
        metadata.check(meta, {v.name: _rank(v) for v in model.graph.input},
                       {v.name: _rank(v) for v in model.graph.output})
    except UserError as e:
        raise UserError(f"{label}: {e}") from None


_LIST_FIELDS = {onnx.AttributeProto.INTS: "ints", onnx.AttributeProto.FLOATS: "floats",
                onnx.AttributeProto.STRINGS: "strings", onnx.AttributeProto.TENSORS: "tensors",
                onnx.AttributeProto.GRAPHS: "graphs"}


def _empty_list_attribute(model: onnx.ModelProto) -> str | None:
    """The first node attribute typed as a list with no elements, described, or None.

    onnx.checker lets these through, but an empty list loses its type in onnx-graphsurgeon, which
    then cannot write the graph back (found by fuzzing: a Conv whose `kernel_shape` is `[]`).
    """
    bodies = [("", model.graph.node), *((f" in function {f.name!r}", f.node)
                                        for f in model.functions)]
    for where, nodes in bodies:
        for node in nodes:
            for a in node.attribute:
                field = _LIST_FIELDS.get(a.type)
                if field and len(getattr(a, field)) == 0:
                    return f"attribute {a.name!r} of node {node.name!r} ({node.op_type}){where}"
    return None


def _is_repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)  # protobuf >= 5; older ones only have `label`
    return bool(rep) if rep is not None else fd.label == fd.LABEL_REPEATED


def _non_utf8_string(msg) -> str | None:
    """The first string field (name, op_type, doc_string ...) holding bytes that are not UTF-8.

    The ONNX protos are proto2, so parsing accepts such bytes (the upb backend then hands them
    to Python as `bytes`); onnx.checker and onnx-graphsurgeon would fail on them later with a
    UnicodeDecodeError. Bytes fields (tensor data) are not visited.
    """
    for fd in msg.DESCRIPTOR.fields:
        if fd.type == fd.TYPE_STRING:
            try:
                value = getattr(msg, fd.name)
                values = list(value) if _is_repeated(fd) else [value]
            except UnicodeDecodeError:
                return fd.full_name
            if any(not isinstance(v, str) for v in values):
                return fd.full_name
        elif fd.type == fd.TYPE_MESSAGE:
            if _is_repeated(fd):
                subs = getattr(msg, fd.name)
            elif msg.HasField(fd.name):
                subs = [getattr(msg, fd.name)]
            else:
                continue
            for sub in subs:
                bad = _non_utf8_string(sub)
                if bad:
                    return bad
    return None


# Element type -> (typed field holding its values when raw_data is not used, values per element)
_TYPED_FIELD = {
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT64: ("uint64_data", 1),
    onnx.TensorProto.UINT32: ("uint64_data", 1), onnx.TensorProto.STRING: ("string_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    **{t: ("int32_data", 1) for t in (
        onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
        onnx.TensorProto.UINT16, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL,
        onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)},
}


def _graph_tensors(graph: onnx.GraphProto):
    """The main graph's initializers and Constant node values (what the stages read)."""
    yield from graph.initializer
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value" and a.HasField("t"):
                    yield a.t


def _tensor_data_problem(t: onnx.TensorProto) -> str | None:
    """How the stored values disagree with the tensor's dims, or None. onnx.checker does not
    look: a mismatch would otherwise surface deep in a stage as a NumPy reshape error."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type not in _TYPED_FIELD:
        return None  # external data is checked when loaded; rare types are left to onnx
    if any(d < 0 for d in t.dims):
        return f"has a negative dimension {list(t.dims)}"
    n = 1
    for d in t.dims:
        n *= d
    field, per = _TYPED_FIELD[t.data_type]
    if t.HasField("raw_data") and t.data_type != onnx.TensorProto.STRING:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        have, want = len(t.raw_data), n * itemsize
        unit = "bytes"
    else:
        have, want = len(getattr(t, field)), n * per
        unit = "values"
    if have != want:
        return f"holds {have} {unit} where its dims {list(t.dims)} need {want}"
    return None


def _upgrade_opset(model: onnx.ModelProto, opset: int, label: str) -> onnx.ModelProto:
    from onnx import version_converter

    from espstream import log

    try:
        upgraded = version_converter.convert_version(model, UPGRADE_OPSET)
    except Exception as e:  # the converter raises RuntimeError / ValidationError / others
        reason = first_line(e)
        raise UserError(
            f"{label}: cannot upgrade opset {opset} to {UPGRADE_OPSET} with "
            f"onnx.version_converter ({reason}); re-export the model with opset >= {MIN_OPSET}"
        ) from None
    if upgraded.ir_version < 4:
        # IR < 4 had to list every initializer as a graph input; from IR 4 on such an input is
        # an overridable one, which no stage should treat as user data, so it goes.
        weights = {t.name for t in upgraded.graph.initializer}
        kept = [i for i in upgraded.graph.input if i.name not in weights]
        del upgraded.graph.input[:]
        upgraded.graph.input.extend(kept)
    # The converter keeps the old IR version; opset 13 needs IR >= 7.
    upgraded.ir_version = max(upgraded.ir_version, 7)
    log.warn(f"{label}: upgraded from opset {opset} to {UPGRADE_OPSET} with onnx.version_converter")
    return upgraded


#: (label, model) of every model `load_model` read in this process: when a command fails with
#: an unexpected error, `espstream.guard` asks whether one of them is malformed.
_loaded: list[tuple[str, onnx.ModelProto]] = []


def load_model(path: str, upgrade_opset: bool = False) -> onnx.ModelProto:
    """Load and validate an ONNX model from a path or '-' (stdin); see `parse_model`."""
    data = read_bytes(path, "ONNX model")
    base = None if path == STDIO else str(Path(path).resolve().parent)
    model = parse_model(data, _label(path), base, upgrade_opset)
    _loaded.append((_label(path), model))
    return model


def loaded_models() -> list[tuple[str, onnx.ModelProto]]:
    """The models `load_model` read so far, in order."""
    return list(_loaded)


def check_output_path(path: str, *inputs: str | None) -> None:
    """Refuse an output that would overwrite an input, replace a special file, or land in a
    missing or unwritable folder (espstream.outputs, rules 1-3)."""
    from espstream.outputs import check_output

    check_output(path, *inputs)


def write_bytes(data: bytes, path: str, binary: bool = True) -> None:
    """Write to `path` (espstream.outputs: through a device, else atomically, committed with
    the command's other outputs), or to stdout for '-' (binary refused on a terminal)."""
    if path == STDIO:
        out = real_stdout()
        if out is None or getattr(out, "closed", False):
            raise UserError("stdout is closed; give -o FILE")
        if binary and out.isatty():
            raise UserError(
                "refusing to write a binary model to the terminal; use -o FILE or pipe the output"
            )
        from espstream.outputs import wait_delivered

        try:
            out.buffer.write(data)
            out.buffer.flush()
            wait_delivered(out.fileno(), "stdout")
        except BrokenPipeError:
            _silence_stdout()
            raise UserError("stdout: the reader closed the pipe before the output was "
                            "written") from None
        except OSError as e:
            raise UserError(f"stdout: cannot write ({e.strerror})") from None
        return
    from espstream.outputs import write_file

    write_file(data, path)


def _silence_stdout() -> None:
    """After a broken pipe, point fd 1 at /dev/null so Python's exit flush stays quiet."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.close(fd)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def serialize_model(model: onnx.ModelProto) -> bytes:
    """Check a model with onnx.checker and return its bytes; a failure here is our bug."""
    onnx.checker.check_model(model)
    return model.SerializeToString()


def save_model(model: onnx.ModelProto, path: str) -> None:
    """Check and atomically write an ONNX model to a path or '-'."""
    write_bytes(serialize_model(model), path)

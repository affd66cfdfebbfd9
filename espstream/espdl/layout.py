"""Per-target byte layout of filter tensors in a `.espdl` file.

The IntGraph keeps every filter as a plain array in its declared dims order (see
`espstream.intgraph`); the file stores the same values in a target-specific byte order, named
by the tensor's doc string `layout ==> X`. Rules, checked byte for byte against ESP-PPQ 1.3.12's
exports in tests/data/esp-ppq (c vs esp32s3 files of the same model hold the same values in the
two orders; esp32p4 bytes equal the ONNX weights quantized per channel, then blocked):

1. Which tensors: input 1 of Conv, input 1 of Gemm (dims [1, 1, C, N], transB = 0), and a
   constant input 1 of MatMul (dims [..., C, N], each leading slice packed on its own as a
   [1, 1, C, N] filter). Every other tensor is stored in plain C order of its dims.
2. Dims: Conv 2-D [H, W, C, N], 1-D [W, C, N]; depthwise (group > 1) [H, W, N, 1], 1-D
   [W, N, 1]. The dims are the same on every target; only the byte order differs.
3. Plain target `c`: ordinary filters are stored N-major, `N H W C` (layout 'NHWC'; 1-D 'NWC');
   depthwise filters in dims order `H W N` (layout 'HWCN'; 1-D 'WCN').
4. ESP32-S3 / ESP32-P4: output channels in blocks of a = 16 (quant_type S8) or 8 (S16 and
   others). The first floor(N/a)*a channels are stored as `(N/a) H W C a` (the channel inside
   the block varies fastest); layout '(N/a)HWCa' (1-D '(N/a)WCa'). The N mod a leftover
   channels follow, ordinary filters as `N H W C`, depthwise as `H W N`; the doc string then
   ends in '_UNALIGNED'. Depthwise filters use the same rule with C = 1.
5. Exponents are not permuted: one per tensor, or one per output channel in channel order.

The leftover-channel rule (4, second half) and the 8-channel blocks are not exercised by the
fixtures (all their channel counts are multiples of 16 and all are int8); they follow ESP-PPQ's
documented behaviour and are covered by the pack/unpack inverse tests only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from espstream.errors import UserError

LAYOUT_PREFIX = "layout ==> "
PLAIN_TARGET = "c"
BLOCKED_TARGETS = ("esp32s3", "esp32p4")

# plain layout name -> (spatial dims, depthwise)
_PLAIN = {"NWC": (1, False), "WCN": (1, True), "NHWC": (2, False), "HWCN": (2, True)}
_BLOCKED = re.compile(r"^\(N/(16|8)\)(HW|W)C(16|8)(_UNALIGNED)?$")


@dataclass(frozen=True)
class FilterLayout:
    """A parsed filter layout name.

    spatial: 1 for the 1-D names (W), 2 for the 2-D names (HW).
    align: the channel block size (16 or 8) on S3 / P4, 0 on the plain target.
    depthwise: what a plain name says (WCN / HWCN are depthwise); None for blocked names,
        which are the same for both kinds.
    """

    name: str
    spatial: int
    align: int
    depthwise: bool | None


def parse_layout(name: str | None) -> FilterLayout | None:
    """The filter layout a layout name (the part after 'layout ==> ') denotes, or None."""
    if name is None:
        return None
    if name in _PLAIN:
        spatial, dw = _PLAIN[name]
        return FilterLayout(name, spatial, 0, dw)
    m = _BLOCKED.match(name)
    if m and m.group(1) == m.group(3):
        return FilterLayout(name, 2 if m.group(2) == "HW" else 1, int(m.group(1)), None)
    return None


def layout_of(doc_string: str | None) -> FilterLayout | None:
    """The filter layout a tensor doc string ('layout ==> X') names, or None."""
    if doc_string and doc_string.startswith(LAYOUT_PREFIX):
        return parse_layout(doc_string[len(LAYOUT_PREFIX):])
    return None


@dataclass(frozen=True)
class FilterUse:
    """How a node reads a tensor as a filter: what decides its byte layout."""

    node: str
    op_type: str  # 'Conv', 'Gemm' or 'MatMul'
    depthwise: bool  # Conv with group > 1
    align: int  # the channel block the node's quant_type implies (16 for S8, else 8)


def _align_for(quant_type: object, dtype: np.dtype) -> int:
    if quant_type is not None:
        return 16 if quant_type in ("S8", b"S8") else 8
    return 16 if dtype == np.int8 else 8


def filter_uses(nodes: list, initializers: dict) -> dict[str, FilterUse]:
    """Initializer name -> FilterUse, for every initializer some node reads as a filter."""
    out: dict[str, FilterUse] = {}
    for n in nodes:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.inputs) < 2:
            continue
        name = n.inputs[1]
        t = initializers.get(name)
        if t is None:
            continue
        if n.op_type == "MatMul" and t.data.ndim < 2:
            continue
        group = n.attrs.get("group", 1) if n.op_type == "Conv" else 1
        if not isinstance(group, (int, np.integer)):
            raise UserError(f"node '{n.name}': attribute group must be an integer, not {group!r}")
        use = FilterUse(n.name, n.op_type, int(group) > 1,
                        _align_for(n.attrs.get("quant_type"), t.dtype))
        prev = out.get(name)
        if prev is not None and (prev.op_type, prev.depthwise) != (use.op_type, use.depthwise):
            raise UserError(
                f"filter '{name}' is read by '{prev.node}' ({prev.op_type}) and by '{n.name}' "
                f"({n.op_type}) in different layouts; give each node its own copy"
            )
        out.setdefault(name, use)
    return out


def _out_channels(dims: tuple[int, ...], use: FilterUse) -> int:
    return dims[-2] if use.depthwise else dims[-1]


def check_dims(name: str, dims: tuple[int, ...], use: FilterUse, fl: FilterLayout | None) -> None:
    """Refuse filter dims the layout rules do not cover (see the module docstring, rule 2)."""
    where = f"filter '{name}' of {use.op_type} '{use.node}'"
    if use.op_type == "Conv":
        if len(dims) not in (3, 4):
            raise UserError(f"{where}: dims {list(dims)} are not [W, C, N] or [H, W, C, N]")
        if use.depthwise and dims[-1] != 1:
            raise UserError(
                f"{where}: a grouped filter must be depthwise ([H, W, N, 1]), dims are "
                f"{list(dims)}; ESP-DL has no layout for other grouped convolutions"
            )
    elif use.op_type == "Gemm" and (len(dims) != 4 or dims[0] != 1 or dims[1] != 1):
        raise UserError(f"{where}: dims {list(dims)} are not [1, 1, C, N] (transB = 0)")
    if fl is not None:
        if fl.depthwise is not None and fl.depthwise != use.depthwise:
            kind = "depthwise" if fl.depthwise else "ordinary"
            raise UserError(f"{where}: layout '{fl.name}' is for {kind} filters")
        spatial = len(dims) - 2 if use.op_type == "Conv" else 2
        if fl.spatial != spatial:
            raise UserError(f"{where}: layout '{fl.name}' does not fit dims {list(dims)}")


def filter_layout(target: str, dims: tuple[int, ...], use: FilterUse) -> str:
    """The layout name ESP-PPQ gives a filter with these dims on this target."""
    spatial = "W" if use.op_type == "Conv" and len(dims) == 3 else "HW"
    from espstream.targets import arithmetic

    if arithmetic(target) == PLAIN_TARGET:
        return f"{spatial}CN" if use.depthwise else f"N{spatial}C"
    a = use.align
    n = _out_channels(dims, use)
    return f"(N/{a}){spatial}C{a}" + ("_UNALIGNED" if n % a else "")


def annotate_filters(graph) -> list[str]:
    """Give every integer filter without a doc string the layout of `graph.target`.

    For `lower`, which builds filters in the logical layout: the writer packs each filter as its
    doc string says and refuses an integer filter with none. Returns the names it annotated.
    """
    uses = filter_uses(graph.nodes, graph.initializers)
    done = []
    for name, use in uses.items():
        t = graph.initializers[name]
        if t.doc_string is None and t.data.dtype.kind in "iu":
            if graph.target is None:
                raise UserError(f"filter '{name}' needs a layout, but the graph has no target")
            t.doc_string = LAYOUT_PREFIX + filter_layout(graph.target, t.dims, use)
            done.append(name)
    return done


def _slices(data: np.ndarray, use: FilterUse) -> np.ndarray:
    """The filter as [B, H, W, C, N] (ordinary) or [B, H, W, N] (depthwise)."""
    if use.depthwise:
        d = data[..., 0]
        return d.reshape((1, 1) + d.shape) if d.ndim == 2 else d.reshape((1,) + d.shape)
    if use.op_type == "MatMul":
        c, n = data.shape[-2:]
        return data.reshape(-1, 1, 1, c, n)
    if data.ndim == 3:
        return data.reshape((1, 1) + data.shape)
    return data.reshape((1,) + data.shape)


def pack(data: np.ndarray, fl: FilterLayout, use: FilterUse) -> np.ndarray:
    """Logical filter (dims order) -> 1-D array in the file's byte order for layout `fl`."""
    x = _slices(data, use)
    parts = []
    for s in x:
        if use.depthwise:  # s: [H, W, N]
            h, w, n = s.shape
            if fl.align == 0:
                parts.append(s.ravel())
                continue
            a = fl.align
            na = n // a * a
            parts.append(s[..., :na].reshape(h, w, n // a, a).transpose(2, 0, 1, 3).ravel())
            parts.append(s[..., na:].ravel())
        else:  # s: [H, W, C, N]
            h, w, c, n = s.shape
            if fl.align == 0:
                parts.append(s.transpose(3, 0, 1, 2).ravel())
                continue
            a = fl.align
            na = n // a * a
            blk = s[..., :na].reshape(h, w, c, n // a, a).transpose(3, 0, 1, 2, 4)
            parts.append(blk.ravel())
            parts.append(s[..., na:].transpose(3, 0, 1, 2).ravel())
    return np.concatenate(parts) if parts else np.zeros(0, data.dtype)


def unpack(flat: np.ndarray, dims: tuple[int, ...], fl: FilterLayout, use: FilterUse) -> np.ndarray:
    """The inverse of `pack`: file-order values -> logical filter with shape `dims`."""
    logical = np.empty(dims, flat.dtype)
    x = _slices(logical, use)  # a view: reshapes of a fresh contiguous array do not copy
    per = int(np.prod(x.shape[1:], dtype=np.int64))
    for b in range(x.shape[0]):
        src = flat[b * per:(b + 1) * per]
        s = x[b]
        if use.depthwise:
            h, w, n = s.shape
            if fl.align == 0:
                s[...] = src.reshape(h, w, n)
                continue
            a = fl.align
            na = n // a * a
            k = h * w * na
            s[..., :na] = (src[:k].reshape(na // a, h, w, a).transpose(1, 2, 0, 3)
                           .reshape(h, w, na))
            s[..., na:] = src[k:].reshape(h, w, n - na)
        else:
            h, w, c, n = s.shape
            if fl.align == 0:
                s[...] = src.reshape(n, h, w, c).transpose(1, 2, 3, 0)
                continue
            a = fl.align
            na = n // a * a
            k = h * w * c * na
            s[..., :na] = (src[:k].reshape(na // a, h, w, c, a).transpose(1, 2, 3, 0, 4)
                           .reshape(h, w, c, na))
            s[..., na:] = src[k:].reshape(n - na, h, w, c).transpose(1, 2, 3, 0)
    return logical


def layout_arithmetics(filters: list[tuple[str, FilterLayout, int]]) -> tuple[str, ...] | None:
    """The arithmetics (`espstream.targets`) whose kernels read these filters, from (name,
    layout, exponent count); None when there are no filters.

    Plain layouts -> ('c',); blocked with some per-channel exponents -> ('esp32p4',) (only
    PIE v2 reads per-channel weights); blocked per-tensor -> ('esp32s3', 'esp32p4').
    """
    plain = [n for n, fl, _ in filters if fl.align == 0]
    blocked = [n for n, fl, _ in filters if fl.align != 0]
    if plain and blocked:
        raise UserError(
            f"filters mix the plain layout ('{plain[0]}') and the blocked S3/P4 layout "
            f"('{blocked[0]}'); a file is written for one target"
        )
    if plain:
        return (PLAIN_TARGET,)
    if blocked:
        return ("esp32p4",) if any(k > 1 for _, fl, k in filters) else ("esp32s3", "esp32p4")
    return None


def infer_target(filters: list[tuple[str, FilterLayout, int]]) -> str | None:
    """The one arithmetic the filters allow, else None (ambiguous, or no filters)."""
    got = layout_arithmetics(filters)
    return got[0] if got and len(got) == 1 else None

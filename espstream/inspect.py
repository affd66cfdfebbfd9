"""`inspect`: what an .onnx or .espdl file holds, as a readable summary or as JSON data."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from espstream import log
from espstream.errors import UserError
from espstream.espdl import read as read_espdl
from espstream.espdl.reader import HEADER
from espstream.graph import count_ops
from espstream.modelio import parse_model
from espstream.report import table


def inspect_bytes(data: bytes, label: str, target: str | None = None,
                  model: str | None = None, key: bytes | None = None) -> dict[str, Any]:
    """Describe a file's content; the format is told by its first bytes, not its name.

    .espdl only: target (`--target`, checked against the file), model (a packed file's
    member), key (an encrypted model's AES key)."""
    if data[:4] == b"EDL2" or data[:3] == b"PDL" or label.endswith(".espdl"):
        return inspect_espdl(data, target, model, key)
    if target is not None or model is not None or key is not None:
        raise UserError("--target, --model and --key are for .espdl files")
    return inspect_onnx(parse_model(data, label))


# -- ONNX -------------------------------------------------------------------------------------


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _exponent(scale: np.ndarray) -> list[int] | None:
    """log2 of power-of-two scales, or None when a scale is not a power of two."""
    exps = []
    for s in np.asarray(scale, dtype=np.float64).reshape(-1):
        m, e = math.frexp(float(s))
        if m != 0.5:
            return None
        exps.append(e - 1)
    return exps


def inspect_onnx(model: onnx.ModelProto) -> dict[str, Any]:
    inits = {i.name: i for i in model.graph.initializer}
    meta = {p.key: p.value for p in model.metadata_props}
    quant = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(zp.data_type).name if zp else "uint8"
        quant.append({"tensor": node.input[0], "dtype": dtype, "exponents": _exponent(scale)})
    caches = [
        {"node": n.name, "input": n.input[0],
         **{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}}
        for n in model.graph.node if n.op_type == "StreamingCache"
    ]
    streaming = {k[len("espstream."):]: _maybe_json(v) for k, v in meta.items()
                 if k.startswith("espstream.")}
    return {
        "format": "onnx",
        "ir_version": model.ir_version,
        "opsets": {i.domain or "ai.onnx": i.version for i in model.opset_import},
        "producer": model.producer_name,
        "inputs": {i.name: _dims(i) for i in model.graph.input if i.name not in inits},
        "outputs": {o.name: _dims(o) for o in model.graph.output},
        "nodes": len(model.graph.node),
        "ops": count_ops(model),
        "parameters": int(sum(np.prod(i.dims, dtype=np.int64) for i in inits.values())),
        "metadata": streaming,
        "quantized_tensors": quant,
        "streaming_caches": caches,
    }


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# -- .espdl -----------------------------------------------------------------------------------


def _tensor_row(t) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype.name, "dims": list(t.dims),
            "layout": t.layout, "exponents": list(t.exponents), "bytes": int(t.data.nbytes)}


def inspect_espdl(data: bytes, target: str | None = None, model: str | None = None,
                  key: bytes | None = None) -> dict[str, Any]:
    from espstream.espdl import pack
    from espstream.espdl.open import open_model
    from espstream.targets import resolve

    if pack.is_packed(data) and model is None:
        pkg = pack.unpack(data)
        if len(pkg.members) > 1:  # a table of the members; --model NAME shows one
            return {"format": "espdl-package", "package": pkg.to_json(), "file_bytes": len(data),
                    "encrypted": {m.name: m.data[4:8] == b"\x01\0\0\0" for m in pkg.members}}
    opened = open_model(data, model, key)
    file_bytes = len(data)
    data = opened.data
    graph = read_espdl(data)
    magic, mode, length, _ = HEADER.unpack_from(data, 0)
    if opened.encrypted:
        mode = 1
    try:
        chosen = resolve(graph, target).to_json()
    except UserError as e:
        if target is not None:
            raise
        chosen = {"target": None, "reason": str(e)}
    caches = []
    for n in graph.nodes:
        if n.op_type == "StreamingCache":
            caches.append({"node": n.name, "input": n.inputs[0],
                           "window_size": n.attrs.get("window_size"),
                           "frame_axis": n.attrs.get("frame_axis"),
                           "bytes": graph.cache_bytes(n)})
    ops: dict[str, int] = {}
    for n in graph.nodes:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1

    def attrs(a: dict) -> dict:
        return {k: (v if not hasattr(v, "data") else f"<tensor {v.name}>") for k, v in a.items()}

    return {
        "format": "espdl",
        "header": {"magic": magic.decode(), "mode": mode, "payload_bytes": length,
                   "file_bytes": file_bytes},
        **opened.to_json(),
        "target": chosen["target"],
        "target_choice": chosen,
        "metadata": {k: _maybe_json(v) for k, v in graph.metadata.items()},
        "inputs": [{"name": v.name, "dtype": str(v.dtype), "shape": v.shape,
                    "exponents": v.exponents} for v in graph.inputs],
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": v.shape,
                     "exponents": v.exponents} for v in graph.outputs],
        "ops": dict(sorted(ops.items())),
        "nodes": [{"op": n.op_type, "name": n.name, "inputs": n.inputs, "outputs": n.outputs,
                   "attrs": attrs(n.attrs)} for n in graph.nodes],
        "initializers": [_tensor_row(t) for t in graph.initializers.values()],
        "parameter_bytes": int(sum(t.data.nbytes for t in graph.initializers.values())),
        "streaming_caches": caches,
        "cache_bytes": sum(c["bytes"] or 0 for c in caches),
        # GRU / LSTM states: ESP-DL keeps none between calls, the application feeds them back
        "recurrent_states": json.loads(graph.metadata.get("espstream.recurrent_states", "[]")),
        "test_inputs": [_tensor_row(t) for t in graph.test_inputs.values()],
        "test_outputs": [_tensor_row(t) for t in graph.test_outputs.values()],
    }


# -- human summary ----------------------------------------------------------------------------


def print_summary(info: dict[str, Any]) -> None:
    """The readable form, on stderr (stdout stays free for --json -)."""
    if info["format"] == "onnx":
        log.info(f"ONNX model, IR {info['ir_version']}, opsets {info['opsets']}, "
                 f"{info['nodes']} nodes, {info['parameters']} parameters")
        for name, dims in info["inputs"].items():
            log.info(f"input  {name}: {dims}")
        for name, dims in info["outputs"].items():
            log.info(f"output {name}: {dims}")
        log.info(table(("op", "count"), info["ops"].items()))
        if info["metadata"]:
            log.info("espstream metadata:")
            for k, v in info["metadata"].items():
                log.info(f"  {k}: {json.dumps(v)}")
        if info["quantized_tensors"]:
            rows = [(q["tensor"], q["dtype"], q["exponents"]) for q in info["quantized_tensors"]]
            log.info(table(("quantized tensor", "type", "exponent"), rows))
        if info["streaming_caches"]:
            rows = [(c["node"], c["input"], c.get("window_size"), c.get("axis"))
                    for c in info["streaming_caches"]]
            log.info(table(("cache", "tensor", "window", "axis"), rows))
        return
    if info["format"] == "espdl-package":
        pkg = info["package"]
        log.info(f"packed {pkg['format']}" + (f" version {pkg['version']}, SHA-256 ok"
                                               if pkg["format"] == "PDL3" else "")
                 + f", {info['file_bytes']} bytes; show one model with --model NAME")
        log.info(table(("model", "offset", "bytes", "encrypted"),
                       [(m["name"], m["offset"], m["bytes"],
                         "yes" if info["encrypted"][m["name"]] else "no")
                        for m in pkg["models"]]))
        return
    h = info["header"]
    pkg = info.get("package")
    if pkg:
        log.info(f"packed {pkg['format']}" + (f" version {pkg['version']}, SHA-256 ok"
                                               if pkg["format"] == "PDL3" else "")
                 + f", {len(pkg['models'])} model(s): "
                 + ", ".join(m["name"] for m in pkg["models"]) + f"; showing {info['member']}")
    mode = "1 (encrypted, decrypted with the key)" if info.get("encrypted") else h["mode"]
    log.info(f".espdl {h['magic']} mode {mode}, payload {h['payload_bytes']} bytes, "
             f"file {h['file_bytes']} bytes")
    c = info["target_choice"]
    if c["target"]:
        from espstream.targets import chip

        log.info(f"target {chip(c['target']).describe()}: {c['reason']}")
    else:
        log.info(f"target unknown: {c['reason']}")
    for v in info["inputs"]:
        log.info(f"input  {v['name']}: {v['dtype']} {v['shape']} exponents {v['exponents']}")
    for v in info["outputs"]:
        log.info(f"output {v['name']}: {v['dtype']} {v['shape']} exponents {v['exponents']}")
    rows = [(n["op"], n["name"], ", ".join(f"{k}={v}" for k, v in n["attrs"].items()))
            for n in info["nodes"]]
    log.info(table(("op", "node", "attributes"), rows))
    rows = [(t["name"], t["dtype"], t["dims"], t["layout"] or "", _short(t["exponents"]))
            for t in info["initializers"]]
    log.info(table(("initializer", "type", "dims", "layout", "exponents"), rows))
    log.info(f"parameter bytes: {info['parameter_bytes']}")
    if info["streaming_caches"]:
        rows = [(c["node"], c["window_size"], c["frame_axis"], c["bytes"])
                for c in info["streaming_caches"]]
        log.info(table(("cache", "window", "frame axis", "bytes"), rows))
        log.info(f"cache bytes: {info['cache_bytes']}")
    for r in info.get("recurrent_states", []):
        log.info(f"recurrent state: the application copies output {r['output']} to input "
                 f"{r['input']} after each call ({r['dtype']}, exponent {r['exponent']}; zeros "
                 "at the start of a stream)")
    tests = info["test_inputs"] + info["test_outputs"]
    if tests:
        log.info(table(("test value", "type", "dims", "exponents"),
                       [(t["name"], t["dtype"], t["dims"], t["exponents"]) for t in tests]))
    else:
        log.info("no test values")


def _short(exps: list[int]) -> str:
    if len(set(exps)) == 1 and len(exps) > 1:
        return f"{exps[0]} (x{len(exps)})"
    return str(exps)


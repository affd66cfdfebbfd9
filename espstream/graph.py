"""Small helpers over onnx-graphsurgeon shared by the stages."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph`, keeping the IR version, opsets, functions and metadata of `like`; the
    default domain's opset is the graph's when a pass raised it (optimize's fuse_layernorm)."""
    model = gs.export_onnx(graph, do_type_check=False)
    opsets = []
    for o in like.opset_import:  # copies, so an unchanged model serialises byte for byte
        opset = onnx.OperatorSetIdProto()
        opset.CopyFrom(o)
        if o.domain in ("", "ai.onnx") and graph.opset > o.version:
            opset.version = graph.opset
        opsets.append(opset)
    # IR < 4 wants initializers listed as inputs; an upgraded opset may need a newer IR anyway
    needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model.ir_version = max(like.ir_version, needed, 4)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    exported = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in like.functions if (f.domain, f.name) not in exported)
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


def constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor, or None when it is computed at run time."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def is_absent(tensor: gs.Tensor | None) -> bool:
    """An omitted optional input (empty name)."""
    return tensor is None or (isinstance(tensor, gs.Variable) and tensor.name == "")


def only_consumer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The single node reading `tensor`, if exactly one does and it is not a graph output."""
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def attr(node: gs.Node, name: str, default: Any = None) -> Any:
    return node.attrs.get(name, default)


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads `old` read `new` instead."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def input_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Graph inputs (not initializers) with their dims: int, symbolic name, or None."""
    inits = {i.name for i in model.graph.initializer}
    shapes: dict[str, list[int | str | None]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims: list[int | str | None] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[vi.name] = dims
    return shapes

"""espstream.StreamingCache(x, state) -> (y, next_state): the cache streamify writes.

Calibrate (plan rule 9): y shares x's exponent; state and next_state stay float (they carry
x's frames, already on its grid); a constant x (the start mask) is stored at its own minmax
exponent. Lower (lower's rule 8): ESP-DL's single-input `StreamingCache` (`frame_axis` in the
runtime layout, `window_size`); the state pair leaves the graph. Simulate (sim's rule 10): keeps
W - 1 frames, zero at start, output [kept ; chunk], copied byte-flat as the runtime does.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.lower import Act, Lowerer, QConst, base_name, perm_of
from espstream.ops.registry import (
    ESPPPQ_FIXTURE,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant.plan import (
    FLOAT,
    INTERNAL,
    SHARE,
    Plan,
    PlanCtx,
)
from espstream.sim import (
    Fn,
    Simulator,
)

MODULE = "streaming_cache"


def _plan_cache(plan: Plan, n: onnx.NodeProto, inits, const_float) -> None:
    """Rule 9: StreamingCache(x, state) -> (y, next_state)."""
    if n.op_type != "StreamingCache" or len(n.input) != 2 or len(n.output) != 2:
        raise UserError(
            f"node {n.name!r}: {n.domain}.{n.op_type} with {len(n.input)} inputs / "
            f"{len(n.output)} outputs is not a StreamingCache(x, state) -> (y, next_state)"
        )
    x, y, nxt = n.input[0], n.output[0], n.output[1]
    if x in plan.state:
        if plan.state[x] == FLOAT:
            raise UserError(
                f"node {n.name!r} (StreamingCache) caches {x!r}, the float output of a Softmax; "
                "ESP-DL caches integer tensors only"
            )
        plan.state[y] = SHARE
        plan.share_root[y] = plan.root(x)
    elif const_float(x):
        c = numpy_helper.to_array(inits[x]).astype(np.float64)
        plan.const_ranges[x] = (min(float(c.min()), 0.0), max(float(c.max()), 0.0))
        plan.const_inputs.append((n.name, 0, "own"))
        plan.state[y] = SHARE
        plan.share_root[y] = x
    else:
        raise UserError(f"node {n.name!r} (StreamingCache) caches {x!r}, which is neither an "
                        "activation nor a float constant")
    plan.state[nxt] = INTERNAL


def calibrate_cache(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    _plan_cache(pc.plan, n, pc.inits, pc.const_float)


def lower_streaming_cache(lw: Lowerer, n: onnx.NodeProto) -> None:
    if n.op_type != "StreamingCache":
        raise UserError(f"{n.domain}.{n.op_type} '{n.name}': unknown espstream operator")
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    if "window_size" not in attrs or "axis" not in attrs:
        raise UserError(f"StreamingCache '{n.name}' lacks window_size or axis")
    if len(n.input) != 2 or len(n.output) != 2:
        raise UserError(f"StreamingCache '{n.name}' must take (x, state) and return "
                        "(y, next_state)")
    state, nxt = n.input[1], n.output[1]
    if (state, nxt) not in lw.states:
        raise UserError(f"StreamingCache '{n.name}': its state '{state}' -> '{nxt}' is not a "
                        "pair of espstream.states (run espstream streamify)")
    qc = None if n.input[0] in lw.acts else lw.qconst(n.input[0])
    x = _const_act(lw, n, n.input[0], qc) if qc is not None else lw.act(n.input[0], n)
    if x.rank >= 3:
        x = lw.layout_as(x, True)
    fa = x.runtime_axis(int(attrs["axis"]))
    before = x.runtime_shape()[:fa]
    if any(d != 1 for d in before):
        raise UserError(f"StreamingCache '{n.name}': runtime shape {x.runtime_shape()} has "
                        f"axes of size > 1 before the frame axis {fa}; ESP-DL's cache copies "
                        "frames flatly")
    name, out = lw.define_output(n.output[0], n, lw.shape(n.output[0]), x.cl, x)
    lw.need_q(n, out)
    lw.emit("StreamingCache", n.name, [x.name], [name],
              {"frame_axis": fa, "quant_type": lw.qtype(x.dtype),
               "window_size": int(attrs["window_size"])})
    lw.finish_output(out)
    if any(c.op_type != "StreamingCache" for c in lw.consumers.get(state, [])):
        raise UserError(f"state '{state}' is read by other nodes than StreamingCache "
                        f"'{n.name}'")


def _const_act(lw: Lowerer, n: onnx.NodeProto, name: str, qc: QConst) -> Act:
    """A quantized constant read where an activation is expected (streamify's start mask:
    a StreamingCache over int8 ones): an initializer in the runtime layout (rule 8)."""
    if len(qc.exps) != 1 or qc.data.dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
        raise UserError(f"{n.op_type} '{n.name}': constant input '{name}' must be an int8 / "
                        "int16 tensor with one exponent")
    rank = qc.data.ndim
    data = np.transpose(qc.data, perm_of(rank)) if rank >= 3 else qc.data
    init = lw.initializer(base_name(name), data, qc.exps)
    return Act(init, qc.exps[0], list(qc.data.shape), rank >= 3, qc.data.dtype)


def sim_streaming_cache(sim: Simulator, node: Node) -> Fn:
    window = int(node.attrs.get("window_size", 1))
    axis = int(node.attrs.get("frame_axis", 1))
    if window < 1:
        raise UserError(f"node '{node.name}' (StreamingCache): window_size {window} < 1")
    sim.same_exponent(node)
    key, caches = node.name, sim.cache_state
    caches[key] = None  # None: all zeros, allocated on the first call (as the runtime does)
    step = sim.kernels.cache_step  # the fast one: three memcpy's; reference: a concatenate

    def fn(args: list) -> list:
        out, caches[key] = step(caches[key], args[0], window, axis)
        return [out]

    return fn


register(OpSpec("StreamingCache", MODULE, domain="espstream", calibrate=calibrate_cache,
                calibrate_rule="input's exponent; state stays float",
                stream_rule="written by streamify", lower=lower_streaming_cache,
                espdl=("StreamingCache",)))
register_sim(SimSpec("StreamingCache", MODULE, sim_streaming_cache, ESPPPQ_FIXTURE))

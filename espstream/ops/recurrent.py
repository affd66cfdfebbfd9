"""GRU, LSTM and RNN: streamed in float with their state as a model input / output pair; not
calibrated or lowered yet.

Streamify (`rule_recurrent`): forward only, on the sequence axis, zero initial state; the
hidden (and cell) state becomes a state pair fed as initial_h (initial_c) and taken from Y_h
(Y_c).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.ops.registry import (
    OpSpec,
    register,
)
from espstream.stream.axes import WARM_ALL, Summary, Time
from espstream.stream.rules import (
    Ctx,
    Recurrent,
    generic,
    unsupported,
)

MODULE = "recurrent"


def rule_recurrent(ctx: Ctx, node: gs.Node) -> None:
    """GRU, LSTM, RNN along the time axis.

    1. Forward direction only; no `sequence_lens`; the input's time axis is the sequence axis
       (0, or 1 with layout=1); an initial state, if given, must be constant zeros.
    2. The hidden state (and LSTM's cell state) becomes a state input fed as initial_h
       (initial_c) and a state output taken from Y_h (Y_c): zero at start, like every state.
    3. The input must not lag (a pre-start frame would step the recurrence); a warm-up frame in
       front makes every later frame warm.
    4. Y carries the time axis; Y_h / Y_c are summaries (equal to offline after the last chunk).
    """
    x = node.inputs[0]
    xt = ctx.get(x)
    if not isinstance(xt, Time):
        return generic(ctx, node)
    layout = int(node.attrs.get("layout", 0))
    seq_axis = 1 if layout == 1 else 0
    direction = node.attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction != "forward":
        raise unsupported(node, f"runs {direction} over time")
    if xt.axis != seq_axis:
        raise unsupported(node, "has the time axis off its sequence axis")
    if len(node.inputs) > 4 and node.inputs[4].name:
        raise unsupported(node, "takes sequence_lens")
    if xt.delay > 0:
        raise unsupported(
            node,
            f"reads a tensor that lags {xt.delay} frame(s) behind (lookahead upstream); its "
            "pre-start frames would step the recurrence",
        )
    n_states = 2 if node.op == "LSTM" else 1
    hidden = int(node.attrs["hidden_size"])
    batch = ctx.shapes[x.name][1 - seq_axis]
    slots = []
    for k in range(n_states):
        slot = 5 + k
        if len(node.inputs) > slot and node.inputs[slot].name:
            v = ctx.consts.value(node.inputs[slot])
            if v is None or np.any(v):
                raise unsupported(node, "starts from a non-zero or computed initial state")
        shape = [batch, 1, hidden] if layout == 1 else [1, batch, hidden]
        slots.append((slot, 1 + k, shape))
    ctx.recurrent.append(Recurrent(node, slots))
    warm = WARM_ALL if xt.warmup else 0
    y = node.outputs[0]
    if y.name:
        ctx.set(
            y,
            xt.but(
                axis=seq_axis,
                length=ctx.length(y, seq_axis),
                dirty=False,
                warmup=warm,
                nonneg=False,
            ),
        )
    for o in node.outputs[1:]:
        if o.name:
            ok = not warm and ctx.ends_aligned(xt)
            ctx.set(o, Summary(lag=0, warm=bool(warm), comparable=ok))


for _op in ("GRU", "LSTM", "RNN"):
    register(OpSpec(_op, MODULE, stream=rule_recurrent,
                    stream_rule="state pair (initial_h / Y_h, initial_c / Y_c)"))

"""GRU and LSTM: calibrated, streamed with their state as a model input / output pair,
lowered to ESP-DL's `GRU` / `LSTM` and simulated as ESP-DL 3.3.9's C code computes them
(dl_module_gru.hpp, dl_module_lstm.hpp, dl_base_dotprod.cpp, dl_math.hpp); RNN streams in float
only (ESP-DL has no RNN).

Calibrate (`calibrate_rnn`, `choose_gate_exponents`, `quantize_recurrent`): W and R per tensor,
B int16 at a gate exponent chosen from the data, Y / Y_h / initial_h one exponent, LSTM Y_c and
initial_c int16 at the gate exponent; the gate exponent is recorded in the metadata
`espstream.gate_exponents`. Refused with one line: linear_before_reset=0, input_forget=1,
direction reverse, activations other than the defaults / clip / sequence_lens / peepholes,
RNN; batch > 1 at export.
Streamify (`rule_recurrent`): forward only, on the sequence axis, zero initial state (also a
calibrated one behind its DequantizeLinear); the hidden (and cell) state becomes a state pair
fed as initial_h (initial_c) and taken from Y_h (Y_c). Lower (`lower_rnn`): the node as ESP-PPQ
1.3.12 writes it; a recurrent state pair stays a graph input / output pair (ESP-DL keeps no
recurrent state between calls; `recurrent_pair_node`, metadata espstream.recurrent_states).
Simulate (`sim_rnn` -> `rnn_forward`, twin `rnn_oracle`): the rules of `rnn_forward`; with the
fast kernels the same steps run as one C loop (`rnn_kernel`, tested against both).

What the chip may compute otherwise: ESP-DL is built with -ffast-math -O3, so the float update's
multiply-adds may be fused on chips with an FMA (esp32s3, esp32p4; `rnn_forward(fused=True)`,
benchmarks/recurrent_fma.py); expf on the chip (newlib) and on the host may differ in the last
bit of a table entry.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from espstream import log
from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.kernels.reference import round_shift
from espstream.lower import Act, Lowerer, base_name
from espstream.ops._linear import weight
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.quant import scheme
from espstream.quant.observers import weight_exponents
from espstream.quant.plan import FLOAT, OWN, SHARE, Layer, Plan, PlanCtx
from espstream.sim import _INT_RANGE, Fn, Simulator
from espstream.stream.axes import WARM_ALL, Summary, Time
from espstream.stream.rules import (
    Ctx,
    Recurrent,
    generic,
    unsupported,
)

MODULE = "recurrent"


def _state_value(ctx: Ctx, t: gs.Tensor) -> np.ndarray | None:
    """A constant initial state's value; in a calibrated model, the integers behind its
    DequantizeLinear (zero stays zero at any scale, with zero point 0)."""
    v = ctx.consts.value(t)
    if v is not None or not t.inputs or t.inputs[0].op != "DequantizeLinear":
        return v
    dq = t.inputs[0]
    q = ctx.consts.value(dq.inputs[0])
    zp = ctx.consts.value(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else 0
    if q is None or zp is None or np.any(zp):
        return None
    return q


def _through_qdq(t: gs.Tensor, up: bool) -> gs.Tensor:
    """t, or the tensor at the far end of a QuantizeLinear -> DequantizeLinear pair next to it
    (upstream of t if `up`, else downstream)."""
    if up:
        if t.inputs and t.inputs[0].op == "DequantizeLinear":
            q = t.inputs[0].inputs[0]
            if q.inputs and q.inputs[0].op == "QuantizeLinear" and len(q.outputs) == 1:
                return q.inputs[0].inputs[0]
        return t
    if len(t.outputs) == 1 and t.outputs[0].op == "QuantizeLinear":
        q = t.outputs[0].outputs[0]
        if len(q.outputs) == 1 and q.outputs[0].op == "DequantizeLinear":
            return q.outputs[0].outputs[0]
    return t


def explicit_state(graph: gs.Graph, node: gs.Node, slot: int,
                   out_slot: int) -> tuple[gs.Variable, gs.Variable] | None:
    """(graph input, graph output) when a recurrent node's initial state is an explicit model
    state, as VAD models ship it: the state slot reads a graph input (behind its Q/DQ pair in
    a calibrated model) read only here, and the matching output (Y_h / Y_c, possibly behind a
    Q/DQ pair) is a graph output. Else None."""
    src = _through_qdq(node.inputs[slot], up=True)
    if src not in graph.inputs or len(src.outputs) != 1:
        return None
    if len(node.outputs) <= out_slot or not node.outputs[out_slot].name:
        return None
    dst = _through_qdq(node.outputs[out_slot], up=False)
    if dst not in graph.outputs:
        return None
    return src, dst


def rule_recurrent(ctx: Ctx, node: gs.Node) -> None:
    """GRU, LSTM, RNN along the time axis.

    1. Forward direction only; no `sequence_lens`; the input's time axis is the sequence axis
       (0, or 1 with layout=1); an initial state, if given, must be constant zeros, or an
       explicit state (`explicit_state`: a graph input read only here whose Y_h / Y_c is a
       graph output, as VAD models ship it).
    2. The hidden state (and LSTM's cell state) becomes a state input fed as initial_h
       (initial_c) and a state output taken from Y_h (Y_c): zero at start, like every state.
       An explicit state keeps its own graph input and output as the pair (the offline model
       is the one fed zeros there).
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
        shape = [batch, 1, hidden] if layout == 1 else [1, batch, hidden]
        if len(node.inputs) > slot and node.inputs[slot].name:
            pair = explicit_state(ctx.graph, node, slot, 1 + k)
            if pair is not None:
                slots.append((slot, 1 + k, shape, *pair))
                continue
            v = _state_value(ctx, node.inputs[slot])
            if v is None or np.any(v):
                raise unsupported(node, "starts from a non-zero or computed initial state "
                                  "(an explicit state must be a graph input read only here, "
                                  "paired with Y_h / Y_c as a graph output)")
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



# ---- calibrate ------------------------------------------------------------------------------

#: the finest gate exponent chosen, per width: ESP-DL builds a float sigmoid and a tanh table
#: per node with (6.3 + 3.5) * 2^-e entries (2^-10: about 40 KB of RAM per GRU / LSTM, 2^-12:
#: 160 KB). The gates' step bounds the layer's accuracy: at 2^-10 an int16 LSTM measured 3.5 dB
#: below its fake-quant model (float gates); at 2^-12 the bundled int16 models are 2.2-4.9 dB
#: below it on held-out data (benchmarks/recurrent_models_sqnr.py), above 70 dB, which convert's
#: check 5 caps at SQNR_CAP_DB (60 dB), so it passes them.
GATE_EXP_MIN = {8: -10, 16: -12}
#: headroom over the largest observed pre-activation: the int16 sums wrap on the chip
GATE_HEADROOM = 1.25
#: calibration samples run to observe the gate pre-activations
GATE_SAMPLES = 64
#: share of gate inputs beyond the tables' range (SIGMOID_BOUND / TANH_BOUND: ESP-DL returns
#: the last entry there) above which calibrate warns and a failed int-vs-fake-quant check says
#: so: NSNet2 48 kHz on noise, 31% of one GRU's sigmoid inputs, costs it 28 dB (31 dB left);
#: its 16 kHz model, 0.35% in one GRU, passes the check
GATE_SATURATED_SHARE = 0.01


def _attr(n: onnx.NodeProto, key: str, default=None):
    for a in n.attribute:
        if a.name == key:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


#: ONNX's default gate activations per direction, which ESP-DL's GRU / LSTM compute
DEFAULT_ACTIVATIONS = {"GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


def check_rnn_attrs(n: onnx.NodeProto) -> int:
    """The refusals ESP-DL's GRU / LSTM imply (one line each); returns the direction count."""
    op, where = n.op_type, f"node {n.name!r} ({n.op_type})"
    if op == "RNN":
        raise UserError(f"{where}: ESP-DL has no RNN operator (GRU and LSTM only)")
    if op == "GRU" and int(_attr(n, "linear_before_reset", 0)) != 1:
        raise UserError(f"{where}: linear_before_reset=0 (Keras' GRU); ESP-DL's GRU computes "
                        "only linear_before_reset=1 (PyTorch's) and creates no module otherwise")
    if op == "LSTM" and int(_attr(n, "input_forget", 0)) != 0:
        raise UserError(f"{where}: input_forget=1 (coupled input and forget gates) is not "
                        "computed by ESP-DL's LSTM")
    if int(_attr(n, "layout", 0)) != 0:
        raise UserError(f"{where}: layout=1 (batch first); ESP-DL's {op} declares its outputs "
                        "[seq, directions, batch, hidden] whatever the layout: export the model "
                        "with layout 0 (PyTorch writes a Transpose before the layer)")
    direction = _attr(n, "direction", "forward")
    if direction == "reverse":
        raise UserError(f"{where}: direction 'reverse'; ESP-DL reads only 'bidirectional' and "
                        "runs anything else forward")
    dirs = 2 if direction == "bidirectional" else 1
    acts = _attr(n, "activations")
    if acts is not None and [a.decode() if isinstance(a, bytes) else a for a in acts] \
            == DEFAULT_ACTIVATIONS[op] * dirs:
        acts = None  # the defaults written out (Keras' exporters do): what ESP-DL computes
    for key in ("activations", "activation_alpha", "activation_beta", "clip"):
        if (acts if key == "activations" else _attr(n, key)) is not None:
            raise UserError(f"{where}: attribute {key!r} is set; ESP-DL ignores it (default "
                            "sigmoid / tanh gates, no clip), so the chip would compute "
                            "something else")
    if len(n.input) > 4 and n.input[4]:
        raise UserError(f"{where}: sequence_lens is given; ESP-DL ignores it (every sequence "
                        "runs to its full length)")
    if op == "LSTM" and len(n.input) > 7 and n.input[7]:
        raise UserError(f"{where}: peephole weights P are not computed by ESP-DL's LSTM")
    return dirs


def calibrate_rnn(pc: PlanCtx, n: onnx.NodeProto, float_outs: list[str]) -> None:
    """GRU / LSTM.

    1. W and R float constants (per tensor: ESP-DL reads one exponent each), B a constant or
       absent; X an activation.
    2. Y gets an exponent of its own; Y_h shares it; initial_h, a graph input read only here,
       adopts it (ESP-DL copies initial_h into the state without rescaling), a constant is
       stored at it; a computed initial_h is refused.
    3. LSTM: Y_c and initial_c are int16 at the gate exponent (no Q/DQ: the fake-quant model
       keeps them float); initial_c is a constant or a graph input read only here; Y_c may
       only be a graph output.
    4. The gate exponent is chosen from the data (`choose_gate_exponents`), biases are int16 at
       it (`quantize_recurrent`).
    """
    plan, inits = pc.plan, pc.inits
    dirs = check_rnn_attrs(n)
    where = f"node {n.name!r} ({n.op_type})"
    if n.input[0] not in plan.state:
        raise UserError(f"{where}: its input X is a constant; fold it with `espstream optimize`")
    for k, what in ((1, "W"), (2, "R")):
        if not pc.const_float(n.input[k]):
            raise UserError(f"{where}: its weight {what} is not a float constant")
    if len(n.input) > 3 and n.input[3] and not pc.const_float(n.input[3]):
        raise UserError(f"{where}: its bias B is not a float constant")
    y = n.output[0] if n.output and n.output[0] else ""
    yh = n.output[1] if len(n.output) > 1 and n.output[1] else ""
    main = y or yh
    if not main:
        raise UserError(f"{where}: neither Y nor Y_h is used")
    plan.state[main] = OWN
    plan.layers.append(Layer(n.name, n.op_type, "own", [n.name], main))
    if y and yh:
        plan.state[yh] = SHARE
        plan.share_root[yh] = plan.root(main)
    info: dict = {"dirs": dirs, "x": n.input[0], "y": main, "h0": "", "h0_const": False,
                  "c0_const": False}
    h0 = n.input[5] if len(n.input) > 5 and n.input[5] else ""
    if h0:
        if h0 in inits:
            info["h0_const"] = True
        elif h0 in plan.inputs and len(pc.consumers.get(h0, [])) == 1:
            plan.adopt.append((main, [h0]))
        else:
            raise UserError(f"{where}: initial_h {h0!r} is computed (or read elsewhere); ESP-DL "
                            "copies initial_h into the state as it is, so it must be a graph "
                            "input read only here, or a constant")
        info["h0"] = h0
    if n.op_type == "LSTM":
        c0 = n.input[6] if len(n.input) > 6 and n.input[6] else ""
        if c0 and c0 not in inits:
            users = pc.consumers.get(c0, [])
            if c0 not in plan.inputs or len(users) != 1 or list(users[0].input).count(c0) != 1:
                raise UserError(f"{where}: initial_c {c0!r} is computed (or read elsewhere); "
                                "ESP-DL reads it as int16 at the gate exponent, so it must be "
                                "a graph input read only here, or a constant")
            # no Q/DQ (an 8-bit model has no int16 QuantizeLinear): lower declares the input
            # int16 at the gate exponent (`c_input_exponent`)
            plan.state.pop(c0)
            plan.inputs.remove(c0)
            plan.layers = [la for la in plan.layers if la.output != c0]
        info["c0_const"] = bool(c0) and c0 in inits
        yc = n.output[2] if len(n.output) > 2 and n.output[2] else ""
        if yc:
            if pc.consumers.get(yc):
                raise UserError(f"{where}: Y_c is read by another node; ESP-DL's Y_c is int16 "
                                "at the gate exponent and may only be a graph output")
            plan.state[yc] = FLOAT
    plan.recurrent[n.name] = info


def _float_rnn_preacts(kind: str, w, r, b, x, h_prev, c0, dirs: int,
                       beyond: np.ndarray | None = None) -> tuple[float, float]:
    """max |pre-activation| (what ESP-DL holds in int16 at the gate exponent) and max |c| of
    one sample, in float64: x [seq, I], h_prev [seq, dirs, H] (the state before each step).

    beyond: if given, int64 [4] += (sigmoid inputs beyond +-SIGMOID_BOUND, sigmoid inputs,
    tanh inputs beyond +-TANH_BOUND, tanh inputs): where ESP-DL's gate tables saturate."""
    G = 3 if kind == "GRU" else 4
    top = 0.0
    cmax = 0.0
    sb, tb = float(SIGMOID_BOUND), float(TANH_BOUND)

    def count(sig: np.ndarray, tanh: np.ndarray) -> None:
        if beyond is not None:
            beyond[:] += [int(np.sum(np.abs(sig) > sb)), sig.size,
                       int(np.sum(np.abs(tanh) > tb)), tanh.size]
    for d in range(dirs):
        H = r.shape[2]
        wb = b[d, :G * H] if b is not None else 0.0
        rb = b[d, G * H:] if b is not None else 0.0
        ic = x @ w[d].T + wb  # [seq, G*H]
        hc = h_prev[:, d] @ r[d].T + rb
        if kind == "GRU":
            zr = ic[:, :2 * H] + hc[:, :2 * H]
            top = max(top, float(np.abs(ic).max()), float(np.abs(hc).max()),
                      float(np.abs(zr).max()))
            r_g = 0.5 + 0.5 * np.tanh(0.5 * zr[:, H:])  # sigmoid, no overflow in exp
            count(zr, ic[:, 2 * H:] + r_g * hc[:, 2 * H:])  # tanh reads ic_n + r * hc_n
        else:
            s = ic + hc
            top = max(top, float(np.abs(ic).max()), float(np.abs(s).max()))
            sg = 1.0 / (1.0 + np.exp(-s))
            i_g, f_g, g_g = sg[:, :H], sg[:, 2 * H:3 * H], np.tanh(s[:, 3 * H:])
            c = np.zeros(H) if c0 is None else c0[d].astype(np.float64)
            steps = range(len(x)) if d == 0 else range(len(x) - 1, -1, -1)
            cs = np.empty((len(x), H))
            for t in steps:
                c = f_g[t] * c + i_g[t] * g_g[t]
                cs[t] = c
                cmax = max(cmax, float(np.abs(c).max()))
            count(s[:, :3 * H], np.concatenate([s[:, 3 * H:], cs], axis=1))  # tanh[g], tanh[c]
    return top, cmax


def choose_gate_exponents(fm: onnx.ModelProto, plan: Plan, data, stream=None,
                          bits: int = 8) -> None:
    """Per GRU / LSTM: the finest exponent (not below GATE_EXP_MIN[bits]) at which GATE_HEADROOM
    times the largest |W.x + b_w|, |R.h + b_r|, their sums (and LSTM's |c|) fits int16, over
    up to GATE_SAMPLES calibration samples (a streaming calibration: chunks, states fed back)
    run in float: onnxruntime for X, Y and the initial states, NumPy for the gates."""
    from espstream.quant import engine

    inits = {t.name: t for t in fm.graph.initializer}
    nodes = {n.name: n for n in fm.graph.node}
    names = []
    for name, info in plan.recurrent.items():
        n = nodes[name]
        names += [n.input[0], n.output[0], info["h0"]]
        if n.op_type == "LSTM" and len(n.input) > 6 and not info["c0_const"]:
            names.append(n.input[6])
    names = [x for x in dict.fromkeys(names) if x and x not in inits]
    top = {k: 0.0 for k in plan.recurrent}
    if stream is not None:
        from espstream.quant.stream_calib import StreamRunner

        runner = StreamRunner(fm, names, stream, batch=1)
        runs = (dict(zip(names, vals, strict=True)) for _, vals in runner.run(data))
    else:
        sess = engine.session(engine.with_outputs(fm, names))
        outs = [o.name for o in sess.get_outputs()]
        runs = ({**dict(zip(outs, sess.run(None, s), strict=True)), **s} for s in data)
    beyond = {k: np.zeros(4, np.int64) for k in plan.recurrent}
    for i, vals in enumerate(runs):
        if i >= GATE_SAMPLES:
            break
        for name, info in plan.recurrent.items():
            top[name] = max(top[name], _gate_range(nodes[name], info, vals, inits,
                                                   beyond[name]))
    for name, info in plan.recurrent.items():
        need = top[name] * GATE_HEADROOM / 32767.0
        # kept uncapped: a mixed model may put this layer at the other width (`gate_exponent`)
        info["gate_need"] = math.ceil(math.log2(need)) if need > 0 else None
        info["gate_exp"] = gate_exponent(info, bits)
        b = beyond[name]
        info["gate_saturated"] = {"sigmoid": float(b[0] / max(b[1], 1)),
                                  "tanh": float(b[2] / max(b[3], 1))}
        note = saturation_text(nodes[name].op_type, name, info["gate_saturated"])
        if note:
            log.warn(f"{note}: the integer model departs from the fake-quant one there")


def gate_exponent(info: dict, bits: int) -> int:
    """The gate exponent of a GRU / LSTM computing at `bits` (its plan entry after
    `choose_gate_exponents`): what the data needs, not finer than GATE_EXP_MIN[bits]."""
    if "gate_need" not in info:  # set by hand (tests): as given
        return int(info["gate_exp"])
    need = info["gate_need"]
    return GATE_EXP_MIN[bits] if need is None else max(GATE_EXP_MIN[bits], int(need))


def _gate_range(n: onnx.NodeProto, info: dict, vals: dict, inits: dict,
                beyond: np.ndarray | None = None) -> float:
    """The largest int16 quantity (`_float_rnn_preacts`) of one run of node `n`."""
    def arr(name: str) -> np.ndarray:
        v = vals.get(name)
        return np.asarray(numpy_helper.to_array(inits[name]) if v is None else v, np.float64)

    w, r = arr(n.input[1]), arr(n.input[2])
    b = arr(n.input[3]) if len(n.input) > 3 and n.input[3] else None
    dirs, H = info["dirs"], r.shape[2]
    x = arr(n.input[0])[:, 0]  # layout 0 (check_rnn_attrs), batch 1
    y = arr(n.output[0])[:, :, 0]  # [seq, dirs, H]
    h0 = arr(info["h0"]).reshape(dirs, H) if info["h0"] else np.zeros((dirs, H))
    h_prev = np.empty_like(y)
    h_prev[0, 0], h_prev[1:, 0] = h0[0], y[:-1, 0]
    if dirs == 2:
        h_prev[-1, 1], h_prev[:-1, 1] = h0[1], y[1:, 1]
    c0 = None
    if n.op_type == "LSTM" and len(n.input) > 6 and n.input[6]:
        c0 = arr(n.input[6]).reshape(dirs, H)
    m, cm = _float_rnn_preacts(n.op_type, w, r, b, x, h_prev, c0, dirs, beyond)
    return max(m, cm)


def saturation_text(op: str, name: str, shares: dict) -> str:
    """One clause naming a GRU / LSTM whose gate inputs on the calibration data lie beyond
    ESP-DL's table range in more than GATE_SATURATED_SHARE of cases, else ''."""
    if max(shares.values(), default=0.0) <= GATE_SATURATED_SHARE:
        return ""
    return (f"{op} '{name}': {100 * shares['sigmoid']:.1f}% of its sigmoid and "
            f"{100 * shares['tanh']:.1f}% of its tanh gate inputs (calibration data) lie beyond "
            f"ESP-DL's table range +-{float(SIGMOID_BOUND):g} / +-{float(TANH_BOUND):g}, where "
            f"its tables return {1 / (1 + math.exp(-float(SIGMOID_BOUND))):.4f} / "
            f"{math.tanh(float(TANH_BOUND)):.4f}, not 1 (no exponent changes this)")


def saturated_gates(recurrent: dict) -> dict:
    """{node: shares} of the GRU / LSTMs of a plan (`choose_gate_exponents`) whose gate
    inputs saturate ESP-DL's tables beyond GATE_SATURATED_SHARE (metadata
    espstream.gate_saturation, written only then)."""
    return {k: v["gate_saturated"] for k, v in recurrent.items()
            if max(v.get("gate_saturated", {}).values(), default=0.0) > GATE_SATURATED_SHARE}


def saturation_note(model: onnx.ModelProto) -> str:
    """The `saturation_text` of every GRU / LSTM of a calibrated model (metadata
    espstream.gate_saturation), joined; '' if none saturates."""
    raw = {p.key: p.value for p in model.metadata_props}.get("espstream.gate_saturation")
    if not raw:
        return ""
    ops = {n.name: n.op_type for n in model.graph.node}
    return "; ".join(t for name, shares in sorted(json.loads(raw).items())
                     if (t := saturation_text(ops.get(name, "GRU/LSTM"), name, shares)))


def quantize_recurrent(rw, nodes: dict) -> None:
    """The calibrate rewriter's part for GRU / LSTM (`espstream.quant.calibrate._Rewriter`):
    W and R as integers per tensor (the weight method's exponent), B as int32 values within
    int16 at the gate exponent (ESP-DL reads int16; ONNX's DequantizeLinear of an 8-bit
    model takes no int16), a constant initial_h at Y's exponent, a constant initial_c as int16
    values at the gate exponent. In a mixed model the node's own width (`rw.nbits`) sets the
    weights' width and the gate exponent (ESP-DL's S8 / S16 module reads X, W, R, Y at one
    width)."""
    for name, info in rw.plan.recurrent.items():
        node, onode = nodes[name], rw.onnx_nodes[name]
        bits = rw.nbits(name)
        ge = gate_exponent(info, bits)
        exps = []
        for k in (1, 2):
            w = numpy_helper.to_array(rw.inits[onode.input[k]]).astype(np.float64)
            e = int(weight_exponents(w, None, bits, rw.weight_method)[0])
            exps.append(e)
            q = scheme.quantize(w, e, bits, "half_even")
            node.inputs[k] = rw._int_const(onode.input[k], np.asarray(q), np.array([e]), None)
        rw.weight_exps[name] = exps
        if len(onode.input) > 3 and onode.input[3]:
            b = numpy_helper.to_array(rw.inits[onode.input[3]]).astype(np.float64)
            raw = np.rint(np.ldexp(b, -ge))
            rw.bias_clipped[name] = int(np.sum(np.abs(raw) > 32767))
            bq = np.clip(raw, -32768, 32767).astype(np.int32)
            rw.bias_exps[name] = [ge]
            node.inputs[3] = rw._int_const(onode.input[3], bq, np.array([ge]), None)
        if info["h0_const"]:
            h = numpy_helper.to_array(rw.inits[info["h0"]]).astype(np.float64)
            e = rw.exps[info["y"]]
            q = np.asarray(scheme.quantize(h, e, bits, "half_even"))
            node.inputs[5] = rw._int_const(info["h0"], q, np.array([e]), None)
        if info["c0_const"]:
            c = numpy_helper.to_array(rw.inits[onode.input[6]]).astype(np.float64)
            q = np.clip(np.rint(np.ldexp(c, -ge)), -32768, 32767).astype(np.int32)
            node.inputs[6] = rw._int_const(onode.input[6], q, np.array([ge]), None)


# ---- lower ------------------------------------------------------------------------------------


def _gate_exponent(lw: Lowerer, n: onnx.NodeProto) -> int:
    raw = lw.meta.get("espstream.gate_exponents")
    table = json.loads(raw) if raw else {}
    if n.name not in table:
        raise UserError(f"{n.op_type} '{n.name}': the model records no gate exponent for it "
                        "(espstream.gate_exponents): quantize it with espstream calibrate")
    return int(table[n.name])


def lower_rnn(lw: Lowerer, n: onnx.NodeProto) -> None:
    """ESP-DL's GRU / LSTM node as ESP-PPQ 1.3.12 writes it (tests/data/ops-suite): inputs
    [X, W, R, B, '', initial_h(, initial_c)] (trailing empties dropped), W / R int per tensor in
    ONNX's [dirs, G*H, I] / [dirs, G*H, H] layout, B int16 [dirs, 2*G*H] at the gate exponent;
    attributes hidden_size, gate_exponent, quant_type, and direction / layout /
    linear_before_reset / input_forget as the ONNX node has them; outputs Y [seq, dirs, 1, H],
    Y_h [dirs, 1, H] at one exponent, LSTM Y_c int16 [dirs, 1, H] at the gate exponent. X is
    read in ONNX order (a Transpose from channels-last is inserted before it)."""
    dirs = check_rnn_attrs(n)
    where = f"{n.op_type} '{n.name}'"
    G = 3 if n.op_type == "GRU" else 4
    H = int(_attr(n, "hidden_size"))
    ge = _gate_exponent(lw, n)
    x = lw.layout_as(lw.act(n.input[0], n), False)
    shape = [int(d) if isinstance(d, int) else d for d in x.shape]
    layout = int(_attr(n, "layout", 0))
    if len(shape) != 3:
        raise UserError(f"{where}: input of rank {len(shape)}, expected [seq, batch, input]")
    batch = shape[0] if layout == 1 else shape[1]
    if batch != 1:
        raise UserError(f"{where}: batch {batch}; ESP-DL's {n.op_type} computes batch 1 only")
    seq = shape[1] if layout == 1 else shape[0]
    ins = [x.name]
    for k, what in ((1, "W"), (2, "R")):
        qc = weight(lw, n, k, what)
        if len(qc.exps) != 1:
            raise UserError(f"{where}: {what} is quantized per channel; ESP-DL reads one "
                            "exponent per weight")
        if qc.data.dtype != x.dtype:
            raise UserError(f"{where}: {what} is {qc.data.dtype}, X {x.dtype}; ESP-DL reads "
                            "both at one width")
        ins.append(lw.initializer(base_name(n.input[k]), qc.data, qc.exps))
    if len(n.input) > 3 and n.input[3]:
        qc = weight(lw, n, 3, "bias")
        if qc.exps != [ge]:
            raise UserError(f"{where}: bias at 2^{qc.exps}, gate exponent {ge}: quantize the "
                            "model with espstream calibrate")
        b = qc.data.astype(np.int64).reshape(dirs, 2 * G * H)
        if b.min(initial=0) < -32768 or b.max(initial=0) > 32767:
            raise UserError(f"{where}: bias values beyond int16")
        ins.append(lw.initializer(base_name(n.input[3]), b.astype(np.int16), [ge]))
    else:
        ins.append("")
    ins.append("")  # sequence_lens: ESP-DL reads initial_h at input 5
    y_name = n.output[0] if n.output and n.output[0] else ""
    yh_name = n.output[1] if len(n.output) > 1 and n.output[1] else ""
    main = y_name or yh_name
    qs = lw.q_consumers(main)
    if not qs:
        raise UserError(f"{where}: its output {main!r} is not quantized: not a calibrated model")
    e_y, dtype = lw.q_exp_dtype(qs[0])
    states = [("initial_h", 5, e_y, dtype)]
    if n.op_type == "LSTM":
        states.append(("initial_c", 6, ge, np.dtype(np.int16)))
    for what, k, e, dt in states:
        if len(n.input) <= k or not n.input[k]:
            ins.append("")
            continue
        src = n.input[k]
        if src in lw.acts:
            a = lw.acts[src]
            if a.exp != e or a.dtype != dt:
                raise UserError(f"{where}: {what} is {a.dtype} at 2^{a.exp}, ESP-DL needs {dt} "
                                f"at 2^{e}")
            ins.append(lw.layout_as(a, False).name)
            continue
        qc = lw.qconst(src)
        if qc is None or qc.exps != [e]:
            raise UserError(f"{where}: {what} must be an integer activation or constant at "
                            f"2^{e}: quantize the model with espstream calibrate")
        ins.append(lw.initializer(base_name(src), qc.data.astype(dt).reshape(dirs, 1, H), [e]))
    while ins and ins[-1] == "":
        ins.pop()
    y_shape, h_shape = [seq, dirs, 1, H], [dirs, 1, H]  # layout 0 (check_rnn_attrs)
    at = len(lw.out.nodes)  # the node goes before any requantization of its outputs
    outs = []
    for k, (fname, shp) in enumerate(((y_name, y_shape), (yh_name, h_shape))):
        if not fname:
            a = Act(lw.fresh(f"{n.name}_{'Y' if k == 0 else 'Y_h'}"), e_y, shp, False, dtype)
            lw.value_info(a)
            outs.append(a.name)
            continue
        # Y_h without Q/DQ: streamify's state output, on Y's grid
        nat = Act(fname, e_y, shp, False, dtype) if not lw.q_consumers(fname) else None
        name, a = lw.define_output(fname, n, shp, False, natural=nat)
        lw.need_q(n, a)
        if a.exp != e_y or a.dtype != dtype:
            raise UserError(f"{where}: Y and Y_h must share one exponent (ESP-DL writes the "
                            "same integers to both)")
        lw.finish_output(a)
        outs.append(name)
    if n.op_type == "LSTM":
        yc_name = n.output[2] if len(n.output) > 2 and n.output[2] else ""
        yc = Act(yc_name or lw.fresh(f"{n.name}_Y_c"), ge, h_shape, False, np.dtype(np.int16))
        if yc_name:
            name, a = lw.define_output(yc_name, n, h_shape, False, natural=yc)
            lw.finish_output(a)
            outs.append(name)
        else:
            lw.value_info(yc)
            outs.append(yc.name)
    attrs = {"hidden_size": H, "gate_exponent": ge, "quant_type": lw.qtype(x.dtype)}
    for key in ("direction", "layout", "linear_before_reset", "input_forget"):
        v = _attr(n, key)
        if v is not None:
            attrs[key] = v
    lw.emit(n.op_type, n.name, ins, outs, attrs)
    lw.out.nodes.insert(at, lw.out.nodes.pop())


# ---- ESP-DL's arithmetic --------------------------------------------------------------------

F32 = np.float32
# the range ESP-DL's modules give their gate tables (dl_module_gru.hpp / dl_module_lstm.hpp)
SIGMOID_BOUND, TANH_BOUND = F32(6.3), F32(3.5)


def _sigmoid_f32(x: np.ndarray) -> np.ndarray:
    """dl::math::sigmoid: 1.0 / (1.0 + expf(-x)) in double, returned as float."""
    e = np.exp(-x.astype(np.float64)).astype(F32)  # expf: correctly rounded float
    return (1.0 / (1.0 + e.astype(np.float64))).astype(F32)


def _tanh_f32(x: np.ndarray) -> np.ndarray:
    """dl::math::tanh: 2 * sigmoid(2 * x) - 1, in float."""
    return (F32(2) * _sigmoid_f32(F32(2) * x.astype(F32))) - F32(1)


@dataclass(frozen=True)
class GateTable:
    """math::SigmoidLUT / math::TanhLUT at step 2^e: entries f(i * 2^e), i = 0..qmax, the
    negative half mirrored (sigmoid: 1 - t, tanh: -t), indices beyond qmax clamped."""

    table: np.ndarray  # float32 [qmax + 1]
    qmin: int
    qmax: int
    odd: bool  # tanh (-t) or sigmoid (1 - t)

    def get(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, np.int64)
        pos = np.where(index < self.qmax, index, self.qmax)
        neg = np.where(index > self.qmin, -index, self.qmax)
        tp = self.table[np.clip(pos, 0, self.qmax)]
        tn = self.table[np.clip(neg, 0, self.qmax)]
        tn = -tn if self.odd else F32(1) - tn
        return np.where(index >= 0, tp, tn).astype(F32)


@functools.lru_cache(maxsize=32)
def gate_table(kind: str, e: int) -> GateTable:
    scale = F32(2.0**e)
    bound = SIGMOID_BOUND if kind == "sigmoid" else TANH_BOUND
    qmin = int(-bound / scale) - 1  # (int) truncates toward zero
    qmax = int(bound / scale) + 1
    if -qmin > qmax:
        qmax = -qmin
    else:
        qmin = -qmax
    x = np.arange(qmax + 1, dtype=np.int64).astype(F32) * scale
    t = _sigmoid_f32(x) if kind == "sigmoid" else _tanh_f32(x)
    return GateTable(t, qmin, qmax, kind == "tanh")


def round_c(v: np.ndarray, target: str) -> np.ndarray:
    """dl::tool::round of a float: esp32p4 fcvt.w.s rne (ties to even); else
    floorf(v + 0.5) (the sum in double, converted to float by floorf's argument)."""
    v = np.asarray(v, F32)
    if target == "esp32p4":
        return np.rint(v).astype(np.int64)
    return np.floor((v.astype(np.float64) + 0.5).astype(F32)).astype(np.int64)


def wrap16(v: np.ndarray) -> np.ndarray:
    """An int sum stored into an int16_t (GCC: modulo 2^16)."""
    return ((np.asarray(v, np.int64) + 32768) % 65536 - 32768).astype(np.int64)


def sat(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.asarray(v, np.int64), lo, hi)


def pie_path(target: str, bits: int, length: int, shift: int) -> bool:
    """Whether base::dotprod takes the PIE assembly (integer rounding) or the C path."""
    if target not in ("esp32s3", "esp32p4") or shift < 0:
        return False
    return length % (16 if bits == 8 else 8) == 0


def mat_vec(m: np.ndarray, v: np.ndarray, shift: int, target: str) -> np.ndarray:
    """base::mat_vec_dotprod: int16 rows of m . v at 2^shift.

    PIE (esp32s3: + 2^(shift-1) then >> shift; esp32p4: ties to even): exact integers. C path:
    float(acc) * 2^-shift in float, then tool::round; int16 saturation either way.
    """
    bits = 8 if m.dtype == np.int8 else 16
    acc = m.astype(np.int64) @ v.astype(np.int64)
    if pie_path(target, bits, m.shape[1], shift):
        out = round_shift(acc, shift, "half_even" if target == "esp32p4" else "half_up")
    else:
        scale = F32(2.0 ** -shift)  # DL_RESCALE(shift)
        out = round_c(acc.astype(F32) * scale, target)
    return sat(out, -32768, 32767)


@dataclass
class RnnParams:
    """One ESP-DL GRU / LSTM node's integer operands (per direction: W [G*H, I], R [G*H, H],
    the two int16 biases [G*H] or None)."""

    kind: str  # "GRU" | "LSTM"
    hidden: int
    w: list[np.ndarray]
    r: list[np.ndarray]
    wb: list[np.ndarray | None]
    rb: list[np.ndarray | None]
    gate_exp: int
    w_shift: int  # gate_exp - (e_x + e_W)
    r_shift: int  # gate_exp - (e_Y_h + e_R)
    e_y: int
    dtype: np.dtype  # of X / Y / Y_h
    target: str


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fmaf(a, b, c): one rounding (the float32 product is exact in float64; the float64 sum
    is then rounded to float32, a double rounding that differs from fmaf only in rare ties)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(F32)


def rnn_forward(p: RnnParams, x: np.ndarray, h0: np.ndarray | None, c0: np.ndarray | None,
                fused: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ESP-DL's forward_template, vectorized over the hidden units: x [seq, I] ->
    Y [seq, dirs, H], Y_h [dirs, H], Y_c [dirs, H] (LSTM; int16 at the gate exponent).

    Rules (the C path's order of float operations, float32 throughout):
    1. ic = W.x_t, hc = R.h at the gate exponent (`mat_vec`); biases added into int16 (wrap).
    2. GRU: z, r = sigmoid[ic + hc]; n = tanh[round(ic_n + r * hc_n)];
       h = round((1 - z) * n * 2^-e_y + z * h), saturated.
    3. LSTM: s = int16(ic + wb + hc + rb); i, o, f = sigmoid[s], g = tanh[s];
       c = int16(round(f * c + i * g * 2^-e_c)) (no saturation: the C code assigns the int);
       h = round(o * tanh[c] * 2^-e_y), saturated.
    4. Direction 1 (bidirectional) walks the sequence backwards with the second weights and
       its own slice of initial_h / initial_c; Y holds both directions per step.

    `fused=True` computes the three multiply-adds of the update (GRU: ic_n + r * hc_n and
    ... + z * h; LSTM: f * c + ...) as fused multiply-adds, as ESP-DL built with -ffast-math
    -O3 may on chips with a hardware FMA (esp32s3 MADD.S, esp32p4 fmadd.s): a measure of how
    far a chip may part from the simulator, not the simulator's arithmetic.
    """
    H, t = p.hidden, p.target
    lo, hi = _INT_RANGE[np.dtype(p.dtype)]
    sig, tanh = gate_table("sigmoid", p.gate_exp), gate_table("tanh", p.gate_exp)
    resc_y = F32(2.0 ** -p.e_y)
    resc_c = F32(2.0 ** -p.gate_exp)
    dirs = len(p.w)
    seq = x.shape[0]
    y = np.zeros((seq, dirs, H), p.dtype)
    yh = np.zeros((dirs, H), p.dtype)
    yc = np.zeros((dirs, H), np.int16) if p.kind == "LSTM" else None
    for d in range(dirs):
        h = np.zeros(H, np.int64) if h0 is None else h0[d].astype(np.int64)
        c = np.zeros(H, np.int64) if c0 is None else c0[d].astype(np.int64)
        steps = range(seq) if d == 0 else range(seq - 1, -1, -1)
        for s in steps:
            ic = mat_vec(p.w[d], x[s], p.w_shift, t)
            hc = mat_vec(p.r[d], h, p.r_shift, t)
            if p.kind == "GRU":
                if p.wb[d] is not None:
                    ic = wrap16(ic + p.wb[d])
                    hc = wrap16(hc + p.rb[d])
                zr = sig.get(ic[:2 * H] + hc[:2 * H])
                z, r = zr[:H], zr[H:]
                hn, icn = hc[2 * H:].astype(F32), ic[2 * H:].astype(F32)
                idx = round_c(_fma(r, hn, icn) if fused else icn + r * hn, t)
                n = tanh.get(idx)
                tmp = ((F32(1) - z) * n) * resc_y
                tmp = _fma(z, h.astype(F32), tmp) if fused else tmp + z * h.astype(F32)
                h = sat(round_c(tmp, t), lo, hi)
            else:
                if p.wb[d] is not None:
                    g4 = wrap16(ic + (p.wb[d] + hc + p.rb[d]))
                else:
                    g4 = wrap16(ic + hc)
                i_g, o_g = sig.get(g4[:H]), sig.get(g4[H:2 * H])
                f_g, g_g = sig.get(g4[2 * H:3 * H]), tanh.get(g4[3 * H:])
                ig = (i_g * g_g) * resc_c
                tmp = _fma(f_g, c.astype(F32), ig) if fused else f_g * c.astype(F32) + ig
                c = wrap16(round_c(tmp, t))
                tmp = (o_g * tanh.get(c)) * resc_y
                h = sat(round_c(tmp, t), lo, hi)
            y[s, d] = h
        yh[d] = h
        if yc is not None:
            yc[d] = c
    return y, yh, yc


_numpy_forward = rnn_forward  # a patched rnn_forward (benchmarks/recurrent_fma.py) is honoured


def rnn_kernel(p: RnnParams):
    """`rnn_forward`'s rules as one C loop (`espstream.kernels._int8.Rnn`, the same integer and
    float32 steps in the same order): a callable (x, h0, c0) -> (Y, Y_h, Y_c) of the same types,
    or None where the loop's ranges do not hold (shifts outside [-20, 62], rows over 4096, more
    than two directions), and `rnn_forward` runs instead."""
    from espstream.kernels import _int8

    rows = max(p.w[0].shape[1], p.hidden)
    if not (-20 <= p.w_shift <= 62 and -20 <= p.r_shift <= 62) or rows > 4096 \
            or not 1 <= len(p.w) <= 2:
        return None
    sig, tanh = gate_table("sigmoid", p.gate_exp), gate_table("tanh", p.gate_exp)
    t = p.target
    bits_w = 8 if p.w[0].dtype == np.int8 else 16
    bits_r = 8 if p.r[0].dtype == np.int8 else 16
    lo, hi = _INT_RANGE[np.dtype(p.dtype)]
    # int8 W, R, x and state: the C loop sums in int32 (exact for these operands)
    narrow = bits_w == bits_r == 8 and np.dtype(p.dtype) == np.int8
    loop = _int8.Rnn(p.kind == "LSTM", list(p.w), list(p.r), list(p.wb), list(p.rb),
                     p.w_shift, p.r_shift, pie_path(t, bits_w, p.w[0].shape[1], p.w_shift),
                     pie_path(t, bits_r, p.hidden, p.r_shift), t == "esp32p4", sig.table,
                     sig.qmin, sig.qmax, tanh.table, tanh.qmin, tanh.qmax,
                     float(F32(2.0 ** -p.e_y)), float(F32(2.0 ** -p.gate_exp)), lo, hi, narrow)

    def run(x: np.ndarray, h0: np.ndarray | None, c0: np.ndarray | None):
        if narrow and (x.dtype != np.int8 or (h0 is not None and h0.dtype != np.int8)):
            return rnn_forward(p, x, h0, c0)  # int32 sums exact only for int8 operands
        y, yh, yc = loop(x, h0, c0)
        return (y.astype(p.dtype), yh.astype(p.dtype),
                None if yc is None else yc.astype(np.int16))

    return run


def rnn_oracle(p: RnnParams, x: np.ndarray, h0: np.ndarray | None, c0: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The same, one element at a time as the C loops are written (NumPy float32 scalars, exact
    integer dot products): the twin `rnn_forward` is tested against."""
    H, t = p.hidden, p.target
    lo, hi = _INT_RANGE[np.dtype(p.dtype)]
    sig, tanh = gate_table("sigmoid", p.gate_exp), gate_table("tanh", p.gate_exp)
    G = 3 if p.kind == "GRU" else 4

    def lut(tab: GateTable, i: int) -> np.float32:
        if i >= 0:
            return tab.table[i] if i < tab.qmax else tab.table[tab.qmax]
        v = tab.table[-i] if i > tab.qmin else tab.table[tab.qmax]
        return -v if tab.odd else F32(1) - v

    def rnd(v: np.float32) -> int:
        if t == "esp32p4":
            return int(np.rint(v))
        return int(math.floor(F32(float(v) + 0.5)))

    def dot(row: np.ndarray, vec: list[int], shift: int) -> int:
        acc = sum(int(a) * int(b) for a, b in zip(row, vec, strict=True))
        bits = 8 if row.dtype == np.int8 else 16
        if pie_path(t, bits, len(vec), shift):
            if shift == 0:
                v = acc
            elif t == "esp32p4":
                q, rem = divmod(acc, 1 << shift)
                half = 1 << (shift - 1)
                v = q + (1 if rem > half or (rem == half and q % 2) else 0)
            else:
                v = (acc + (1 << (shift - 1))) >> shift
        else:
            v = rnd(F32(acc) * F32(2.0 ** -shift))
        return min(max(v, -32768), 32767)

    def i16(v: int) -> int:
        return (v + 32768) % 65536 - 32768

    dirs = len(p.w)
    seq = x.shape[0]
    y = np.zeros((seq, dirs, H), p.dtype)
    yh = np.zeros((dirs, H), p.dtype)
    yc = np.zeros((dirs, H), np.int16) if p.kind == "LSTM" else None
    for d in range(dirs):
        h = [0] * H if h0 is None else [int(v) for v in h0[d]]
        c = [0] * H if c0 is None else [int(v) for v in c0[d]]
        for s in (range(seq) if d == 0 else range(seq - 1, -1, -1)):
            xs = [int(v) for v in x[s]]
            ic = [dot(p.w[d][k], xs, p.w_shift) for k in range(G * H)]
            hc = [dot(p.r[d][k], h, p.r_shift) for k in range(G * H)]
            new_h = [0] * H
            if p.kind == "GRU":
                if p.wb[d] is not None:
                    ic = [i16(a + int(b)) for a, b in zip(ic, p.wb[d], strict=True)]
                    hc = [i16(a + int(b)) for a, b in zip(hc, p.rb[d], strict=True)]
                gates = [lut(sig, ic[k] + hc[k]) for k in range(2 * H)]
                for k in range(H):
                    z, r = gates[k], gates[H + k]
                    n = lut(tanh, rnd(F32(ic[2 * H + k]) + r * F32(hc[2 * H + k])))
                    tmp = ((F32(1) - z) * n) * F32(2.0 ** -p.e_y)
                    tmp = tmp + z * F32(h[k])
                    new_h[k] = min(max(rnd(tmp), lo), hi)
            else:
                if p.wb[d] is not None:
                    s4 = [i16(ic[k] + (int(p.wb[d][k]) + hc[k] + int(p.rb[d][k])))
                          for k in range(4 * H)]
                else:
                    s4 = [i16(ic[k] + hc[k]) for k in range(4 * H)]
                for k in range(H):
                    ig, og = lut(sig, s4[k]), lut(sig, s4[H + k])
                    fg, gg = lut(sig, s4[2 * H + k]), lut(tanh, s4[3 * H + k])
                    tmp = fg * F32(c[k]) + (ig * gg) * F32(2.0 ** -p.gate_exp)
                    c[k] = i16(rnd(tmp))
                    tmp = (og * lut(tanh, c[k])) * F32(2.0 ** -p.e_y)
                    new_h[k] = min(max(rnd(tmp), lo), hi)
            h = new_h
            y[s, d] = h
        yh[d] = h
        if yc is not None:
            yc[d] = c
    return y, yh, yc


def _direction(node_attrs: dict) -> str:
    d = node_attrs.get("direction", "forward")
    return d.decode() if isinstance(d, bytes) else str(d)


def sim_rnn(sim: Simulator, node: Node) -> Fn:
    """ESP-DL's GRU / LSTM node (rules of `rnn_forward`); refuses what ESP-DL's deserializer
    does not create (linear_before_reset 0, input_forget 1) and what it computes otherwise
    than ONNX (direction reverse, batch > 1)."""
    kind = node.op_type
    G = 3 if kind == "GRU" else 4
    where = f"node '{node.name}' ({kind})"
    if kind == "GRU" and int(node.attrs.get("linear_before_reset", 0)) != 1:
        raise UserError(f"{where}: linear_before_reset=0; ESP-DL creates no GRU without "
                        "linear_before_reset=1 (PyTorch's form)")
    if kind == "LSTM" and int(node.attrs.get("input_forget", 0)) != 0:
        raise UserError(f"{where}: input_forget=1 is not supported by ESP-DL")
    direction = _direction(node.attrs)
    if direction not in ("forward", "bidirectional"):
        raise UserError(f"{where}: direction {direction!r}; ESP-DL runs it forward")
    dirs = 2 if direction == "bidirectional" else 1
    if "gate_exponent" not in node.attrs:
        raise UserError(f"{where}: no gate_exponent attribute")
    gate_exp = int(node.attrs["gate_exponent"])
    H = int(node.attrs["hidden_size"])
    layout = int(node.attrs.get("layout", 0))
    w = sim.init(node, 1, "W")
    r = sim.init(node, 2, "R")
    if w.shape[:2] != (dirs, G * H) or r.shape != (dirs, G * H, H):
        raise UserError(f"{where}: W {list(w.shape)} / R {list(r.shape)} do not fit "
                        f"{dirs} direction(s) of {G} x {H} gates")
    wb: list = [None] * dirs
    rb: list = [None] * dirs
    if len(node.inputs) > 3 and node.inputs[3]:
        b = sim.init(node, 3, "B")
        if b.dtype != np.int16 or b.size != dirs * 2 * G * H:
            raise UserError(f"{where}: bias must be int16 [{dirs}, {2 * G * H}], got "
                            f"{b.dtype} {list(b.shape)}")
        if sim.init_exp(node.inputs[3]) != gate_exp:
            raise UserError(f"{where}: bias exponent {sim.init_exp(node.inputs[3])}; ESP-DL adds "
                            f"it at the gate exponent {gate_exp}")
        b = b.reshape(dirs, 2 * G * H).astype(np.int64)
        wb, rb = [b[d, :G * H] for d in range(dirs)], [b[d, G * H:] for d in range(dirs)]
    outs = node.outputs
    e_y, e_h = sim.exp(outs[0]), sim.exp(outs[1])
    dtype = np.dtype(w.dtype)
    e_x = sim.exp(node.inputs[0])
    if e_y != e_h:
        raise UserError(f"{where}: Y (2^{e_y}) and Y_h (2^{e_h}) must share one exponent: ESP-DL "
                        "writes the same integers to both")
    h_in = node.inputs[5] if len(node.inputs) > 5 and node.inputs[5] else ""
    c_in = node.inputs[6] if kind == "LSTM" and len(node.inputs) > 6 and node.inputs[6] else ""
    if h_in and sim.exp(h_in) != e_h:
        raise UserError(f"{where}: initial_h at 2^{sim.exp(h_in)}, Y_h at 2^{e_h}: ESP-DL copies "
                        "initial_h without rescaling, they must share one exponent")
    if kind == "LSTM":
        if len(outs) < 3 or not outs[2]:
            raise UserError(f"{where}: ESP-DL's LSTM writes Y_c; the node has no Y_c output")
        if sim.exp(outs[2]) != gate_exp or sim.dtype_of(outs[2], np.int16) != np.int16:
            raise UserError(f"{where}: Y_c must be int16 at the gate exponent {gate_exp}")
        if c_in and sim.exp(c_in) != gate_exp:
            raise UserError(f"{where}: initial_c must be int16 at the gate exponent {gate_exp}")
    p = RnnParams(kind, H, [w[d] for d in range(dirs)], [r[d] for d in range(dirs)], wb, rb,
                  gate_exp, gate_exp - (e_x + sim.init_exp(node.inputs[1])),
                  gate_exp - (e_h + sim.init_exp(node.inputs[2])), e_y, dtype, sim.target)
    from espstream import kernels as fast

    loop = rnn_kernel(p) if sim.kernels is fast else None  # the reference kernels: NumPy

    def fn(args: list) -> list:
        x = args[0]
        if x.ndim != 3:
            raise ValueError(f"input of shape {list(x.shape)}, expected 3-D")
        batch = x.shape[0] if layout == 1 else x.shape[1]
        if batch != 1:
            raise ValueError(f"batch {batch}: ESP-DL's {kind} computes batch 1 only")
        xs = x.reshape(-1, x.shape[2])
        h0 = args[5].reshape(dirs, H) if h_in else None
        c0 = args[6].reshape(dirs, H) if c_in else None
        if loop is not None and rnn_forward is _numpy_forward:
            y, yh, yc = loop(xs, h0, c0)
        else:
            y, yh, yc = rnn_forward(p, xs, h0, c0)
        # the shapes ESP-DL's get_output_shape gives, whatever the layout (batch 1)
        res = [y.reshape(y.shape[0], dirs, 1, H), yh.reshape(dirs, 1, H),
               None if yc is None else yc.reshape(dirs, 1, H)]
        return res[:len(outs)]

    return fn


for _op in ("GRU", "LSTM"):
    register(OpSpec(_op, MODULE, calibrate=calibrate_rnn,
                    calibrate_rule="W, R per tensor; B int16 at a gate exponent from the data; "
                                   "Y, Y_h, initial_h one exponent",
                    stream=rule_recurrent,
                    stream_rule="state pair (initial_h / Y_h, initial_c / Y_c)",
                    lower=lower_rnn, espdl=(_op,)))
register(OpSpec("RNN", MODULE, stream=rule_recurrent, stream_rule="state pair (initial_h / Y_h)"))
for _op in ("GRU", "LSTM"):
    register_sim(SimSpec(_op, MODULE, sim_rnn, ESPDL_GOLDEN))


# ---- streaming: the recurrent state as a model input / output pair -----------------------------

_PASS = ("QuantizeLinear", "DequantizeLinear", "Identity")


def recurrent_pair_node(model: onnx.ModelProto, a: str, b: str
                        ) -> tuple[onnx.NodeProto, int] | None:
    """(the GRU / LSTM, state index 0 = h / 1 = c) when the state pair (a, b) is a recurrent
    layer's: `a` reaches only that node's initial_h (initial_c) through Q / DQ / Identity, and
    `b` is its Y_h (Y_c) through them; None otherwise."""
    cons: dict[str, list[onnx.NodeProto]] = {}
    prod: dict[str, onnx.NodeProto] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
        for o in n.output:
            prod[o] = n
    hits = []
    todo = [a]
    while todo:
        t = todo.pop()
        for c in cons.get(t, []):
            if c.op_type in _PASS and c.input[0] == t:
                todo.extend(c.output)
            elif c.op_type in ("GRU", "LSTM") and t in c.input[5:7]:
                hits.append((c, list(c.input).index(t) - 5))
            else:
                return None
    if len(hits) != 1:
        return None
    node, k = hits[0]
    t = b
    while t in prod and prod[t] is not node:
        p = prod[t]
        if p.op_type not in _PASS:
            return None
        t = p.input[0]
    if prod.get(t) is not node or list(node.output).index(t) != 1 + k:
        return None
    return node, k


def c_input_node(lw: Lowerer, name: str) -> onnx.NodeProto | None:
    """The LSTM whose initial_c is the graph input `name` (calibrate leaves it float)."""
    users = lw.consumers.get(name, [])
    if len(users) == 1 and users[0].op_type == "LSTM" and len(users[0].input) > 6 \
            and users[0].input[6] == name and list(users[0].input).count(name) == 1:
        return users[0]
    return None


def state_exponent(lw: Lowerer, node: onnx.NodeProto, k: int) -> tuple[int, np.dtype]:
    """(exponent, dtype) ESP-DL reads a GRU / LSTM state at: initial_h at Y's (Y_h's),
    initial_c int16 at the gate exponent."""
    if k == 1:
        return _gate_exponent(lw, node), np.dtype(np.int16)
    for o in node.output[:2]:
        qs = lw.q_consumers(o) if o else []
        if qs:
            return lw.q_exp_dtype(qs[0])
    raise UserError(f"{node.op_type} '{node.name}': neither Y nor Y_h is quantized: not a "
                    "calibrated model")

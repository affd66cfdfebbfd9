"""GRU, LSTM and RNN: streamed in float with their state as a model input / output pair; not
calibrated or lowered yet.

Streamify (`rule_recurrent`): forward only, on the sequence axis, zero initial state; the
hidden (and cell) state becomes a state pair fed as initial_h (initial_c) and taken from Y_h
(Y_c).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from espstream.errors import UserError
from espstream.intgraph import Node
from espstream.kernels.reference import round_shift
from espstream.ops.registry import (
    ESPDL_GOLDEN,
    OpSpec,
    SimSpec,
    register,
    register_sim,
)
from espstream.sim import _INT_RANGE, Fn, Simulator
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


def rnn_forward(p: RnnParams, x: np.ndarray, h0: np.ndarray | None, c0: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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
                idx = round_c(ic[2 * H:].astype(F32) + r * hc[2 * H:].astype(F32), t)
                n = tanh.get(idx)
                tmp = ((F32(1) - z) * n) * resc_y
                tmp = tmp + z * h.astype(F32)
                h = sat(round_c(tmp, t), lo, hi)
            else:
                if p.wb[d] is not None:
                    g4 = wrap16(ic + (p.wb[d] + hc + p.rb[d]))
                else:
                    g4 = wrap16(ic + hc)
                i_g, o_g = sig.get(g4[:H]), sig.get(g4[H:2 * H])
                f_g, g_g = sig.get(g4[2 * H:3 * H]), tanh.get(g4[3 * H:])
                tmp = f_g * c.astype(F32) + (i_g * g_g) * resc_c
                c = wrap16(round_c(tmp, t))
                tmp = (o_g * tanh.get(c)) * resc_y
                h = sat(round_c(tmp, t), lo, hi)
            y[s, d] = h
        yh[d] = h
        if yc is not None:
            yc[d] = c
    return y, yh, yc


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
    shapes = [_declared(sim, o) for o in outs]

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
        y, yh, yc = rnn_forward(p, xs, h0, c0)
        res = [y, yh, yc]
        return [v.reshape(s) if s is not None and all(isinstance(k, int) for k in s) else v
                for v, s in zip(res[:len(outs)], shapes, strict=False)]

    return fn


def _declared(sim: Simulator, name: str) -> list | None:
    try:
        return sim.graph.value_info(name).shape if name else None
    except KeyError:
        return None


for _op in ("GRU", "LSTM", "RNN"):
    register(OpSpec(_op, MODULE, stream=rule_recurrent,
                    stream_rule="state pair (initial_h / Y_h, initial_c / Y_c)"))
for _op in ("GRU", "LSTM"):
    register_sim(SimSpec(_op, MODULE, sim_rnn, ESPDL_GOLDEN))

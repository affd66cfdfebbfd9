"""Run two models in onnxruntime on the same random inputs and compare their outputs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from espstream import log
from espstream.errors import UserError, first_line
from espstream.graph import input_shapes, np_dtype

RTOL = 1e-4
ATOL = 1e-5
DEFAULT_DIM = 32
EPS32 = float(np.finfo(np.float32).eps)
SAFETY = 1.0
# operators whose outputs are float sums of many terms (rounding grows with every one on a path)
ACCUMULATING = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN", "AveragePool",
    "GlobalAveragePool", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
    "ReduceLogSumExp", "LayerNormalization", "RMSNormalization", "InstanceNormalization",
    "GroupNormalization", "LpNormalization", "Softmax", "LogSoftmax",
})


def accumulation(model: onnx.ModelProto) -> tuple[int, int]:
    """(depth, terms): the most ACCUMULATING nodes on one path through the main graph, and the
    most terms one Conv / ConvTranspose / Gemm / MatMul sums, read off constant weights (1 when
    none is constant)."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    depth: dict[str, int] = {}
    terms = 1
    for node in model.graph.node:
        d = max((depth.get(i, 0) for i in node.input if i), default=0)
        d += node.op_type in ACCUMULATING
        for o in node.output:
            depth[o] = d
        w = dims.get(node.input[1]) if len(node.input) > 1 else None
        if not w:
            continue
        if node.op_type in ("Conv", "ConvTranspose") and len(w) >= 3:
            n = (w[1] if node.op_type == "Conv" else w[0]) * int(np.prod(w[2:]))
        elif node.op_type in ("Gemm", "MatMul") and len(w) >= 2:
            trans = any(a.name == "transB" and a.i for a in node.attribute)
            n = w[-1] if node.op_type == "Gemm" and trans else w[-2]
        else:
            continue
        terms = max(terms, int(n))
    return max((depth.get(o.name, 0) for o in model.graph.output), default=0), terms


@dataclass
class Comparison:
    max_abs: float = 0.0
    max_rel: float = 0.0
    passed: bool = True
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)
    depth: int = 0
    terms: int = 1
    scale: float = 1.0  # --check-tolerance: multiplies every tolerance
    worst: str | None = None  # the output furthest beyond its tolerance
    ratio: float = 0.0  # its largest |err| / allowed

    def to_json(self) -> dict:
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "rtol": RTOL * self.scale,
            "atol": ATOL * self.scale,
            "accumulating_depth": self.depth,
            "terms": self.terms,
            "tolerance_scale": self.scale,
            "worst_ratio": self.ratio,
            "passed": self.passed,
            "outputs": self.per_output,
        }

    def tolerance_text(self, name: str | None = None) -> str:
        """How the tolerance of output `name` (default: the worst) was made."""
        name = name or self.worst or next(iter(self.per_output), None)
        o = self.per_output.get(name, {}) if name else {}
        scale = f" x {self.scale:g}" if self.scale != 1 else ""
        return (f"rtol {RTOL * self.scale:.3g} + atol {o.get('atol', ATOL):.3g} = "
                f"max({ATOL:g}, {SAFETY:g} eps32 x {self.depth} accumulating layer(s) x "
                f"sqrt({self.terms} terms) x max|{name}| {o.get('max_ref', 0.0):.3g}){scale}")

    def failure(self, skip_hint: bool = True) -> str:
        """The one-line reason, with how much is beyond the tolerance and how to accept it
        (`skip_hint`: also how to find the pass at fault, for the optimize command)."""
        o = self.per_output[self.worst] if self.worst else {}
        need = _round_up(self.ratio * self.scale * 1.25)
        return (f"the optimized model differs from the input: output {self.worst!r} max |err| "
                f"{o.get('max_abs', self.max_abs):.3g}, {self.ratio:.3g} times what the tolerance "
                f"allows ({self.tolerance_text()}); "
                + ("rerun with --skip PASS to find the pass at fault, or " if skip_hint else "")
                + f"accept it with --check-tolerance {need:g}"
                + (" (or --no-check)" if skip_hint else ""))


def _round_up(x: float) -> float:
    """x rounded up to two significant digits (a factor to suggest)."""
    if not np.isfinite(x) or x <= 0:
        return x
    step = 10.0 ** (np.floor(np.log10(x)) - 1)
    return float(np.ceil(x / step) * step)


def output_tolerance(max_ref: float, depth: int, terms: int, scale: float = 1.0) -> float:
    """The absolute tolerance of one output: float32 rounding grows with the outputs'
    magnitude, with every accumulating layer on the way and with the square root of the terms
    one layer sums; never below ATOL."""
    return scale * max(ATOL, SAFETY * EPS32 * max(depth, 1) * np.sqrt(terms) * max_ref)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A plain CPU session that runs the graph as written (no onnxruntime rewrites)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4  # failures surface as exceptions, turned into one message here
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def onnxruntime_failure(model: onnx.ModelProto) -> str | None:
    """Why `model` cannot run once in onnxruntime on zeros (open dims set to 1), or None."""
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    try:
        sess = session(model)
        feeds = {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape],
                                  np_dtype(elem[i.name])) for i in sess.get_inputs()}
        sess.run(None, feeds)
    except Exception as e:  # onnxruntime raises its own exception types
        return first_line(e)
    return None


@contextmanager
def malformed_is_user_error(model: onnx.ModelProto) -> Iterator[None]:
    """Around a stage's work on `model`: an unexpected error (not a `UserError`) becomes a
    `UserError` when `model` does not run in onnxruntime, since a model onnx.checker passed may
    still be malformed (a bias of the wrong length, a kernel that does not fit its input) and
    that is the user's to fix; when it runs, the error is ours and passes through."""
    try:
        yield
    except UserError:
        raise
    except Exception:
        why = onnxruntime_failure(model)
        if why is not None:
            raise UserError(
                f"the model is malformed: it does not run in onnxruntime ({why})") from None
        raise


def random_inputs(model: onnx.ModelProto, seed: int = 0,
                  values: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Standard-normal inputs for float inputs, zeros for the rest, or the value `values` gives
    an input (`--input-value NAME=V`: a sample rate, a length); unknown dims get a default."""
    values = values or {}
    rng = np.random.default_rng(seed)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    feeds = {}
    for name, dims in input_shapes(model).items():
        if 0 in dims:  # declared empty: onnxruntime refuses any other size, so say it once
            raise UserError(f"input {name!r} declares dimension 0 (shape {dims}): no data can "
                            f"be fed to it; give its size with --input-shape {name}:"
                            + ",".join(str(d) if isinstance(d, int) and d > 0 else "N"
                                       for d in dims))
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else DEFAULT_DIM)
                 for i, d in enumerate(dims)]
        if shape != dims:
            log.warn(f"input {name!r} has unknown dimensions {dims}; checking with {shape}")
        dtype = np_dtype(elem[name])
        if name in values:
            feeds[name] = np.full(shape, values[name]).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def declared_output_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Graph outputs whose declared shape is fully static: name -> dims."""
    out = {}
    for vi in model.graph.output:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = [d.dim_value for d in t.shape.dim]
    return out


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, seed: int = 0,
            scale: float = 1.0, values: dict[str, float] | None = None) -> Comparison:
    """Outputs of `candidate` against `reference`, matched by name, on one random input: each
    element within rtol * |ref| + the output's atol (`output_tolerance`), times `scale`."""
    feeds = random_inputs(reference, seed, values)
    try:
        ref_sess = session(reference)
    except Exception as e:
        raise UserError(
            f"the input model does not run in onnxruntime ({first_line(e)}); "
            "pass --no-check to skip the equivalence check"
        ) from None
    names = [o.name for o in ref_sess.get_outputs()]
    try:
        ref_out = dict(zip(names, ref_sess.run(names, feeds), strict=True))
    except Exception as e:  # loads but fails on data: a bad axis, a bias of the wrong size ...
        raise UserError(
            f"the input model fails in onnxruntime ({first_line(e)}); "
            "fix the model, or pass --no-check to skip the equivalence check"
        ) from None
    declared = declared_output_shapes(reference)
    for name in names:
        want, got = declared.get(name), list(np.shape(ref_out[name]))
        if want is not None and want != got:  # optimize's shape inference would trust `want`
            raise UserError(
                f"output {name!r}: the model declares shape {want} but computes {got}; fix the "
                "output's shape in the model (or leave it unset)"
            )
    # only now: a reference that loads but fails on data can make a folded candidate fail to load
    cand_sess = session(candidate)  # the reference ran, so failing here is our bug: surface it
    cand_feeds = {i.name: feeds[i.name] for i in cand_sess.get_inputs()}
    cand_names = [o.name for o in cand_sess.get_outputs()]
    cand_out = dict(zip(cand_names, cand_sess.run(cand_names, cand_feeds), strict=True))
    depth, terms = accumulation(reference)
    result = Comparison(depth=depth, terms=terms, scale=scale)
    for name in names:
        a = np.asarray(ref_out[name], dtype=np.float64)
        b = np.asarray(cand_out[name], dtype=np.float64)
        if a.shape != b.shape:
            raise RuntimeError(f"output {name!r} changed shape: {a.shape} -> {b.shape}")
        finite = np.abs(a[np.isfinite(a)])
        max_ref = float(finite.max()) if finite.size else 0.0
        atol = output_tolerance(max_ref, depth, terms, scale)
        rtol = RTOL * scale
        # NaN or inf in the same places in both count as equal (np.isclose's rules)
        ok = bool(np.all(np.isclose(b, a, rtol=rtol, atol=atol, equal_nan=True)))
        with np.errstate(invalid="ignore"):
            diff = np.where(np.isclose(b, a, rtol=0, atol=0, equal_nan=True), 0.0, np.abs(a - b))
            ratio = np.nan_to_num(diff / (atol + rtol * np.abs(a)), nan=np.inf)
        max_abs = float(np.nanmax(diff, initial=0.0)) if diff.size else 0.0
        max_rel = float(np.nanmax(diff / np.maximum(np.abs(a), 1e-12), initial=0.0)) \
            if diff.size else 0.0
        worst = float(ratio.max(initial=0.0)) if ratio.size else 0.0
        result.per_output[name] = {"max_abs": max_abs, "max_rel": max_rel, "max_ref": max_ref,
                                   "atol": atol, "ratio": worst, "passed": ok}
        result.max_abs = max(result.max_abs, max_abs)
        result.max_rel = max(result.max_rel, max_rel)
        result.passed &= ok
        if result.worst is None or worst > result.ratio:
            result.worst, result.ratio = name, worst
    return result

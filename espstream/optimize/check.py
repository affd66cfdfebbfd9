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


@dataclass
class Comparison:
    max_abs: float = 0.0
    max_rel: float = 0.0
    passed: bool = True
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "rtol": RTOL,
            "atol": ATOL,
            "passed": self.passed,
            "outputs": self.per_output,
        }


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


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs for float inputs, zeros for the rest; unknown dims get a default."""
    rng = np.random.default_rng(seed)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    feeds = {}
    for name, dims in input_shapes(model).items():
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else DEFAULT_DIM)
                 for i, d in enumerate(dims)]
        if shape != dims:
            log.warn(f"input {name!r} has unknown dimensions {dims}; checking with {shape}")
        dtype = np_dtype(elem[name])
        if np.issubdtype(dtype, np.floating):
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


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, seed: int = 0) -> Comparison:
    """Outputs of `candidate` against `reference`, matched by name, on one random input."""
    feeds = random_inputs(reference, seed)
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
    result = Comparison()
    for name in names:
        a = np.asarray(ref_out[name], dtype=np.float64)
        b = np.asarray(cand_out[name], dtype=np.float64)
        if a.shape != b.shape:
            raise RuntimeError(f"output {name!r} changed shape: {a.shape} -> {b.shape}")
        # NaN or inf in the same places in both count as equal (np.isclose's rules)
        ok = bool(np.all(np.isclose(b, a, rtol=RTOL, atol=ATOL, equal_nan=True)))
        with np.errstate(invalid="ignore"):
            diff = np.where(np.isclose(b, a, rtol=0, atol=0, equal_nan=True), 0.0, np.abs(a - b))
        max_abs = float(np.nanmax(diff, initial=0.0)) if diff.size else 0.0
        max_rel = float(np.nanmax(diff / np.maximum(np.abs(a), 1e-12), initial=0.0)) \
            if diff.size else 0.0
        result.per_output[name] = {"max_abs": max_abs, "max_rel": max_rel, "passed": ok}
        result.max_abs = max(result.max_abs, max_abs)
        result.max_rel = max(result.max_rel, max_rel)
        result.passed &= ok
    return result

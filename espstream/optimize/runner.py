"""The optimize stage: fix input shapes, run the passes to a fixed point, check the result."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from espstream import log
from espstream.errors import CheckFailed, UserError, first_line
from espstream.graph import count_ops, export_model, import_graph, input_shapes
from espstream.graph import input_shapes as input_shapes_of
from espstream.optimize.base import Pass
from espstream.optimize.batchnorm_to_affine import batchnorm_to_affine
from espstream.optimize.check import Comparison, compare
from espstream.optimize.clip_runtime_bounds import clip_runtime_bounds
from espstream.optimize.einsum_to_matmul import einsum_to_matmul
from espstream.optimize.eliminate_dead import eliminate_dead
from espstream.optimize.fold_batchnorm import fold_batchnorm
from espstream.optimize.fold_constants import fold_constants
from espstream.optimize.fold_expand import fold_expand
from espstream.optimize.fold_pad import fold_pad
from espstream.optimize.fold_scale import fold_scale
from espstream.optimize.fuse_layernorm import fuse_layernorm
from espstream.optimize.inline_if import inline_if
from espstream.optimize.merge_affine import merge_affine
from espstream.optimize.minmax_to_clip import minmax_to_clip
from espstream.optimize.remove_cast import remove_cast
from espstream.optimize.remove_identity import remove_identity
from espstream.optimize.share_initializers import share_initializers
from espstream.optimize.sum_to_add import sum_to_add

PASSES: tuple[Pass, ...] = (
    Pass("fold_constants", fold_constants),
    Pass("inline_if", inline_if),  # conditions fold_constants made constant
    Pass("fold_expand", fold_expand),  # the Expand / Tile of constants fold_constants leaves
    Pass("remove_cast", remove_cast),  # before remove_identity, which removes what it leaves
    Pass("remove_identity", remove_identity),
    Pass("fuse_layernorm", fuse_layernorm),
    Pass("minmax_to_clip", minmax_to_clip),
    Pass("clip_runtime_bounds", clip_runtime_bounds),  # after minmax_to_clip: Max(x, y(x))
    Pass("einsum_to_matmul", einsum_to_matmul),
    Pass("fold_pad", fold_pad),
    Pass("fold_batchnorm", fold_batchnorm),
    Pass("fold_scale", fold_scale),
    Pass("batchnorm_to_affine", batchnorm_to_affine),  # after fold_batchnorm: what it left
    Pass("merge_affine", merge_affine),
    Pass("sum_to_add", sum_to_add),
    Pass("share_initializers", share_initializers),
    Pass("eliminate_dead", eliminate_dead),
)
MAX_ROUNDS = 10


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    applied: dict[str, int] = field(default_factory=dict)
    rounds: int = 0
    check: Comparison | None = None

    def to_json(self) -> dict:
        return {
            "stage": "optimize",
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(self.ops_after.values()),
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "passes_applied": self.applied,
            "rounds": self.rounds,
            "check": self.check.to_json() if self.check else None,
        }

    def raise_if_check_failed(self) -> None:
        if self.check is not None and not self.check.passed:
            raise CheckFailed(self.check.failure())


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Set the dims of the named graph inputs (in place); checks names, ranks and fixed dims."""
    known = input_shapes(model)
    for name, dims in shapes.items():
        if name not in known:
            raise UserError(
                f"--input-shape {name}: the model has no input {name!r} "
                f"(inputs: {', '.join(known) or 'none'})"
            )
        current = known[name]
        if len(current) != len(dims):
            raise UserError(
                f"--input-shape {name}: the input has rank {len(current)} {current}, "
                f"but {len(dims)} dims were given"
            )
        for axis, (old, new) in enumerate(zip(current, dims, strict=True)):
            if isinstance(old, int) and old > 0 and old != new:
                raise UserError(
                    f"--input-shape {name}: axis {axis} is fixed to {old} in the model, "
                    f"cannot set it to {new}"
                )
        vi = next(i for i in model.graph.input if i.name == name)
        for d, value in zip(vi.type.tensor_type.shape.dim, dims, strict=True):
            d.Clear()
            d.dim_value = value
    if shapes:
        del model.graph.value_info[:]


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise UserError(f"shape inference failed: {first_line(e)}") from None


def run_passes(model: onnx.ModelProto, passes: Sequence[Pass]) -> tuple[onnx.ModelProto, dict, int]:
    """Run `passes` in order, repeatedly, until a whole round changes nothing."""
    graph = import_graph(model)
    applied: dict[str, int] = {}
    rounds = 0
    while rounds < MAX_ROUNDS:
        rounds += 1
        changed = False
        for p in passes:
            if p.run(graph):
                applied[p.name] = applied.get(p.name, 0) + 1
                changed = True
        if not changed:
            break
    graph.toposort()
    return export_model(graph, model), applied, rounds


def optimize_to_fixed_point(model: onnx.ModelProto, passes: Sequence[Pass]
                            ) -> tuple[onnx.ModelProto, dict, int]:
    """`run_passes`, then shape inference, again until the passes change nothing.

    The tensors an inlined If branch or a rewrite creates have no inferred shape, so a Shape
    of one cannot fold until shapes are inferred again (Silero VAD's `half` export: the If
    on the decoder's Shape inlines only once the If before it has been inlined and the new
    tensors' shapes inferred). Returns the model with its shapes inferred, the passes applied
    (summed) and the number of rounds of passes run."""
    applied: dict[str, int] = {}
    rounds = 0
    for _ in range(MAX_ROUNDS):
        model, step, n = run_passes(model, passes)
        model = infer_shapes(model)
        rounds += n
        for name, count in step.items():
            applied[name] = applied.get(name, 0) + count
        if not step:
            break
    return model, applied, rounds


def optimize_model(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    skip: Iterable[str] = (),
    check: bool = True,
    seed: int = 0,
    check_tolerance: float = 1.0,
    input_values: dict[str, float] | None = None,
) -> OptimizeResult:
    """The `optimize` stage as a function. The input model is not modified. `check_tolerance`
    multiplies the check's tolerances (`check.output_tolerance`); `input_values` gives the
    check's value of an input noise cannot stand for (an integer sample rate)."""
    if not check_tolerance > 0 or not np.isfinite(check_tolerance):
        raise UserError(f"--check-tolerance {check_tolerance}: give a positive factor")
    skip = list(skip)
    names = [p.name for p in PASSES]
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise UserError(f"--skip {unknown[0]}: no such pass (passes: {', '.join(names)})")
    original = onnx.ModelProto()
    original.CopyFrom(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    fix_input_shapes(work, input_shapes or {})
    reference = onnx.ModelProto()
    reference.CopyFrom(work)
    work = infer_shapes(work)
    passes = [p for p in PASSES if p.name not in skip]
    optimized, applied, rounds = optimize_to_fixed_point(work, passes)
    onnx.checker.check_model(optimized)
    result = OptimizeResult(optimized, count_ops(original), count_ops(optimized), applied, rounds)
    if check:
        unknown = sorted(set(input_values or {}) - set(input_shapes_of(reference)))
        if unknown:
            raise UserError(f"--input-value {unknown[0]}: the model has no input {unknown[0]!r}")
        result.check = compare(reference, optimized, seed, check_tolerance, input_values)
    return result


def print_summary(result: OptimizeResult) -> None:
    """Node counts by operator type, before and after, and the check's verdict, on stderr."""
    from espstream.report import table

    ops = sorted(set(result.ops_before) | set(result.ops_after))
    rows = [(op, result.ops_before.get(op, 0), result.ops_after.get(op, 0)) for op in ops]
    rows.append(("total", sum(result.ops_before.values()), sum(result.ops_after.values())))
    log.info(table(("op", "before", "after"), rows))
    applied = ", ".join(f"{k} x{v}" for k, v in result.applied.items()) or "none"
    log.info(f"passes applied: {applied} ({result.rounds} rounds)")
    c = result.check
    if c is not None:
        verdict = "ok" if c.passed else "FAILED"
        log.info(f"check: max abs diff {c.max_abs:.3g}, max rel diff {c.max_rel:.3g}, "
                 f"{c.ratio:.2g} of the tolerance ({c.tolerance_text()}): {verdict}")

"""optimize on the bundled models and on the PyTorch-exported ESP-PPQ fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_builders import run

from espstream.errors import CheckFailed, UserError
from espstream.optimize import PASSES, optimize_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tutorial_tcn": ROOT / "models/tutorial_tcn.onnx",
    "stream_tcn": ROOT / "models/stream_tcn.onnx",
    "kws2d": ROOT / "models/kws2d.onnx",
    "ppq_tutorial_tcn": ROOT / "tests/data/esp-ppq/tutorial_tcn/model.onnx",
    "ppq_stream_tcn": ROOT / "tests/data/esp-ppq/stream_tcn/model.onnx",
}
GONE = {"Pad", "ConstantOfShape", "BatchNormalization", "Identity", "Dropout", "Constant", "Cast"}


@pytest.fixture(scope="module", params=sorted(MODELS))
def optimized(request):
    model = onnx.load(MODELS[request.param])
    return request.param, model, optimize_model(model)


def test_clutter_is_gone_and_numbers_unchanged(optimized):
    name, model, result = optimized
    left = {n.op_type for n in result.model.graph.node}
    assert not (left & GONE), f"{name}: {left & GONE} left"
    assert result.check is not None and result.check.passed
    # our own comparison, on a different input than the stage's check used
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(123).standard_normal(shape).astype(np.float32)
    feeds = {model.graph.input[0].name: x}
    for a, b in zip(run(model, feeds), run(result.model, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_every_value_has_a_static_shape(optimized):
    _, _, result = optimized
    infos = list(result.model.graph.value_info) + list(result.model.graph.output)
    assert infos
    for vi in infos:
        dims = vi.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), vi.name


def test_the_input_model_is_not_modified():
    model = onnx.load(MODELS["tutorial_tcn"])
    before = model.SerializeToString()
    optimize_model(model)
    assert model.SerializeToString() == before


def test_pad_chains_need_fold_constants_first():
    model = onnx.load(MODELS["ppq_tutorial_tcn"])
    result = optimize_model(model, skip=["fold_constants"])
    assert "Pad" in {n.op_type for n in result.model.graph.node}
    assert result.check.passed


def test_unknown_skip_is_a_user_error():
    with pytest.raises(UserError, match="no such pass"):
        optimize_model(onnx.load(MODELS["kws2d"]), skip=["fold_everything"])


def test_passes_have_rules_in_their_docstrings():
    for p in PASSES:
        doc = p.run.__doc__ or ""
        assert "Rules:" in doc and "1." in doc, p.name


def dynamic_model() -> onnx.ModelProto:
    model = onnx.load(MODELS["stream_tcn"])
    dim = model.graph.input[0].type.tensor_type.shape.dim[2]
    dim.Clear()
    dim.dim_param = "T"
    for vi in [*model.graph.output]:
        d = vi.type.tensor_type.shape.dim[2]
        d.Clear()
        d.dim_param = "T"
    del model.graph.value_info[:]
    return model


def test_input_shape_fixes_dynamic_dims():
    result = optimize_model(dynamic_model(), input_shapes={"x": [1, 16, 40]})
    dims = [d.dim_value for d in result.model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 16, 40]


@pytest.mark.parametrize(
    "shapes,match",
    [
        ({"nope": [1, 16, 40]}, "has no input 'nope'"),
        ({"x": [1, 16]}, "rank 3"),
        ({"x": [1, 8, 40]}, "axis 1 is fixed to 16"),
    ],
)
def test_bad_input_shapes(shapes, match):
    with pytest.raises(UserError, match=match):
        optimize_model(dynamic_model(), input_shapes=shapes)


def test_a_wrong_pass_is_caught_by_the_check(monkeypatch):
    """The check compares against the input model, so a pass that breaks numbers fails it."""
    import onnx_graphsurgeon as gs

    from espstream.optimize import runner
    from espstream.optimize.base import Pass

    done: set[str] = set()

    def corrupt(graph: gs.Graph) -> bool:
        """Doubles the weights of the first Conv (once)."""
        for node in graph.nodes:
            if node.op == "Conv" and node.name not in done:
                done.add(node.name)
                w = node.inputs[1]
                node.inputs[1] = gs.Constant(w.name + "_x2", w.values * 2)
                return True
        return False

    monkeypatch.setattr(runner, "PASSES", (*runner.PASSES[:1], Pass("corrupt", corrupt)))
    result = optimize_model(onnx.load(MODELS["ppq_stream_tcn"]))
    assert result.check is not None and not result.check.passed
    with pytest.raises(CheckFailed, match="differs from the input"):
        result.raise_if_check_failed()


def test_check_counts_nan_in_the_same_places_as_equal_and_elsewhere_as_a_difference():
    from onnx import helper
    from onnx_builders import make_model

    from espstream.optimize.check import compare

    def model(op: str) -> onnx.ModelProto:  # Log of a normal input: NaN for negative inputs
        return make_model([helper.make_node(op, ["x"], ["y"])], {"x": [1, 64]}, {"y": [1, 64]})

    same = compare(model("Log"), model("Log"))
    assert same.passed and same.max_abs == 0.0
    other = compare(model("Log"), model("Abs"))
    assert not other.passed

"""Each optimize pass on small hand-made graphs: what it rewrites, what it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_builders import make_model, ops, rand, run
from onnx_graphsurgeon import Constant, import_onnx

from espstream.graph import export_model
from espstream.optimize.batchnorm_to_affine import batchnorm_to_affine
from espstream.optimize.eliminate_dead import eliminate_dead
from espstream.optimize.fold_batchnorm import fold_batchnorm
from espstream.optimize.fold_constants import fold_constants
from espstream.optimize.fold_pad import fold_pad
from espstream.optimize.fold_scale import fold_scale
from espstream.optimize.merge_affine import merge_affine
from espstream.optimize.remove_identity import remove_identity
from espstream.optimize.share_initializers import share_initializers
from espstream.optimize.sum_to_add import sum_to_add


def apply(pass_fn, model: onnx.ModelProto) -> tuple[bool, onnx.ModelProto]:
    model = onnx.shape_inference.infer_shapes(model)
    graph = import_onnx(model)
    changed = pass_fn(graph)
    graph.toposort()
    out = export_model(graph, model)
    onnx.checker.check_model(out)
    return changed, out


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


# -- fold_constants ---------------------------------------------------------------------------


def pad_chain_model() -> onnx.ModelProto:
    """The Pad with a PyTorch-style constant chain computing its pads, as exporters emit."""
    nodes = [
        helper.make_node("Constant", [], ["n"], value=helper.make_tensor("n", 7, [1], [4])),
        helper.make_node("Constant", [], ["p"], value=helper.make_tensor("p", 7, [2], [2, 0])),
        helper.make_node("ConstantOfShape", ["n"], ["z"],
                         value=helper.make_tensor("v", 7, [1], [0])),
        helper.make_node("Concat", ["p", "z"], ["c"], axis=0),
        helper.make_node("Constant", [], ["s"], value=helper.make_tensor("s", 7, [2], [-1, 2])),
        helper.make_node("Reshape", ["c", "s"], ["r"]),
        helper.make_node("Slice", ["r", "st", "en", "ax", "step"], ["sl"]),
        helper.make_node("Transpose", ["sl"], ["t"], perm=[1, 0]),
        helper.make_node("Reshape", ["t", "m1"], ["f"]),
        helper.make_node("Cast", ["f"], ["pads"], to=7),
        helper.make_node("Pad", ["x", "pads"], ["xp"], mode="constant"),
        helper.make_node("Conv", ["xp", "w"], ["y"], kernel_shape=[3]),
    ]
    inits = {
        "st": np.array([-1]), "en": np.array([-(2**63) + 1]), "ax": np.array([0]),
        "step": np.array([-1]), "m1": np.array([-1]), "w": rand(4, 3, 3, seed=1),
    }
    return make_model(nodes, {"x": [1, 3, 10]}, {"y": [1, 4, 10]}, inits)


def test_fold_constants_turns_pad_chain_into_constant_pads():
    model = pad_chain_model()
    changed, out = apply(fold_constants, model)
    assert changed
    assert ops(out) == ["Pad", "Conv"]
    pads = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    pad_node = out.graph.node[0]
    assert pads[pad_node.input[1]].tolist() == [0, 0, 2, 0, 0, 0]
    assert_same_outputs(model, out, {"x": rand(1, 3, 10)})


def test_fold_constants_leaves_runtime_graph_alone():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [1, 4]}, {"y": [1, 4]})
    changed, out = apply(fold_constants, model)
    assert not changed and ops(out) == ["Relu"]


# -- fold_pad ---------------------------------------------------------------------------------


def pad_conv_model(pad_pads, consumer="Conv", value=None, mode="constant", **attrs):
    inits = {"pads": np.array(pad_pads, dtype=np.int64), "w": rand(4, 3, 3, seed=2)}
    pad_inputs = ["x", "pads"]
    if value is not None:
        inits["v"] = np.array(value, dtype=np.float32)
        pad_inputs.append("v")
    nodes = [helper.make_node("Pad", pad_inputs, ["xp"], mode=mode)]
    if consumer == "Conv":
        nodes.append(helper.make_node("Conv", ["xp", "w"], ["y"], kernel_shape=[3], **attrs))
    else:
        nodes.append(helper.make_node(consumer, ["xp"], ["y"], kernel_shape=[3], **attrs))
    return make_model(nodes, {"x": [1, 3, 10]}, {"y": None}, inits)


def test_fold_pad_into_conv_adds_to_its_pads():
    model = pad_conv_model([0, 0, 2, 0, 0, 1], pads=[1, 0])
    changed, out = apply(fold_pad, model)
    assert changed and ops(out) == ["Conv"]
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["pads"] == [3, 1]
    assert_same_outputs(model, out, {"x": rand(1, 3, 10)})


def test_fold_pad_into_average_pool_switches_to_counting_padding():
    model = pad_conv_model([0, 0, 2, 0, 0, 0], consumer="AveragePool")
    changed, out = apply(fold_pad, model)
    assert changed and ops(out) == ["AveragePool"]
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["pads"] == [2, 0] and attrs["count_include_pad"] == 1
    assert_same_outputs(model, out, {"x": rand(1, 3, 10)})


@pytest.mark.parametrize(
    "pad_pads,kwargs",
    [
        ([0, 1, 2, 0, 0, 0], {}),  # pads the channel axis
        ([0, 0, 2, 0, 0, 0], {"value": 1.0}),  # non-zero pad value
        ([0, 0, 2, 0, 0, 0], {"mode": "reflect"}),
        ([0, 0, -1, 0, 0, 0], {}),  # negative pads crop
        ([0, 0, 2, 0, 0, 0], {"consumer": "MaxPool"}),  # zero is not neutral for max
        # own padding excluded from the count: folding would change the average
        ([0, 0, 2, 0, 0, 0], {"consumer": "AveragePool", "count_include_pad": 0, "pads": [1, 1]}),
        ([0, 0, 2, 0, 0, 0], {"consumer": "AveragePool", "ceil_mode": 1}),
        ([0, 0, 2, 0, 0, 0], {"auto_pad": "SAME_UPPER"}),
    ],
)
def test_fold_pad_refuses_what_would_change_the_result(pad_pads, kwargs):
    model = pad_conv_model(pad_pads, **kwargs)
    changed, out = apply(fold_pad, model)
    assert not changed and "Pad" in ops(out)


def test_fold_pad_keeps_pad_read_by_a_non_conv_too():
    inits = {"pads": np.array([0, 0, 2, 0, 0, 0]), "w": rand(4, 3, 3)}
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["xp"]),
        helper.make_node("Conv", ["xp", "w"], ["y"], kernel_shape=[3]),
        helper.make_node("Relu", ["xp"], ["z"]),
    ]
    model = make_model(nodes, {"x": [1, 3, 10]}, {"y": None, "z": None}, inits)
    changed, out = apply(fold_pad, model)
    assert not changed and "Pad" in ops(out)


# -- fold_batchnorm ---------------------------------------------------------------------------


def bn_inits(c: int, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": rng.normal(0, 0.1, c).astype(np.float32),
        "mean": rng.normal(0, 0.2, c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def bn_node(x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, "gamma", "beta", "mean", "var"], [y])


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batchnorm_into_conv(with_bias):
    inits = {"w": rand(6, 3, 3, seed=4), **bn_inits(6)}
    conv_in = ["x", "w"]
    if with_bias:
        inits["b"] = rand(6, seed=5)
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], kernel_shape=[3]), bn_node("c", "y")]
    model = make_model(nodes, {"x": [1, 3, 10]}, {"y": [1, 6, 8]}, inits)
    changed, out = apply(fold_batchnorm, model)
    assert changed and ops(out) == ["Conv"]
    assert_same_outputs(model, out, {"x": rand(1, 3, 10)})


def test_fold_batchnorm_into_grouped_conv_transpose():
    inits = {"w": rand(4, 3, 3, seed=6), **bn_inits(6)}  # group 2: C_out = 2 * 3
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], kernel_shape=[3], group=2),
        bn_node("c", "y"),
    ]
    model = make_model(nodes, {"x": [1, 4, 5]}, {"y": None}, inits)
    changed, out = apply(fold_batchnorm, model)
    assert changed and ops(out) == ["ConvTranspose"]
    assert_same_outputs(model, out, {"x": rand(1, 4, 5)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fold_batchnorm_into_gemm(trans_b):
    w = rand(5, 8, seed=7) if trans_b else rand(8, 5, seed=7)
    inits = {"w": w, "b": rand(5, seed=8), **bn_inits(5)}
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=trans_b, beta=0.5),
        bn_node("g", "y"),
    ]
    model = make_model(nodes, {"x": [2, 8]}, {"y": [2, 5]}, inits)
    changed, out = apply(fold_batchnorm, model)
    assert changed and ops(out) == ["Gemm"]
    assert_same_outputs(model, out, {"x": rand(2, 8)})


def test_fold_batchnorm_leaves_shared_conv_output():
    inits = {"w": rand(6, 3, 3), **bn_inits(6)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3]),
        bn_node("c", "y"),
        helper.make_node("Relu", ["c"], ["z"]),
    ]
    model = make_model(nodes, {"x": [1, 3, 10]}, {"y": None, "z": None}, inits)
    changed, out = apply(fold_batchnorm, model)
    assert not changed and "BatchNormalization" in ops(out)


def test_fold_batchnorm_leaves_standalone_batchnorm():
    nodes = [bn_node("x", "y")]
    model = make_model(nodes, {"x": [1, 6, 10]}, {"y": None}, bn_inits(6))
    changed, _ = apply(fold_batchnorm, model)
    assert not changed


# -- fold_scale -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op,shape",
    [("Mul", [1, 6, 1]), ("Mul", [6, 1]), ("Mul", []), ("Add", [1, 6, 1]), ("Add", [6, 1])],
)
def test_fold_scale_per_channel_constant(op, shape):
    inits = {"w": rand(6, 3, 3, seed=9), "b": rand(6, seed=10),
             "k": np.random.default_rng(11).uniform(0.5, 2, shape).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3]),
        helper.make_node(op, ["k", "c"], ["y"]),
    ]
    model = make_model(nodes, {"x": [1, 3, 10]}, {"y": None}, inits)
    changed, out = apply(fold_scale, model)
    assert changed and ops(out) == ["Conv"]
    assert_same_outputs(model, out, {"x": rand(1, 3, 10)})


@pytest.mark.parametrize("shape", [[1, 1, 8], [1, 6, 8], [2, 1, 6, 1]])
def test_fold_scale_refuses_constants_that_vary_along_time_or_broadcast(shape):
    inits = {"w": rand(6, 3, 3), "k": np.ones(shape, dtype=np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3]),
        helper.make_node("Mul", ["c", "k"], ["y"]),
    ]
    model = make_model(nodes, {"x": [1, 3, 10]}, {"y": None}, inits)
    changed, out = apply(fold_scale, model)
    assert not changed and "Mul" in ops(out)


def test_fold_scale_leaves_runtime_multiplier():
    inits = {"w": rand(6, 3, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["y"]),
    ]
    model = make_model(nodes, {"x": [1, 3, 10]}, {"y": None}, inits)
    changed, _ = apply(fold_scale, model)
    assert not changed


# -- remove_identity --------------------------------------------------------------------------


def test_remove_identity_and_inference_dropout():
    inits = {"ratio": np.array(0.5, dtype=np.float32), "mode": np.array(False)}
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Dropout", ["b", "ratio", "mode"], ["c"]),
        helper.make_node("Sigmoid", ["c"], ["d"]),
        helper.make_node("Identity", ["d"], ["y"]),
    ]
    model = make_model(nodes, {"x": [1, 4]}, {"y": [1, 4]}, inits)
    changed, out = apply(remove_identity, model)
    assert changed and ops(out) == ["Relu", "Sigmoid"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(model, out, {"x": rand(1, 4)})


def test_remove_identity_keeps_training_dropout_and_input_to_output_identity():
    inits = {"ratio": np.array(0.5, dtype=np.float32), "mode": np.array(True)}
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "mode"], ["c"]),
        helper.make_node("Identity", ["x"], ["y"]),
    ]
    model = make_model(nodes, {"x": [1, 4]}, {"c": [1, 4], "y": [1, 4]}, inits)
    changed, out = apply(remove_identity, model)
    assert not changed and ops(out) == ["Dropout", "Identity"]


# -- eliminate_dead / share_initializers ------------------------------------------------------


def test_eliminate_dead_removes_unused_nodes_inputs_initializers():
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dead"]),
        helper.make_node("Add", ["unused_in", "k"], ["dead2"]),
    ]
    model = make_model(nodes, {"x": [1, 4], "unused_in": [1, 4]}, {"y": [1, 4]},
                       {"k": np.ones(4, np.float32)})
    changed, out = apply(eliminate_dead, model)
    assert changed and ops(out) == ["Relu"]
    assert [i.name for i in out.graph.input] == ["x"]
    assert not out.graph.initializer


def test_share_initializers_merges_equal_constants_only():
    w = rand(4, 4, seed=12)
    inits = {"w1": w, "w2": w.copy(), "w3": w + 1, "w4": w.astype(np.float64).astype(np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["b"]),
        helper.make_node("MatMul", ["b", "w3"], ["c"]),
        helper.make_node("MatMul", ["c", "w4"], ["y"]),
    ]
    model = make_model(nodes, {"x": [1, 4]}, {"y": [1, 4]}, inits)
    changed, out = apply(share_initializers, model)
    assert changed
    assert len(out.graph.initializer) == 2  # w1 (== w2 == w4) and w3
    assert_same_outputs(model, out, {"x": rand(1, 4)})
    graph = import_onnx(out)
    assert sum(isinstance(t, Constant) for t in graph.tensors().values()) == 2


# -- sum_to_add -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
def test_sum_becomes_a_chain_of_adds(n):
    names = [f"x{i}" for i in range(n)]
    nodes = [helper.make_node("Sum", names, ["y"])]
    model = make_model(nodes, {k: [1, 4, 6] for k in names}, {"y": [1, 4, 6]})
    changed, out = apply(sum_to_add, model)
    assert changed and ops(out) == ["Add"] * (n - 1)
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(model, out, {k: rand(1, 4, 6, seed=i) for i, k in enumerate(names)})


def test_single_input_sum_is_left_alone():
    model = make_model([helper.make_node("Sum", ["x"], ["y"])], {"x": [1, 4]}, {"y": [1, 4]})
    changed, out = apply(sum_to_add, model)
    assert not changed and ops(out) == ["Sum"]


# -- batchnorm_to_affine ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[1, 6, 4, 5], [1, 6, 10], [3, 6]])
def test_batchnorm_after_a_concat_becomes_mul_and_add(shape):
    """DenseNet's pre-activation BatchNormalization: no layer before it to fold into."""
    half = [shape[0], 3, *shape[2:]]
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1), bn_node("c", "y")]
    model = make_model(nodes, {"a": half, "b": half}, {"y": shape}, bn_inits(6))
    changed, out = apply(batchnorm_to_affine, model)
    assert changed and ops(out) == ["Concat", "Mul", "Add"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(model, out, {"a": rand(*half, seed=1), "b": rand(*half, seed=2)})


def test_batchnorm_to_affine_leaves_training_mode_and_runtime_statistics():
    train = [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"],
                              ["y", "rm", "rv"], training_mode=1)]
    model = make_model(train, {"x": [1, 6, 10]}, {"y": None}, bn_inits(6), opset=15)
    assert apply(batchnorm_to_affine, model)[0] is False
    inits = bn_inits(6)
    del inits["mean"]
    runtime = [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "m", "var"], ["y"])]
    model = make_model(runtime, {"x": [1, 6, 10], "m": [6]}, {"y": None}, inits)
    assert apply(batchnorm_to_affine, model)[0] is False


def test_optimize_folds_batchnorm_into_its_conv_rather_than_rewriting_it():
    from espstream.optimize import optimize_model

    inits = {"w": rand(6, 3, 3, seed=4), **bn_inits(6)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3]), bn_node("c", "y")]
    model = make_model(nodes, {"x": [1, 3, 10]}, {"y": [1, 6, 8]}, inits)
    assert ops(optimize_model(model).model) == ["Conv"]


# -- merge_affine -----------------------------------------------------------------------------


def _chain(steps: list[tuple[str, list[int]]], extra_reader: bool = False) -> onnx.ModelProto:
    nodes, inits, cur = [], {}, "x"
    for i, (op, shape) in enumerate(steps):
        inits[f"k{i}"] = np.random.default_rng(i).uniform(0.5, 1.5, shape).astype(np.float32)
        nodes.append(helper.make_node(op, [cur, f"k{i}"] if i % 2 else [f"k{i}", cur], [f"t{i}"]))
        cur = f"t{i}"
    outputs = {cur: None}
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["t0"], ["r"]))
        outputs["r"] = None
    return make_model(nodes, {"x": [1, 4, 7]}, outputs, inits)


@pytest.mark.parametrize("steps,want", [
    ([("Mul", [4, 1]), ("Add", [1, 4, 1]), ("Mul", []), ("Add", [4, 1])], ["Mul", "Add"]),
    ([("Add", [4, 1]), ("Add", [1, 4, 1])], ["Add"]),
    ([("Mul", [4, 1]), ("Mul", [1])], ["Mul"]),
    ([("Add", [4, 1]), ("Mul", [4, 1])], ["Mul", "Add"]),
])
def test_merge_affine_collapses_per_channel_chains(steps, want):
    model = _chain(steps)
    changed, out = apply(merge_affine, model)
    assert changed and ops(out) == want
    assert [o.name for o in out.graph.output] == [f"t{len(steps) - 1}"]
    assert_same_outputs(model, out, {"x": rand(1, 4, 7, seed=3)})


@pytest.mark.parametrize("steps,extra", [
    ([("Mul", [4, 1]), ("Add", [4, 1])], False),  # already one Mul then one Add
    ([("Mul", [4, 1]), ("Mul", [1, 1, 7])], False),  # varies along time: not per channel
    ([("Mul", [4, 1]), ("Mul", [4, 1])], True),  # t0 is read by a Relu too
])
def test_merge_affine_leaves_what_it_must(steps, extra):
    changed, out = apply(merge_affine, _chain(steps, extra_reader=extra))
    assert not changed and len(out.graph.node) == len(steps) + extra


def test_merge_affine_leaves_a_chain_that_cancels_out():
    model = make_model([helper.make_node("Mul", ["x", "two"], ["t"]),
                        helper.make_node("Mul", ["t", "half"], ["y"])],
                       {"x": [1, 4, 7]}, {"y": None},
                       {"two": np.float32(2.0), "half": np.float32(0.5)})
    assert apply(merge_affine, model)[0] is False

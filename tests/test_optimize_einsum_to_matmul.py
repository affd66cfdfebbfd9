"""optimize's einsum_to_matmul pass: an Einsum that is a (batched) matrix product."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnx_builders import make_model, ops, rand
from optimize_util import apply, assert_same_outputs

from espstream.optimize import optimize_model
from espstream.optimize.einsum_to_matmul import einsum_to_matmul, matmul_plan


def einsum_model(eq: str, a_shape, b_shape, const_b=False):
    out_shape = list(np.einsum(eq, np.zeros(a_shape), np.zeros(b_shape)).shape)
    inputs = {"a": list(a_shape)}
    inits = {}
    if const_b:
        inits["b"] = rand(*b_shape, seed=3)
    else:
        inputs["b"] = list(b_shape)
    return make_model([helper.make_node("Einsum", ["a", "b"], ["y"], equation=eq)], inputs,
                      {"y": out_shape}, inits, opset=13)


CASES = [
    ("ij,jk->ik", (3, 4), (4, 5), []),
    ("bij,bjk->bik", (2, 3, 4), (2, 4, 5), []),
    ("bhid,bhjd->bhij", (2, 3, 4, 8), (2, 3, 5, 8), ["Transpose"]),  # attention scores
    ("bhij,bhjd->bhid", (2, 3, 4, 5), (2, 3, 5, 8), []),
    ("bct,oc->bot", (2, 6, 7), (4, 6), ["Transpose"] * 3),  # a 1x1 conv over time
    ("ik,jk->ij", (3, 4), (5, 4), ["Transpose"]),
    ("ij,jk->ki", (3, 4), (4, 5), ["Transpose"]),
    ("btc,co->bto", (2, 7, 6), (6, 4), []),  # a Linear over frames
    ("ck,bkt->bct", (4, 6), (2, 6, 7), []),
    ("bic,cj->ijb", (2, 3, 4), (4, 5), ["Transpose", "Transpose"]),
]


@pytest.mark.parametrize("eq,a,b,extra", CASES)
def test_matrix_products_become_matmul(eq, a, b, extra):
    model = einsum_model(eq, a, b)
    changed, out = apply(einsum_to_matmul, model)
    assert changed
    assert sorted(ops(out)) == sorted(["MatMul"] + extra)
    feeds = {"a": rand(*a, seed=1), "b": rand(*b, seed=2)}
    assert_same_outputs(model, out, feeds)
    np.testing.assert_allclose(  # and NumPy's einsum agrees
        __import__("onnx_builders").run(out, feeds)[0], np.einsum(eq, feeds["a"], feeds["b"]),
        rtol=1e-5, atol=1e-5)


def test_constant_operand_transpose_folds_in_optimize():
    model = einsum_model("bct,oc->bot", (2, 6, 7), (4, 6), const_b=True)
    result = optimize_model(model)
    assert sorted(ops(result.model)) == ["MatMul", "Transpose", "Transpose"]  # b's folded
    assert result.check.passed


@pytest.mark.parametrize("eq,a,b", [
    ("ij,ij->ij", (3, 4), (3, 4)),  # no summed letter: a Mul
    ("ijk,jkl->il", (2, 3, 4), (3, 4, 5)),  # two summed letters
    ("ij,j->i", (3, 4), (4,)),  # a vector operand
    ("bic,dcj->bidj", (2, 3, 4), (5, 4, 6)),  # extra letters on both sides
    ("ii,ij->ij", (3, 3), (3, 4)),  # a diagonal
    ("...ij,...jk->...ik", (2, 3, 4), (2, 4, 5)),  # ellipsis
    ("ij,jk", (3, 4), (4, 5)),  # implicit output
])
def test_leaves_other_einsums(eq, a, b):
    model = einsum_model(eq, a, b)
    changed, out = apply(einsum_to_matmul, model)
    assert not changed and ops(out) == ["Einsum"]


def test_plan_of_a_summed_letter_in_one_operand_is_none():
    assert matmul_plan("ijz", "jk", "ik") is None

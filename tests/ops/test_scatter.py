"""espstream/ops/scatter.py: ScatterND with constant indices (none / add / max / min)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, refused, run_case

from espstream.ops.scatter import scatter_nd


def _case(reduction: str | None = None, const_updates: bool = False):
    def case():
        idx = np.asarray([[0, 1], [0, 3]], np.int64)  # two rows of [1, 4, 8]
        nodes = [helper.make_node("Relu", ["x"], ["d"])]
        inits = {"idx": idx}
        if const_updates:
            inits["u"] = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
        else:
            nodes += [helper.make_node("Tanh", ["x"], ["t"]),
                      helper.make_node("Slice", ["t", "s0", "s1", "ax"], ["ts"]),
                      helper.make_node("Squeeze", ["ts", "sq"], ["u"])]
            inits.update(s0=np.asarray([1], np.int64), s1=np.asarray([3], np.int64),
                         ax=np.asarray([1], np.int64), sq=np.asarray([0], np.int64))
        kw = {"reduction": reduction} if reduction else {}
        nodes.append(helper.make_node("ScatterND", ["d", "idx", "u"], ["y"], **kw))
        return model(nodes, [1, 4, 8], inits, opset=18), {"ScatterND"}
    return case


CASES = {"ScatterND": _case()}
MORE = {"add": _case("add"), "max": _case("max"), "min": _case("min"),
        "const_updates": _case(const_updates=True)}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize("name", [*CASES, *MORE])
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(name: str, target: str, bits: int) -> None:
    run_case({**CASES, **MORE}[name], target, bits)


def test_mul_is_refused() -> None:
    refused(_case("mul"), "export", "reduction 'mul'")


def _oracle(data, idx, upd, red):
    """ONNX's ScatterND definition in float64 (slices in order), each step saturated to int8
    as ESP-DL's integer kernel does."""
    out = data.astype(np.float64).copy()
    k = idx.shape[-1]
    for i in np.ndindex(*idx.shape[:-1]):
        at = tuple(idx[i])
        v = upd[i]
        out[at] = {"none": lambda a, b: b, "add": np.add, "max": np.maximum,
                   "min": np.minimum}[red](out[at], v).clip(-128, 127)
    assert out.shape == data.shape and k <= data.ndim
    return out


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       red=st.sampled_from(["none", "add", "max", "min"]), data=st.data())
def test_kernel_is_the_definition_within_int8(shape, red, data) -> None:
    """ESP-DL's integer kernel is ONNX's definition, saturated after every slice."""
    k = data.draw(st.integers(1, len(shape)))
    n = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(sum(shape) + n)
    idx = np.stack([rng.integers(0, shape[a], n) for a in range(k)], axis=-1)
    if red == "none":  # repeated indices keep the last slice in both; make them distinct
        _, first = np.unique(idx, axis=0, return_index=True)
        idx = idx[np.sort(first)]
    d = rng.integers(-128, 128, shape).astype(np.int8)
    u = rng.integers(-128, 128, (len(idx), *shape[k:])).astype(np.int8)
    got = scatter_nd(d, idx, u, red)
    want = np.clip(_oracle(d, idx, u, red), -128, 127)
    assert np.array_equal(got, want)

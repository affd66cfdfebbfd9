"""espstream/ops/reverse_sequence.py: ReverseSequence (constant lengths)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from op_harness import model, run_case

from espstream.errors import UserError
from espstream.ops.reverse_sequence import reverse_sequence
from espstream.stream.streamify import streamify_model


def _case(shape=(1, 6, 4), lens=(4,), batch_axis=0, time_axis=1):
    def case():
        nodes = [helper.make_node("Relu", ["x"], ["r"]),
                 helper.make_node("ReverseSequence", ["r", "lens"], ["y"], batch_axis=batch_axis,
                                  time_axis=time_axis)]
        return model(nodes, list(shape), {"lens": np.asarray(lens, np.int64)}), \
            {"ReverseSequence"}
    return case


CASES = {"ReverseSequence": _case()}
# (time_axis 0 needs a leading axis other than 1, which the harness cannot feed: the kernel's
# batch_axis 1 / time_axis 0 is covered by the property test)
MORE = {"rank4": _case((1, 5, 2, 3), lens=(3,)), "rank2": _case((1, 7), lens=(7,))}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize("name", [*CASES, *MORE])
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(name: str, target: str, bits: int) -> None:
    run_case({**CASES, **MORE}[name], target, bits)


def _oracle(x, lens, b_ax, t_ax):
    """ONNX's definition, element by element."""
    y = x.copy()
    for idx in np.ndindex(*x.shape):
        b, t = idx[b_ax], idx[t_ax]
        if t < lens[b]:
            src = list(idx)
            src[t_ax] = lens[b] - 1 - t
            y[idx] = x[tuple(src)]
    return y


@settings(max_examples=60, deadline=None)
@given(bsz=st.integers(1, 3), t=st.integers(1, 6), f=st.integers(1, 3), swap=st.booleans(),
       data=st.data())
def test_kernel_is_the_definition(bsz, t, f, swap, data) -> None:
    lens = np.asarray(data.draw(st.lists(st.integers(0, t), min_size=bsz, max_size=bsz)))
    b_ax, t_ax = (1, 0) if swap else (0, 1)
    shape = [t, bsz, f] if swap else [bsz, t, f]
    x = np.random.default_rng(t).integers(-128, 128, shape).astype(np.int8)
    assert np.array_equal(reverse_sequence(x, lens, b_ax, t_ax), _oracle(x, lens, b_ax, t_ax))


def test_reversing_time_is_refused_by_streamify() -> None:
    m, _ = _case(shape=(1, 8, 4), lens=(8,))()
    with pytest.raises(UserError, match=r"\(ReverseSequence\) reverses frames along time"):
        streamify_model(m, 2, axes={"x": 1})


def test_time_on_a_feature_axis_streams() -> None:
    from espstream.verify import verify_models

    m, _ = _case(shape=(1, 3, 8), lens=(2,))()
    r = streamify_model(m, 2, axes={"x": 2})
    v = verify_models(m, r.model, random=2)
    assert v.ok, v.failure()

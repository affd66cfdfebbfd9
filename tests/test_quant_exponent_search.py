"""espstream.quant.exponent_search: +-1 on free exponents, kept only when the output gains."""

from __future__ import annotations

import numpy as np
from onnx import helper
from ptq_util import OFF, data, ds_block, graph, only

from espstream.quant import calibrate_model
from espstream.quant.exponent_search import OutputError, free_tensors, search
from espstream.quant.plan import make_plan


def _residual():
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((4, 4, 1)), "w2": rng.standard_normal((4, 4, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="c2", kernel_shape=[1]),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    return graph(nodes, inits, [1, 4, 6])


def test_free_tensors_leave_out_adopted_inputs():
    from espstream.quant.calibrate import prepare_float_model

    plan = make_plan(prepare_float_model(_residual(), 8))
    free = free_tensors(plan)
    adopted = {i for _, ins in plan.adopt for i in ins}
    assert "y" in free and "x" in free
    assert not adopted & set(free) and not set(plan.share_root) & set(free)


def test_search_recovers_a_bad_start_and_never_loses():
    m = ds_block(2)
    d = data(m, 16, 0)
    base = calibrate_model(m, d, report_samples=0, method="minmax", **OFF)
    on = calibrate_model(m, d, report_samples=0, method="minmax", **only("exponent_search"))
    obj = OutputError(base.float_model, d, 64)
    assert obj.sqnr(on.model) >= obj.sqnr(base.model)
    moved = {t: on.exponents[t] - base.exponents[t] for t in on.exponents
             if on.exponents[t] != base.exponents[t]}
    assert moved and set(moved.values()) <= {-1, 1}
    assert any("exponent search" in n for n in on.notes)


def test_search_keeps_only_gains():
    m = ds_block(3)
    d = data(m, 8, 1)
    cal = calibrate_model(m, d, report_samples=0, **OFF)
    from espstream.quant.calibrate import choose_exponents

    calls = []

    def build(delta):
        calls.append(dict(delta))
        if not delta:
            return calibrate_model(m, d, report_samples=0, **OFF).model
        return _shifted(delta)

    def _shifted(delta):
        # a model whose exponents follow delta: built by calibrate's own rewriter
        from espstream.quant import calibrate as c

        opts = c.CalibrateOptions()
        e = choose_exponents(cal.plan, cal.observers, opts, delta)
        rw = c._Rewriter(cal.float_model, cal.plan, e, c.scheme.get_target("esp32p4"), 8, True,
                         "mse")
        return rw.run()

    obj = OutputError(cal.float_model, d, 64)
    delta, before, after, trials = search(cal.plan, build, obj)
    assert after >= before
    assert trials == len(calls) - 1
    assert all(abs(v) == 1 for v in delta.values())
    if delta:
        assert after > before + 0.01

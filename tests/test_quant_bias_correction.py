"""espstream.quant.bias_correction: the corrected layer's mean output is the float layer's."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper
from ptq_util import OFF, arrays, data, ds_block, graph, only, run

from espstream.quant import calibrate_model, scheme
from espstream.quant.bias_correction import corrected_bias
from espstream.quant.patches import Moments, layout


def test_corrected_bias_restores_the_mean_output():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 5, 3)) * 0.2).astype(np.float32)
    b = (0.1 * rng.standard_normal(6)).astype(np.float32)
    attrs = dict(kernel_shape=[3], pads=[1, 1])
    m = graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c", **attrs)],
              {"w": w, "b": b}, [1, 5, 12])
    x = (rng.standard_normal((8, 5, 12)) + 3.0).astype(np.float32)  # a large mean
    lay = layout(m.graph.node[0], {t.name: t for t in m.graph.initializer})
    mo = Moments(lay)
    mo.update(x)
    e = int(scheme.exponent_for_range(float(w.min()), float(w.max()), 8)) + 3  # coarse grid
    wq = scheme.dequantize(scheme.quantize(w, e, 8), e)
    nb = corrected_bias(lay, w, wq, b, mo)
    want = run(m, x).mean(axis=(0, 2))
    before = graph(m.graph.node, {"w": wq, "b": b}, [1, 5, 12])
    after = graph(m.graph.node, {"w": wq, "b": nb}, [1, 5, 12])
    err_before = np.abs(run(before, x).mean(axis=(0, 2)) - want).max()
    err_after = np.abs(run(after, x).mean(axis=(0, 2)) - want).max()
    assert err_before > 1e-2  # the coarse grid does shift the mean
    assert err_after < 1e-4


def _bias(model, node):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    n = next(n for n in model.graph.node if n.name == node)
    dq = next(d for d in model.graph.node if d.output[0] == n.input[2])
    return inits[dq.input[0]].astype(np.int64)


def test_calibrate_option_changes_biases_only():
    m = ds_block(1)
    d = data(m, 16, 0, offset=2.0)
    off = calibrate_model(m, d, target="esp32s3", report_samples=0, **OFF)
    on = calibrate_model(m, d, target="esp32s3", report_samples=0, **only("bias_correction"))
    assert on.exponents == off.exponents and on.weight_exponents == off.weight_exponents
    changed = [n for n in ("conv1", "dw", "pw") if not np.array_equal(_bias(on.model, n),
                                                                     _bias(off.model, n))]
    assert changed  # per-tensor int8 weights on esp32s3 shift every layer's mean
    # the output's mean error on the calibration data goes down
    x = arrays(d)
    ref = run(m, x).mean(axis=(0, 2))
    e_off = np.abs(run(off.model, x).mean(axis=(0, 2)) - ref).mean()
    e_on = np.abs(run(on.model, x).mean(axis=(0, 2)) - ref).mean()
    assert e_on < e_off


def test_a_layer_without_bias_keeps_none():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 4, 1)).astype(np.float32)
    m = graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[1])],
              {"w": w}, [1, 4, 6])
    d = data(m, 4, 0)
    on = calibrate_model(m, d, report_samples=0, **only("bias_correction"))
    off = calibrate_model(m, d, report_samples=0, **OFF)
    assert on.bias_exponents == off.bias_exponents == {}

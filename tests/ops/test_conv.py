"""espstream/ops/conv.py: Conv (dense, depthwise, 2-D, fused Relu / Clip)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model, run_case

RNG = np.random.default_rng(5)


def _w(*s):
    return (RNG.standard_normal(s) * 0.4).astype(np.float32)


def _conv(group: int = 1, act: str | None = None, nd: int = 1):
    def case():
        shape = [1, 4, 8] if nd == 1 else [1, 4, 6, 6]
        k = [3] * nd
        w = _w(4, 4 // group, *k)
        out = "c" if act else "y"
        nodes = [helper.make_node("Conv", ["x", "w", "b"], [out], kernel_shape=k, group=group,
                                  pads=[1] * (2 * nd))]
        inits = {"w": w, "b": _w(4)}
        if act == "Relu":
            nodes.append(helper.make_node("Relu", ["c"], ["y"]))
        elif act == "Clip":
            nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
            inits.update(lo=np.float32(-0.3), hi=np.float32(0.6))
        return model(nodes, shape, inits), {"Conv"}
    return case


CASES = {"Conv": _conv()}
MORE = {"depthwise": _conv(4), "relu": _conv(act="Relu"), "clip": _conv(act="Clip"),
        "2d": _conv(nd=2)}
NOT_LOWERED: dict[str, str] = {}


@pytest.mark.parametrize("name", ["Conv", *MORE])
@pytest.mark.parametrize(("target", "bits"), [("esp32p4", 8), ("esp32s3", 8), ("c", 16)])
def test_through_every_stage(name: str, target: str, bits: int) -> None:
    run_case({**CASES, **MORE}[name], target, bits)


def test_2d_pads_are_written_in_onnx_order() -> None:
    """ESP-DL's Conv deserializer reads `pads` in ONNX order [top, left, bottom, right] and
    reorders them itself (dl_module_conv.hpp); ESP-PPQ writes them so (its ConvTranspose
    configuration with pads [3, 1, 3, 1] has output [6, 2] only read that way)."""
    from op_harness import _data

    from espstream.export import export_model
    from espstream.quant import calibrate_model

    def case():
        return model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3],
                                       pads=[0, 1, 2, 0])], [1, 4, 6, 6], {"w": _w(4, 4, 3, 3)}), \
            {"Conv"}
    run_case(case, "esp32p4", 8)
    m, _ = case()
    data, _ = _data(m)
    g = export_model(calibrate_model(m, data, target="esp32p4", bits=8,
                                     report_samples=0).model).graph
    conv = next(n for n in g.nodes if n.op_type == "Conv")
    assert conv.attrs["pads"] == [0, 1, 2, 0]
    assert g.value_info(conv.outputs[0]).shape == [1, 6, 5, 4]  # H 6+0+2-2, W 6+1+0-2

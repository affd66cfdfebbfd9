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

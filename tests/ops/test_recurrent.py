"""espstream/ops/recurrent.py: a GRU streams with its hidden state as a state pair."""

from __future__ import annotations

import json

import numpy as np
from onnx import helper
from op_harness import model

from espstream.stream.streamify import streamify_model


def test_gru_state_becomes_a_state_pair() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("GRU", ["x", "w", "r"], ["y4"], hidden_size=3,
                              linear_before_reset=1),
             helper.make_node("Squeeze", ["y4", "ax"], ["y"])]
    m = model(nodes, [8, 1, 4], {"w": rng.standard_normal((1, 9, 4)).astype(np.float32),
                                 "r": rng.standard_normal((1, 9, 3)).astype(np.float32),
                                 "ax": np.asarray([1], np.int64)}, opset=13)
    res = streamify_model(m, 2, axes={"x": 0})
    meta = {p.key: p.value for p in res.model.metadata_props}
    assert len(json.loads(meta["espstream.states"])) == 1

"""espstream/ops/norm.py: normalizations mixing every frame are refused on a time axis."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from op_harness import model

from espstream.errors import UserError
from espstream.stream.streamify import streamify_model


def test_instance_norm_over_time_is_refused() -> None:
    m = model([helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"])], [1, 4, 8],
              {"s": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}, opset=13)
    with pytest.raises(UserError, match="mixes every frame of the time axis"):
        streamify_model(m, 2, axes={"x": 2})

"""Bias correction: undo the mean shift that a layer's quantized weights cause.

1. For a linear layer y = W x + b whose weight is stored as W_q, the expected output moves by
   (W_q - W) E[x]. E[x] is the mean input patch on the calibration data
   (`espstream.quant.patches` rule 3), taken of the input as the integer model sees it
   (fake-quantized at its exponent).
2. The corrected float bias is b - (W_q - W) E[x], one value per output channel; it is then
   quantized like any bias (calibrate's rule 5), so the model stays an ordinary QDQ model.
3. A layer without a bias is left as it is (adding one would change the graph).
"""

from __future__ import annotations

import numpy as np

from espstream.quant.patches import Layout, Moments, to_rows


def corrected_bias(lay: Layout, w: np.ndarray, w_deq: np.ndarray, b: np.ndarray,
                   moments: Moments) -> np.ndarray:
    """Rules 1-2: the bias that makes E[W_q x + b'] equal E[W x + b] on the data."""
    d = to_rows(lay, np.asarray(w_deq, np.float64)) - to_rows(lay, np.asarray(w, np.float64))
    mu = moments.mean[lay.row_group()]  # [cout, K]
    shift = np.sum(d * mu, axis=1)
    return (np.asarray(b, np.float64) - shift).astype(np.float32)

"""Bias correction: undo the mean shift that a layer's quantized weights cause.

1. For a linear layer y = W x + b whose weight is stored as W_q, the expected output moves by
   W_q E[x_q] - W E[x]: x_q is the input as the integer model sees it (the float model's
   value fake-quantized at the input's exponent), x the float model's; both means are the
   mean input patch on the calibration data (`espstream.quant.patches` rule 3). With
   `with_input` False only the weights' part, (W_q - W) E[x_q], is corrected.
2. The corrected float bias is b minus that shift, one value per output channel; it is then
   quantized like any bias (calibrate's rule 5), so the model stays an ordinary QDQ model.
3. A layer without a bias is left as it is (adding one would change the graph).
"""

from __future__ import annotations

import numpy as np

from espstream.quant.patches import Layout, Moments, to_rows


def corrected_bias(lay: Layout, w: np.ndarray, w_deq: np.ndarray, b: np.ndarray,
                   moments: Moments, with_input: bool = False) -> np.ndarray:
    """Rules 1-2: the bias that makes E[W_q x_q + b'] equal E[W x + b] on the data."""
    g = lay.row_group()
    wq_rows = to_rows(lay, np.asarray(w_deq, np.float64))
    w_rows = to_rows(lay, np.asarray(w, np.float64))
    mu = moments.mean[g]  # [cout, K]
    mu_ref = moments.mean_ref[g] if with_input else mu
    shift = np.sum(wq_rows * mu, axis=1) - np.sum(w_rows * mu_ref, axis=1)
    return (np.asarray(b, np.float64) - shift).astype(np.float32)

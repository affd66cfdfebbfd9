"""The `calibrate` stage: power-of-two int8 / int16 quantization as ESP-DL computes it."""

from espstream.quant.calibrate import (
    DEFAULT_METHOD,
    CalibrateOptions,
    CalibrateResult,
    calibrate_model,
    print_summary,
)
from espstream.quant.data import (
    CalibrationData,
    model_inputs,
    random_data,
    read_calibration_data,
)

__all__ = [
    "DEFAULT_METHOD",
    "CalibrateOptions",
    "CalibrateResult",
    "CalibrationData",
    "calibrate_model",
    "model_inputs",
    "print_summary",
    "random_data",
    "read_calibration_data",
]

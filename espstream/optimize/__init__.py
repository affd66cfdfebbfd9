"""The `optimize` stage: passes over an onnx-graphsurgeon graph and their fixed-point runner."""

from espstream.optimize.runner import (
    PASSES,
    OptimizeResult,
    optimize_model,
    print_summary,
)

__all__ = ["PASSES", "OptimizeResult", "optimize_model", "print_summary"]

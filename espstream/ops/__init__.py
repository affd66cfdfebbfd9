"""One module per operator (or small family): what every stage knows about it.

To add an operator, write its module here (copy a small one, e.g. `relu.py`) and its test
file `tests/ops/test_<module>.py`; nothing else changes. A module registers, through
`espstream.ops.registry`:

- an `OpSpec` per ONNX operator: its calibration rule (`calibrate`, usually one of
  `espstream.quant.plan`'s shared rules: `share`, `requant`, `own`, `own_with_constants`,
  `float_output`), its streaming rule (`stream`, often a shared one of `espstream.stream.rules`)
  and the facts streaming needs (`zero_keeping`, `nonneg`, `keep_sign`), its lowering
  (`lower(lw, node)` on `espstream.lower.Lowerer`) and the ESP-DL operators it writes;
- a `SimSpec` per ESP-DL operator it writes: `compile(sim, node)` returning the function the
  simulator calls (on `espstream.sim.Simulator`, using `espstream.kernels`), and what pins its
  arithmetic.

Modules whose names start with `_` hold what several families share (`_linear`: Conv, Gemm
and MatMul). `espstream ops` prints the table.
"""

"""ESP-PPQ's side of benchmarks/convert_vs_ppq.py: one `espdl_quantize_onnx` call, timed inside.

    benchmarks/.venv-ppq/bin/python benchmarks/ppq_side.py MODEL.onnx CALIB.npy|CALIB.npz OUT.espdl
        [--chunk N] [--target esp32p4] [--bits 8] [--calib-steps 32] [--error-report]

Runs in the separate ESP-PPQ environment (benchmarks/.venv-ppq: torch CPU + esp-ppq), never in
the project's. It does what ESP-PPQ's documentation shows: a torch DataLoader of batch 1 over the
calibration samples, `espdl_quantize_onnx(..., target, num_of_bits, calib_steps)`, with
`auto_streaming=True` and `streaming_input_shape=[1, C, chunk]` when `--chunk` is given.
A model of several inputs takes an .npz of one array per graph input (by name, samples on axis
0): each step is then the list of the inputs' rows, in the graph's input order, and `--chunk`
sets the first input's frames alone (the others, e.g. a recurrent state, keep their shapes).
ESP-PPQ overwrites its input ONNX with the onnxsim-simplified model, so the model is copied next
to OUT first and that copy is what it reads.

Prints one JSON line on stdout: `seconds` (wall time of the `espdl_quantize_onnx` call alone,
imports and data loading excluded), `cpu_seconds` (this process's CPU time over the same call),
`import_seconds`, and the versions. run_all.py does not run
this file (it takes no --out); convert_vs_ppq.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time

T_START = time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("output")
    parser.add_argument("--chunk", type=int)
    parser.add_argument("--target", default="esp32p4")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--calib-steps", type=int, default=32)
    parser.add_argument("--error-report", action="store_true",
                        help="keep ESP-PPQ's graph-wise and layer-wise error analysis (default on "
                             "in ESP-PPQ; off here unless asked)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    # ESP-PPQ prints a banner and progress bars on stdout: keep stdout for our JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        import numpy as np
        import torch
        from esp_ppq.api import espdl_quantize_onnx
        from torch.utils.data import DataLoader
    import_seconds = time.perf_counter() - t0
    torch.set_num_threads(1)  # the machine is shared; espstream's side is single-threaded too

    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    model_copy = os.path.join(out_dir, "ppq_input.onnx")
    shutil.copyfile(args.model, model_copy)
    kwargs: dict = {}
    if args.calib.endswith(".npz"):  # one array per graph input
        import onnx
        from torch.utils.data import TensorDataset

        names = [i.name for i in onnx.load(args.model).graph.input]
        data = np.load(args.calib)
        tensors = [torch.from_numpy(data[n].astype(np.float32)) for n in names]
        shapes = [[1, *t.shape[1:]] for t in tensors]
        input_shape = shapes if len(shapes) > 1 else shapes[0]
        loader = DataLoader(TensorDataset(*tensors), batch_size=1, shuffle=False)
        if args.chunk:
            kwargs = {"auto_streaming": True,
                      "streaming_input_shape": {names[0]: [*shapes[0][:-1], args.chunk]}}
    else:
        calib = torch.from_numpy(np.load(args.calib).astype(np.float32))
        input_shape = [1, *calib.shape[1:]]
        # A tensor is a dataset of its rows; batch 1 gives [1, *shape] per step, as ESP-PPQ
        # expects.
        loader = DataLoader(calib, batch_size=1, shuffle=False)
        if args.chunk:
            kwargs = {"auto_streaming": True,
                      "streaming_input_shape": [*input_shape[:-1], args.chunk]}

    t1, c1 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):
        espdl_quantize_onnx(
            onnx_import_file=model_copy,
            espdl_export_file=args.output,
            calib_dataloader=loader,
            calib_steps=args.calib_steps,
            input_shape=input_shape,
            target=args.target,
            num_of_bits=args.bits,
            device="cpu",
            error_report=args.error_report,
            export_test_values=False,
            verbose=0,
            **kwargs,
        )
    seconds, cpu_seconds = time.perf_counter() - t1, time.process_time() - c1

    from importlib.metadata import version

    print(json.dumps({
        "seconds": round(seconds, 4),
        "cpu_seconds": round(cpu_seconds, 4),
        "import_seconds": round(import_seconds, 4),
        "process_seconds_to_return": round(time.perf_counter() - T_START, 4),
        "input_shape": input_shape,
        "chunk": args.chunk,
        "error_report": args.error_report,
        "espdl_bytes": os.path.getsize(args.output),
        "versions": {"esp-ppq": version("esp-ppq"), "torch": torch.__version__,
                     "onnxruntime": version("onnxruntime"), "onnx": version("onnx")},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

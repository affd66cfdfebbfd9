"""`convert --offline-too`: the offline `.espdl` beside the streaming one, as ESP-DL's streaming
tutorial (`examples/tutorial/how_to_deploy_streaming_model`, `app_main.cpp`) uses the pair.

What the tutorial's application does and so needs from the two files:

1. It runs the offline model on its test input (`get_test_input_tensor`), then feeds the same
   bytes to the streaming model, `model_input->get_bytes()` at a time: so the offline file
   carries test values of a whole sequence (the data's first sample) whose frame count is a
   whole number of chunks, and the frame axis is the outermost axis of more than one element
   in the runtime layout (then consecutive bytes are consecutive frames).
2. It compares the streaming model's last output with the trailing bytes of the offline
   output by `TensorBase::equal`, which compares exponents too: every input and output the
   two files share must carry the same exponents. Both files come from the one calibrated
   model, so they do; `shared_exponents` checks it.
3. An output with a delay d: streamed frame t + d is offline frame t, so the application skips
   the first d streamed frames (and the last chunk's bytes equal the offline tail only when
   d = 0). The streaming file's metadata `espstream.delay` records d per output; the summary
   says it (`delay_notes`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from espstream.intgraph import IntGraph


def shared_exponents(offline: IntGraph, streaming: IntGraph) -> tuple[bool, str]:
    """Every graph input / output both files have: same dtype and exponents (rule 2)."""
    off = {v.name: v for v in offline.inputs + offline.outputs}
    bad, same = [], 0
    for v in streaming.inputs + streaming.outputs:
        o = off.get(v.name)
        if o is None:
            continue  # a recurrent state: streaming only
        same += 1
        if list(o.exponents) != list(v.exponents) or o.dtype != v.dtype:
            bad.append(f"'{v.name}' {o.dtype} {o.exponents} offline vs {v.dtype} "
                       f"{v.exponents} streaming")
    if bad:
        return False, "exponents differ: " + "; ".join(bad)
    return True, f"{same} shared inputs/outputs carry the same exponents (TensorBase::equal)"


def splittable(offline: IntGraph, streaming: IntGraph) -> tuple[bool, str]:
    """The offline test input is a whole number of the streaming input's chunks, cut by bytes
    as the tutorial's loop does (rule 1)."""
    axes = json.loads(streaming.metadata.get("espstream.time_axes", "{}"))
    parts = []
    for v in streaming.inputs:
        t = offline.test_inputs.get(v.name)
        if v.name not in axes:
            continue
        if t is None:
            return False, f"the offline file has no test value for input '{v.name}'"
        axis = int(axes[v.name])
        shape = [int(d) for d in v.shape or []]
        if math.prod(shape[:axis]) != 1:
            return False, (f"input '{v.name}': its frame axis {axis} is not outermost in "
                           f"{shape}, so byte-wise chunks are not frames")
        T, c = int(t.dims[axis]), shape[axis]
        if T % c:
            return False, (f"input '{v.name}': the test input's {T} frames are not a whole "
                           f"number of chunks of {c}")
        parts.append(f"'{v.name}' {T} frames = {T // c} chunks of {c}")
    if not parts:
        return False, "the streaming file records no time axis for its inputs"
    return True, "offline test input splits into the streaming input: " + ", ".join(parts)


def delays(streaming: IntGraph) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads(streaming.metadata.get("espstream.delay",
                                                                     "{}")).items()}


def delay_notes(streaming: IntGraph) -> list[str]:
    """One line per delayed output (rule 3)."""
    return [f"output '{name}' is delayed by {d} frame(s): the application skips the first "
            f"{d} streamed frames (streamed frame t + {d} = offline frame t; metadata "
            "espstream.delay)" for name, d in delays(streaming).items() if d > 0]


def report(offline: IntGraph, streaming: IntGraph) -> dict[str, Any]:
    ok_e, exp = shared_exponents(offline, streaming)
    ok_s, split = splittable(offline, streaming)
    return {"ok": ok_e and ok_s, "exponents": exp, "split": split,
            "delay": delays(streaming), "notes": delay_notes(streaming)}

"""Running the float model in onnxruntime and feeding the observers, in fixed memory.

1. The tensors to observe are added as extra graph outputs of a copy of the model.
2. Batching: when every input has batch dimension 1 (or a symbolic one), a copy with a symbolic
   batch dimension is tried on the first two samples and used only if each batched result
   equals the per-sample runs (shape exactly, values to float rounding). Otherwise one sample
   per run: correct first. The per-sample reference runs of that trial go through the batched
   copy itself at batch 1: it is the same graph, run as written (graph optimizations off), on
   the same one-sample feed, so it computes what the model does; one onnxruntime session then
   serves the whole calibration. The one-sample session of the model as given is created only
   when runs are not batched. When all the data fits in one batched run, that session runs on
   one thread too: creating onnxruntime's thread pool then costs more than it saves (threads
   change no value: each output element is computed by one thread either way).
3. A run holds at most `max_bytes` of observed values (and inputs), so memory stays flat in
   sequence length as it is in sample count: the first sample's run gives the bytes of one
   sample b, a batched run then stacks at most min(batch, max_bytes // b) samples, and batching
   is tried only if the trial (2 samples together beside 1 alone: 3b) fits in max_bytes.
   Otherwise samples run one by one through the trial's session (the same graph at batch 1).
   The histograms are exact whatever the grouping (observers rule 2), so the grouping of
   samples into runs changes no exponent.
4. Each run's outputs go straight into the observers and are dropped; nothing else is kept.
5. A progress bar goes to stderr while a person watches (`log.progress_enabled()`).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from espstream import log
from espstream.errors import UserError, first_line
from espstream.quant.data import CalibrationData
from espstream.quant.observers import HistogramObserver, NonFiniteError

MAX_BATCH_BYTES = 256 << 20  # observed values (and inputs) one batched run may hold (rule 3)


def new_session(model: onnx.ModelProto, opts: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU session that runs the graph as written.

    onnxruntime's graph optimizations fold an explicit Pad into a following pool's own padding,
    which makes zero padding -inf for MaxPool and can make the padding reach the kernel size
    (then onnxruntime refuses the model); calibration must see the float model's own numbers.
    """
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A session that runs one sample (or one chunk) per call, on one thread: for runs this
    small a thread pool costs more than it gains (more so on a busy machine). The batched
    session (`Runner`) keeps onnxruntime's default threads unless the data fits in one run."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        return new_session(model, opts)
    except Exception as e:  # onnxruntime raises its own exception types
        raise UserError(f"onnxruntime cannot load the model: {first_line(e)}") from None


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs also include `names` (float, shape unset)."""
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
            have.add(name)
    return m


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy with a symbolic batch dimension, or None if an input has no batch of 1."""
    m = copy.deepcopy(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value != 1):
            return None
        dims[0].Clear()
        dims[0].dim_param = "espstream_batch"
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    return m


class Progress:
    """`label [#####.....] n/total` on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.n = label, total, 0
        self.enabled = log.progress_enabled() and total > 0
        self._last = 0.0

    def advance(self, k: int) -> None:
        self.n += k
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.n < self.total:
            return
        self._last = now
        frac = self.n / self.total
        bar = "#" * int(frac * 30) + "." * (30 - int(frac * 30))
        sys.stderr.write(f"\r{self.label} [{bar}] {self.n}/{self.total}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (len(self.label) + 50) + "\r")
            sys.stderr.flush()


class Runner:
    """Runs a model over calibration data, batched when that is verified to be exact."""

    def __init__(self, model: onnx.ModelProto, names: list[str], batch: int,
                 samples: int | None = None, max_bytes: int = MAX_BATCH_BYTES) -> None:
        """`samples`: how many samples will be run, if known (at most `batch`: one thread).
        `max_bytes`: what one batched run may hold (rule 3)."""
        self.names = names
        self.model = with_outputs(model, names)
        self.batched: ort.InferenceSession | None = None
        self.batch = max(1, batch)
        self.max_bytes = max_bytes
        self.per_run = 1  # samples per batched run, set by the trial
        # Every session is made here, before any data is read, so a model onnxruntime cannot
        # load fails first. The batched-shape session, if one loads, waits for the trial.
        self._trial: ort.InferenceSession | None = None
        self._sess: ort.InferenceSession | None = None
        if self.batch >= 2:
            dyn = dynamic_batch(self.model)
            if dyn is not None:
                try:
                    one_run = samples is not None and samples <= self.batch
                    self._trial = new_session(dyn, _quiet_opts(1 if one_run else 0))
                except Exception:  # a fixed-batch Reshape and the like: one per run
                    self._trial = None
        if self._trial is None:
            self._sess = session(self.model)
        ref = self._trial or self._sess
        self.input_names = [i.name for i in ref.get_inputs()]

    @property
    def sess(self) -> ort.InferenceSession:
        """The one-sample session of the model as given (made when first needed)."""
        if self._sess is None:
            self._sess = session(self.model)
        return self._sess

    def _try_batching(self, first: list[dict[str, np.ndarray]]) -> None:
        sess, self._trial = self._trial, None
        if sess is None or len(first) < 2:
            return
        try:
            alone = sess.run(self.names, first[0])
        except Exception:  # a fixed-batch Reshape and the like: fall back to one per run
            return
        one = sum(int(a.nbytes) for a in alone) + sum(int(v.nbytes) for v in first[0].values())
        self.per_run = max(1, min(self.batch, self.max_bytes // max(one, 1)))
        if 3 * one > self.max_bytes or self.per_run < 2:
            self._sess = sess  # rule 3: one sample per run, through the same graph
            return
        try:
            feed = {k: np.concatenate([s[k] for s in first]) for k in self.input_names}
            together = sess.run(self.names, feed)
        except Exception:  # a fixed-batch Reshape and the like: fall back to one per run
            return
        for i, s in enumerate(first):
            if i:
                try:
                    alone = sess.run(self.names, s)
                except Exception:
                    return
            for a, t in zip(alone, together, strict=True):
                if a.ndim == 0 or a.shape[0] != 1 or t.shape != (len(first), *a.shape[1:]):
                    return
                if not np.isfinite(a).all():
                    return  # NaN / Inf: no batching; the observers then name the tensor
                tol = 1e-5 * (float(np.abs(a).max()) + 1e-30) + 1e-7
                if not _allclose(t[i : i + 1], a, 1e-4, tol):
                    return
        self.batched = sess

    def run(
        self, data: Iterable[dict[str, np.ndarray]]
    ) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Yield, per run, (samples in it, values of `names`); batched values stack samples."""
        it = iter(data)
        first = [s for _, s in zip(range(2), it, strict=False)]
        self._try_batching(first)
        pending = list(first)
        for s in it:
            pending.append(s)
            if len(pending) >= (self.per_run if self.batched else 1):
                yield from self._flush(pending)
                pending = []
        if pending:
            yield from self._flush(pending)

    def _flush(
        self, samples: list[dict[str, np.ndarray]]
    ) -> Iterator[tuple[int, list[np.ndarray]]]:
        if self.batched is not None and len(samples) > 1 and _same_shapes(samples):
            feed = {k: np.concatenate([s[k] for s in samples]) for k in self.input_names}
            yield len(samples), self.batched.run(self.names, feed)
        else:
            for s in samples:
                yield 1, self.sess.run(self.names, s)


def _allclose(t: np.ndarray, a: np.ndarray, rtol: float, atol: float) -> bool:
    """`np.allclose(t, a, rtol, atol)`, the common case without its per-call overhead: for
    finite values whose differences are finite, allclose is exactly this comparison (the
    same float32 operations); anything else (inf, NaN, overflow) is left to allclose itself."""
    if np.isfinite(t).all() and np.isfinite(a).all():
        d = np.abs(t - a)
        if np.isfinite(d).all() and bool((d <= atol + rtol * np.abs(a)).all()):
            return True
    return bool(np.allclose(t, a, rtol=rtol, atol=atol))


def _quiet_opts(threads: int = 0) -> ort.SessionOptions:
    # The batched trial may fail by design (a fixed-batch Reshape); onnxruntime would log that
    # failure as an ERROR on stderr before the fallback, so only FATAL is let through.
    # threads 0: onnxruntime's default.
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def _same_shapes(samples: list[dict[str, np.ndarray]]) -> bool:
    return all(
        all(s[k].shape == samples[0][k].shape for k in samples[0]) for s in samples[1:]
    )


def feed(observers: dict[str, HistogramObserver], names: list[str], values: list[np.ndarray],
         where: str) -> None:
    """Add one run's values of `names` to their observers; NaN or Inf is the user's error."""
    for name, v in zip(names, values, strict=True):
        try:
            observers[name].update(v)
        except NonFiniteError:
            raise UserError(
                f"tensor {name!r}: the float model produces NaN or Inf on {where}; "
                "check the model and the data"
            ) from None


def observe(
    model: onnx.ModelProto,
    names: list[str],
    data: CalibrationData,
    batch: int = 64,
    bins: int = 4096,
    max_bytes: int = MAX_BATCH_BYTES,
) -> tuple[dict[str, HistogramObserver], bool]:
    """Observers of `names` over all of `data`; returns them and whether runs were batched."""
    observers = {n: HistogramObserver(bins) for n in names}
    runner = Runner(model, names, batch, samples=len(data), max_bytes=max_bytes)
    progress = Progress("calibrate", len(data))
    try:
        for count, values in runner.run(data):
            feed(observers, names, values, "the calibration data")
            progress.advance(count)
    finally:
        progress.close()
    return observers, runner.batched is not None

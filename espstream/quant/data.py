"""Calibration data: `.npy`, `.npz`, a folder of them, or standard-normal noise.

Rules (S is a model input's shape, `?` a symbolic dimension matching any size):
1. A `.npy` feeds a one-input model. Shaped `[N, *S]` it holds N samples; shaped like S
   where S[0] is 1 or symbolic (`[N, *S[1:]]`), it holds N samples of batch 1; shaped
   exactly S (S[0] fixed above 1), it is one sample.
2. A `.npz` is keyed by input name and holds every input, each array read as in rule 1; all
   arrays of one file hold the same number of samples.
3. A folder is read as its `.npy` / `.npz` files in name order (other files are ignored).
4. Errors, each naming the file and input: a shape that fits none of rule 1 (both shapes
   given), NaN or Inf (with the sample index), an unknown `.npz` key, a missing input, a `.npy`
   for a model with several inputs, an empty folder, an unreadable file.
5. Data is cast to the input's element type; `.npy` files are memory-mapped and samples are
   read one at a time, so a large file is never copied whole into memory.
6. An input named in `values` (`--input-value NAME=V`) holds V in every sample and is not read
   from the files (an explicit recurrent state at its start, a sample rate); rules 1-2 apply to
   the other inputs, so a `.npy` feeds a model whose other inputs all have values.
"""

from __future__ import annotations

import copy
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from espstream import log
from espstream.errors import UserError, first_line


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | None, ...]  # None for a symbolic or missing dimension
    dtype: np.dtype

    def shape_text(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tt.shape.dim
        )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(InputSpec(vi.name, shape, dtype))
    return specs


def _fits(actual: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(actual) == len(expected) and all(
        e is None or a == e for a, e in zip(actual, expected, strict=True)
    )


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class _Array:
    """One input's samples inside one file: sample i is `take(i)`, shaped like the input."""

    def __init__(self, label: str, spec: InputSpec, arr: np.ndarray) -> None:
        self.label, self.spec, self.arr = label, spec, arr
        s, a = spec.shape, tuple(arr.shape)
        if arr.dtype.kind not in "fiub":
            raise UserError(
                f"{label}: input {spec.name!r} has element type {arr.dtype}, expected numbers"
            )
        if len(a) == len(s) + 1 and _fits(a[1:], s):
            self.n, self.mode = a[0], "stacked"
        elif len(s) and len(a) == len(s) and _fits(a[1:], s[1:]) and s[0] in (1, None):
            self.n, self.mode = a[0], "batch1"
        elif _fits(a, s):
            self.n, self.mode = 1, "single"
        else:
            hint = f"[N, {', '.join('?' if d is None else str(d) for d in s[1:])}]" if s else "[]"
            raise UserError(
                f"{label}: input {spec.name!r} has shape {_fmt(a)}, but the model's input "
                f"{spec.name!r} is {spec.shape_text()}; give {hint} or {spec.shape_text()}"
            )
        if self.n == 0:
            raise UserError(f"{label}: input {spec.name!r} holds no samples (shape {_fmt(a)})")

    def take(self, i: int) -> np.ndarray:
        if self.mode == "stacked":
            x = self.arr[i]
        elif self.mode == "batch1":
            x = self.arr[i : i + 1]
        else:
            x = self.arr
        x = np.asarray(x)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = "NaN" if np.isnan(x).any() else "Inf"
            raise UserError(
                f"{self.label}: input {self.spec.name!r}, sample {i}: contains {bad}; "
                "calibration data must be finite"
            )
        return np.require(x, self.spec.dtype, "C")  # (ascontiguousarray makes a 0-d array 1-D)


class _Const:
    """An input holding one value in each of n samples (rule 6); nothing is held but the value."""

    def __init__(self, spec: InputSpec, n: int, value: float) -> None:
        self.spec, self.n = spec, n
        self.shape = tuple(1 if d is None else d for d in spec.shape)
        self.value = _typed_value(spec, value)

    def take(self, i: int) -> np.ndarray:
        return np.full(self.shape, self.value, self.spec.dtype)


def _typed_value(spec: InputSpec, value: float):
    try:
        return np.array(value).astype(spec.dtype).item()
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"--input-value {spec.name}={value}: not a {spec.dtype} value") from None


def check_value_names(values: dict[str, float], inputs: list[InputSpec]) -> None:
    """Every `--input-value` name is an input of the model."""
    unknown = sorted(set(values) - {s.name for s in inputs})
    if unknown:
        raise UserError(f"--input-value {unknown[0]}: the model has no input {unknown[0]!r} "
                        f"(inputs: {', '.join(s.name for s in inputs) or 'none'})")


class _Noise:
    """Standard-normal samples of one input drawn on demand (random_data rule 4): memory holds
    one sample, whatever n and the sequence length. The generator's state at this input's
    first sample is kept; sample i is drawn by replaying from there (reading in order, the
    usual case, draws each sample once). Row by row, a generator yields the same stream as
    one call for all rows, so the values equal `rng.standard_normal((n, *S))` cast to the
    input's type. `rng` is left where a whole-array draw would leave it."""

    def __init__(self, spec: InputSpec, n: int, rng: np.random.Generator) -> None:
        self.spec, self.n = spec, n
        self.shape = tuple(1 if d is None else d for d in spec.shape)
        self._start = copy.deepcopy(rng.bit_generator.state)
        for _ in range(n):  # advance `rng` past this input's samples for the next input
            rng.standard_normal(self.shape)
        self._rng: np.random.Generator | None = None
        self._next = 0

    def take(self, i: int) -> np.ndarray:
        if self._rng is None or i < self._next:
            self._rng = np.random.default_rng()
            self._rng.bit_generator.state = copy.deepcopy(self._start)
            self._next = 0
        while True:
            x = self._rng.standard_normal(self.shape)
            self._next += 1
            if self._next > i:
                return np.require(x.astype(self.spec.dtype), self.spec.dtype, "C")


def _check_npy_header(f, label: str, bad: str = "not a readable .npy file") -> None:
    """Refuse an .npy header declaring an object dtype or a shape over espstream.limits."""
    from espstream.limits import check_shape

    try:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise UserError(f"{label}: {bad} ({first_line(e)})") from None
    if dtype.hasobject:
        raise UserError(f"{label}: not a readable .npy file: it holds Python objects (dtype "
                        f"{dtype}); give numbers")
    check_shape(shape, dtype.itemsize, label)


def _load_npy(path: Path) -> np.ndarray:
    from espstream.modelio import check_input_file

    check_input_file(str(path))
    try:
        with open(path, "rb") as f:
            _check_npy_header(f, str(path))
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy file ({first_line(e)})") from None


class _NpzFile:
    def __init__(self, path: Path) -> None:
        from espstream.modelio import check_input_file

        self.path = path
        check_input_file(str(path))
        try:
            self.npz = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise UserError(f"{path}: not a readable .npz file ({first_line(e)})") from None

    def get(self, key: str) -> np.ndarray:
        return npz_member(self.npz, key, str(self.path))


def npz_member(npz, key: str, label: str) -> np.ndarray:
    """One array of an open .npz, its header checked (object dtype, espstream.limits) before
    it is inflated, and a corrupt member (bad CRC, bad deflate stream) refused."""
    from espstream.limits import check_shape

    what = f"{label}: array {key!r}"
    try:
        info = npz.zip.getinfo(key if key in npz.zip.namelist() else key + ".npy")
        check_shape([info.file_size], 1, what)
        with npz.zip.open(info) as f:
            _check_npy_header(f, what)
        return npz[key]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{what} is unreadable ({first_line(e)})") from None


class CalibrationData:
    """A re-iterable sequence of samples; each sample maps input name -> array of its shape."""

    def __init__(self, inputs: list[InputSpec]) -> None:
        self.inputs = inputs
        self._sources: list[tuple[str, object]] = []  # (label, loader)
        self._counts: list[int] = []
        self.limit: int | None = None
        self.random_seed: int | None = None
        self.description = ""

    def __len__(self) -> int:
        total = sum(self._counts)
        return min(total, self.limit) if self.limit is not None else total

    def _add(self, label: str, arrays: dict[str, _Array]) -> None:
        counts = {a.n for a in arrays.values()}
        if len(counts) > 1:
            detail = ", ".join(f"{k}: {a.n}" for k, a in arrays.items())
            raise UserError(f"{label}: the inputs hold different numbers of samples ({detail})")
        self._sources.append((label, arrays))
        self._counts.append(counts.pop())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        left = len(self)
        for (_, src), n in zip(self._sources, self._counts, strict=True):
            arrays = src() if callable(src) else src
            for i in range(n):
                if left <= 0:
                    return
                left -= 1
                yield {name: a.take(i) for name, a in arrays.items()}


def _one_file(path: Path, inputs: list[InputSpec]) -> dict[str, _Array]:
    label = str(path)
    names = [s.name for s in inputs]
    if path.suffix == ".npy":
        if len(inputs) != 1:
            raise UserError(
                f"{label}: the model has {len(inputs)} inputs ({', '.join(names)}); a .npy holds "
                "one array: give a .npz keyed by input name, e.g. np.savez(path, "
                + ", ".join(f"{n}=..." for n in names) + ")"
            )
        return {inputs[0].name: _Array(label, inputs[0], _load_npy(path))}
    npz = _NpzFile(path)
    keys = list(npz.npz.files)
    for k in keys:
        if k not in names:
            raise UserError(
                f"{label}: key {k!r} is not an input of the model (inputs: {', '.join(names)}); "
                f"save the arrays with np.savez(path, {names[0]}=...)"
            )
    for s in inputs:
        if s.name not in keys:
            raise UserError(f"{label}: no array for input {s.name!r} (keys: {', '.join(keys)})")
    return {s.name: _Array(label, s, npz.get(s.name)) for s in inputs}


def read_calibration_data(
    path: str, inputs: list[InputSpec], limit: int | None = None,
    values: dict[str, float] | None = None,
) -> CalibrationData:
    """Open `path` (rules 1-3, 6); shapes are checked now, values while iterating."""
    values = dict(values or {})
    check_value_names(values, inputs)
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file or folder (calibration data)")
    data = CalibrationData(inputs)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".npy", ".npz") and f.is_file())
        if not files:
            raise UserError(f"{path}: the folder holds no .npy or .npz files")
    elif p.suffix in (".npy", ".npz"):
        files = [p]
    else:
        raise UserError(f"{path}: calibration data must be a .npy, a .npz or a folder of them")
    read = [s for s in inputs if s.name not in values]
    if not read:
        raise UserError(f"--input-value names every input of the model; {path} has nothing "
                        "to give (use --random N, or leave an input to the data)")
    for f in files:
        arrays: dict = _one_file(f, read)
        n = next(iter(arrays.values())).n
        arrays.update({s.name: _Const(s, n, values[s.name]) for s in inputs if s.name in values})
        data._add(str(f), arrays)
    if limit is not None:
        if limit <= 0:
            raise UserError(f"--samples {limit}: give a positive number")
        data.limit = limit
    data.description = f"{path} ({len(data)} samples)"
    if len(data) == 0:
        raise UserError(f"{path}: holds no samples")
    return data


def random_data(inputs: list[InputSpec], n: int, seed: int = 0,
                values: dict[str, float] | None = None) -> CalibrationData:
    """n samples of noise, for a model with fixed input dimensions.

    1. A float input of any rank (a 0-d scalar too) gets standard-normal values.
    2. An input named in `values` (`--input-value NAME=V`) holds V everywhere, in its own type:
       what noise cannot stand for (a sample rate, a length, a flag). An integer or boolean
       input must be named there; the error lists every such input.
    3. A dimension that is symbolic (other than the batch axis, which becomes 1) is an error.
    4. Noise is drawn when a sample is read, not held: the values are those of one
       `standard_normal((n, *S))` call per input, in input order (`_Noise`).
    """
    from espstream.limits import MAX_RANDOM, MAX_SEED, check_count, check_shape

    if n <= 0:
        raise UserError(f"--random {n}: give a positive number of samples")
    check_count(n, "--random", 1, MAX_RANDOM)
    check_count(seed, "--seed", 0, MAX_SEED)
    values = dict(values or {})
    check_value_names(values, inputs)
    unset = [s for s in inputs if s.dtype.kind != "f" and s.name not in values]
    if unset:
        names = ", ".join(f"{s.name!r} ({s.dtype}, shape {s.shape_text()})" for s in unset)
        raise UserError(
            f"--random makes float noise only; give the value of input {names} with "
            f"--input-value {unset[0].name}=VALUE (e.g. a sample rate or a length), or give --data"
        )
    arrays = {}
    rng = np.random.default_rng(seed)
    for s in inputs:
        if any(d is None for d in s.shape[1:]):
            raise UserError(
                f"input {s.name!r} has shape {s.shape_text()}: --random needs fixed dimensions; "
                "fix them with `espstream optimize --input-shape` or give --data"
            )
        shape = (n, *[1 if d is None else d for d in s.shape])
        # noise is bounded per sample (rule 4 draws one at a time); a constant input keeps the
        # n-deep bound it had when it was held whole
        check_shape(shape if s.name in values else shape[1:], 8, f"--random {n}: input {s.name!r}")
        arrays[s.name] = (_Const(s, n, values[s.name]) if s.name in values
                          else _Noise(s, n, rng))
    data = CalibrationData(inputs)
    data._add("--random", arrays)
    data.random_seed = seed
    data.description = f"--random {n} (standard normal, seed {seed})"
    return data


def parse_input_values(items: tuple[str, ...] | list[str]) -> dict[str, float]:
    """`--input-value NAME=V` (repeatable) -> {NAME: V}."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, text = item.rpartition("=")
        try:
            value = float(text)
        except ValueError:
            value = None
        if not sep or not name or value is None or not np.isfinite(value):
            raise UserError(f"--input-value {item}: expected NAME=NUMBER")
        out[name] = int(value) if value.is_integer() else value
    return out


def warn_random() -> None:
    log.warn(
        "--random: calibrating on standard-normal noise; exponents fit noise, not your data, "
        "so accuracy on real inputs may be poor. Give --data with real samples for a real model."
    )

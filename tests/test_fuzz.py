"""Fuzzing the loaders and the stages a user points at a file (issue 7, robustness).

Valid files (`tests/bad_inputs/tiny.espdl`, `tiny.onnx`, `tiny.qdq.onnx`) are mutated by
byte flips, truncations, splices (a slice of the file copied elsewhere), deletions and
overwrites with boundary integers; the mutant goes, in process, through what the CLI would run:

- `.espdl`: `inspect_bytes` (what `espstream inspect` prints), and when the file reads,
  `check_test_values` (what `espstream verify FILE.espdl` runs: the simulator on the file's
  embedded test input);
- ONNX: `inspect_bytes`, and when `parse_model` accepts it, `optimize_model` (with its
  onnxruntime equivalence check);
- every stage: field-edited float models through `convert` (optimize, calibrate, streamify,
  export and all of verify), field-edited QDQ models through streamify, export with test
  values and the simulator; under the slow mark also from the bundled tutorial_tcn and kws2d.

Each example must end in success or a `UserError` (the one-line user message), never another
exception; within a per-example deadline (no hang); with its Python/NumPy allocations under a
cap (tracemalloc peak; no size field read from the file may make us allocate unboundedly).
The default run is ~100 examples in all; `-m slow` runs thousands. An optional atheris
harness (coverage-guided) runs under the slow mark when atheris is installed.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espstream.errors import UserError

HERE = Path(__file__).resolve().parent / "bad_inputs"
ROOT = HERE.parents[1]
ESPDL = (HERE / "tiny.espdl").read_bytes()
ONNX = (HERE / "tiny.onnx").read_bytes()
QDQ = (HERE / "tiny.qdq.onnx").read_bytes()

MEMORY_CAP = 64 << 20  # bytes; the valid files need under 2 MB
BOUNDARY = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` after 1-4 random edits, at uniformly drawn places (hypothesis' own integers
    favour small values, which would keep hitting the first header bytes)."""
    rnd = draw(st.randoms(use_true_random=False))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        if n == 0:
            break
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "delete", "boundary"]))
        at = rnd.randrange(n)
        if kind == "flip":
            data[at] ^= rnd.randrange(1, 256)
        elif kind == "truncate":
            del data[at:]
        elif kind == "splice":
            src = rnd.randrange(n)
            data[at:at] = data[src : src + rnd.randrange(1, 65)]
        elif kind == "delete":
            del data[at : at + rnd.randrange(1, 17)]
        else:
            data[at : at + 4] = rnd.choice(BOUNDARY).to_bytes(4, "little")
    return bytes(data)


SMALL = [-(2**31), -2, -1, 0, 1, 2, 3, 5, 17]
OPS = ["Relu", "Add", "Mul", "Softmax", "Erf", "Conv", "Gemm", "MaxPool", "Transpose", "NoSuchOp"]


@st.composite
def edited(draw, seed: bytes) -> bytes:
    """`seed` parsed and changed in 1-3 fields, so the mutant still parses and reaches the
    checker and the stage: an attribute value, an initializer's dims or data bytes (NaN and
    Inf weights included), a node input rewired, a node dropped, an op type swapped, an input
    dimension changed."""
    import onnx

    rnd = draw(st.randoms(use_true_random=False))
    m = onnx.load_from_string(seed)
    g = m.graph
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["attr", "dims", "data", "rewire", "drop", "op", "shape"]))
        if kind == "attr":
            attrs = [a for n in g.node for a in n.attribute if a.ints or a.type == a.INT]
            if attrs:
                a = rnd.choice(attrs)
                if a.ints:
                    a.ints[rnd.randrange(len(a.ints))] = rnd.choice(SMALL)
                else:
                    a.i = rnd.choice(SMALL)
        elif kind == "dims" and g.initializer:
            t = rnd.choice(g.initializer)
            if t.dims:
                t.dims[rnd.randrange(len(t.dims))] = rnd.choice(SMALL[2:])
        elif kind == "data" and g.initializer:
            t = rnd.choice(g.initializer)
            if len(t.raw_data) >= 4:
                raw = bytearray(t.raw_data)
                at = rnd.randrange(len(raw) // 4) * 4
                raw[at : at + 4] = rnd.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f",
                                               b"\xff\xff\x7f\x7f", b"\x00\x00\x00\x00"])
                t.raw_data = bytes(raw)
        elif kind == "rewire" and g.node:
            names = [i.name for i in g.input] + [o for n in g.node for o in n.output]
            names += [t.name for t in g.initializer] + ["", "nowhere"]
            n = rnd.choice(list(g.node))
            if n.input:
                n.input[rnd.randrange(len(n.input))] = rnd.choice(names)
        elif kind == "drop" and len(g.node) > 1:
            del g.node[rnd.randrange(len(g.node))]
        elif kind == "op" and g.node:
            rnd.choice(list(g.node)).op_type = rnd.choice(OPS)
        elif kind == "shape" and g.input and g.input[0].type.tensor_type.shape.dim:
            dims = g.input[0].type.tensor_type.shape.dim
            d = dims[rnd.randrange(len(dims))]
            if rnd.random() < 0.3:
                d.dim_param = "T"
            else:
                d.dim_value = rnd.choice([0, 1, 2, 3, 64])
    return m.SerializeToString()


def run_guarded(fn, data: bytes) -> None:
    """`fn(data)` may succeed or raise UserError; memory peak under the cap."""
    tracemalloc.start()
    try:
        fn(data)
    except UserError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_CAP, f"{peak / 2**20:.0f} MiB allocated"


def espdl_paths(data: bytes) -> None:
    from espstream import espdl
    from espstream.inspect import inspect_bytes
    from espstream.verify_int8 import check_test_values

    inspect_bytes(data, "fuzz.espdl")
    graph = espdl.read(data)
    if graph.test_inputs:
        check_test_values(graph)


def onnx_paths(data: bytes) -> None:
    from espstream.inspect import inspect_bytes
    from espstream.modelio import parse_model
    from espstream.optimize import optimize_model

    inspect_bytes(data, "fuzz.onnx")
    optimize_model(parse_model(data, "fuzz.onnx"))


FUZZ = settings(max_examples=40, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_LONG = settings(max_examples=2000, deadline=5000,  # random: each run explores anew
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_seeds_are_valid():
    """The unmutated files pass every path (so failures below come from the mutations)."""
    espdl_paths(ESPDL)
    onnx_paths(ONNX)
    onnx_paths(QDQ)


@FUZZ
@given(mutated(ESPDL))
def test_fuzz_espdl(data):
    run_guarded(espdl_paths, data)


@FUZZ
@given(mutated(ONNX))
def test_fuzz_onnx(data):
    run_guarded(onnx_paths, data)


@settings(FUZZ, max_examples=20)
@given(mutated(QDQ))
def test_fuzz_qdq_onnx(data):
    run_guarded(onnx_paths, data)


@FUZZ
@given(st.one_of(edited(ONNX), edited(QDQ)))
def test_fuzz_onnx_fields(data):
    run_guarded(onnx_paths, data)


# ---- every stage, on mutants that still parse -------------------------------------------


def convert_path(data: bytes, chunk: int | None) -> None:
    """What `espstream convert --random 2 [--chunk C]` runs: every stage and every check."""
    from espstream.convert import convert_model
    from espstream.modelio import parse_model

    convert_model(parse_model(data, "fuzz.onnx"), random=2, chunk=chunk, verify_samples=1)


def export_path(data: bytes, chunk: int | None) -> None:
    """What `espstream streamify --chunk C | espstream export --test-random` runs on a QDQ
    model, then the simulator on the file's test values (`espstream verify FILE.espdl`)."""
    from espstream import espdl
    from espstream.export import export_model
    from espstream.modelio import parse_model
    from espstream.stream.streamify import streamify_model
    from espstream.verify_int8 import check_test_values

    m = parse_model(data, "fuzz.qdq.onnx")
    if chunk:
        m = streamify_model(m, chunk).model
    check_test_values(espdl.read(export_model(m, test_random=True).data))


CHUNKS = st.sampled_from([None, 1, 2, 4])
STAGES = settings(FUZZ, max_examples=25, deadline=None)
# Each run explores anew; about 1 float mutant in 10 converts cleanly and 1 QDQ mutant in 5
# exports (measured), the rest are refused along the way, which is what is being tested.
STAGES_LONG = settings(FUZZ_LONG, max_examples=1500, deadline=None)


@STAGES
@given(edited(ONNX), CHUNKS)
def test_fuzz_convert(data, chunk):
    run_guarded(lambda d: convert_path(d, chunk), data)


@STAGES
@given(edited(QDQ), CHUNKS)
def test_fuzz_streamify_export(data, chunk):
    run_guarded(lambda d: export_path(d, chunk), data)


@pytest.mark.slow
@STAGES_LONG
@given(edited(ONNX), CHUNKS)
def test_fuzz_convert_long(data, chunk):
    run_guarded(lambda d: convert_path(d, chunk), data)


@pytest.mark.slow
@STAGES_LONG
@given(edited(QDQ), CHUNKS)
def test_fuzz_streamify_export_long(data, chunk):
    run_guarded(lambda d: export_path(d, chunk), data)


@functools.cache
def model_seeds() -> dict[str, tuple[bytes, bytes, list[int]]]:
    """The bundled tutorial_tcn and kws2d, optimized and calibrated (on noise): more operators
    for the mutants to reach (Sigmoid, Mul, Add, pools, Gemm, 2-D convolutions); with chunks."""
    import onnx

    from espstream.optimize import optimize_model
    from espstream.quant import calibrate_model, model_inputs
    from espstream.quant.data import random_data

    seeds = {}
    for name, chunks in (("tutorial_tcn", [1, 3, 6]), ("kws2d", [1, 2])):
        f = optimize_model(onnx.load(str(ROOT / "models" / f"{name}.onnx"))).model
        q = calibrate_model(f, random_data(model_inputs(f), 4, seed=0), report_samples=0).model
        seeds[name] = (f.SerializeToString(), q.SerializeToString(), chunks)
    return seeds


@pytest.mark.slow
@settings(FUZZ_LONG, max_examples=1000, deadline=None)
@given(st.data())
def test_fuzz_models_long(data):
    name = data.draw(st.sampled_from(sorted(model_seeds())))
    float_b, qdq_b, chunks = model_seeds()[name]
    chunk = data.draw(st.sampled_from([None, *chunks]))
    if data.draw(st.booleans()):
        run_guarded(lambda d: convert_path(d, chunk), data.draw(edited(float_b)))
    else:
        run_guarded(lambda d: export_path(d, chunk), data.draw(edited(qdq_b)))


def test_espdl_huge_pads_is_a_clean_error():
    """Found by the long fuzz: pads near 2**40 once made the simulator allocate terabytes."""
    from espstream import espdl

    g = espdl.read(ESPDL)
    next(n for n in g.nodes if n.name == "conv1").attrs["pads"] = [2**40, 0]
    with pytest.raises(UserError):
        espdl_paths(espdl.write(g))


@pytest.mark.slow
@FUZZ_LONG
@given(mutated(ESPDL))
def test_fuzz_espdl_long(data):
    run_guarded(espdl_paths, data)


@pytest.mark.slow
@FUZZ_LONG
@given(st.one_of(mutated(ONNX), mutated(QDQ), edited(ONNX), edited(QDQ)))
def test_fuzz_onnx_long(data):
    run_guarded(onnx_paths, data)


ATHERIS_HARNESS = r'''
import sys, atheris
with atheris.instrument_imports():
    from espstream.errors import UserError
    from espstream.inspect import inspect_bytes
def one(data):
    try:
        inspect_bytes(data, "fuzz.espdl" if data[:4] == b"EDL2" else "fuzz.onnx")
    except UserError:
        pass
atheris.Setup(sys.argv, one)
atheris.Fuzz()
'''


@pytest.mark.slow
def test_atheris_inspect(tmp_path):
    """Coverage-guided fuzzing of `inspect` from the two seeds (atheris is not a dependency)."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (pip install atheris); hypothesis fuzzing above "
                    "covers the same paths")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "espdl").write_bytes(ESPDL)
    (corpus / "onnx").write_bytes(ONNX)
    harness = tmp_path / "harness.py"
    harness.write_text(ATHERIS_HARNESS)
    proc = subprocess.run(
        [sys.executable, str(harness), str(corpus), "-runs=20000", "-max_len=8192",
         "-rss_limit_mb=1024", "-timeout=10"],
        capture_output=True, timeout=900, env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]

"""The `espstream` command line: one thin command per stage; option parsing and IO only.

Every stage reads INPUT (default '-', stdin) and writes -o OUTPUT (default '-', stdout), so
stages pipe into each other. User errors print one line `espstream: error: ...` and exit 2;
failed numerical checks exit 1.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from espstream import __version__, log
from espstream.errors import EspstreamError, UserError
from espstream.limits import MAX_CHUNK, MAX_RANDOM, MAX_SEED, check_count
from espstream.stdio import real_stdout, stdout_reserved_for_output

#: ESP-DL 3.3's target names and 'c' (espstream.targets maps each onto one of three arithmetics)
TARGET_NAMES = ["esp32p4", "esp32s31", "esp32s3", "esp32", "esp32s2", "esp32c2", "esp32c3",
                "esp32c5", "esp32c6", "c"]
#: Counts from the command line, bounded (espstream.limits rule 3)
CHUNK, RANDOM, SEED = (click.IntRange(1, MAX_CHUNK), click.IntRange(1, MAX_RANDOM),
                       click.IntRange(0, MAX_SEED))
MAX_STAGES = 1024  # parts of a staged deployment (each one file)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def example(text: str) -> str:
    """Help epilog with an example, kept verbatim by click."""
    return "\b\nExample:\n" + "\n".join("  " + line for line in text.strip().splitlines())


def stage(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every stage shares: -o, --json, -q, --debug."""

    @click.option(
        "-o", "--output", default="-", show_default=True, help="Output file, '-' for stdout."
    )
    @click.option("--json", "json_path", metavar="PATH", help="Also write a JSON report to PATH.")
    @click.option("-q", "--quiet", is_flag=True, help="Silence stderr except errors.")
    @click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
    @functools.wraps(f)
    def wrapper(*args: Any, quiet: bool, debug: bool, **kwargs: Any) -> Any:
        log.set_quiet(quiet)
        reads = [v for k in READ_OPTIONS for v in _paths(kwargs.get(k))]
        # (export --format cpp writes into a folder and checks it itself)
        out = None if kwargs.get("fmt") == "cpp" else kwargs.get("output")
        check_report_path(kwargs.get("json_path"), *reads, output=out)
        with stdout_reserved_for_output():
            return f(*args, **kwargs)

    return wrapper


#: calibrate / convert: the techniques of espstream.quant.ptq (dest, flag, help); unset means
#: calibrate's default
PTQ_FLAGS = (
    ("equalize", "equalize", "Cross-layer equalization of consecutive Conv/Gemm layers."),
    ("bias_correction", "bias-correction", "Correct biases for the mean shift of quantized "
     "weights."),
    ("adaround", "adaround", "Round weights up or down to reconstruct each layer's output."),
    ("exponent_search", "exponent-search", "Try each activation exponent +-1 against the "
     "output error."),
)


def ptq_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The PTQ_FLAGS as --X/--no-X, passed to the command as one dict `ptq` of those given."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {k: kwargs.pop(k) for k, _, _ in PTQ_FLAGS}
        return f(*args, ptq={k: v for k, v in given.items() if v is not None}, **kwargs)

    for dest, flag, text in reversed(PTQ_FLAGS):
        dflt = ("on for int8, off for int16" if dest in ("equalize", "bias_correction")
                else "off")
        wrapper = click.option(f"--{flag}/--no-{flag}", dest, default=None,
                               help=f"{text} [default: {dflt}]")(wrapper)
    return wrapper


#: The options through which a stage reads files: no output may name one of them.
READ_OPTIONS = ("input", "inputs", "offline", "streaming", "data", "test_data", "overrides",
                "encrypt_key", "key", "models")


def echo_stdout(text: str) -> None:
    """Text a command gives on stdout (a JSON report, a table): an error when stdout is closed
    or its reader goes away before taking it all (espstream.outputs rule 5), never silence."""
    from espstream import outputs

    out = real_stdout()
    if out is None or getattr(out, "closed", False):
        raise UserError("stdout is closed; give --json FILE or open stdout")
    try:
        out.write(text)
        out.flush()
        outputs.wait_delivered(out.fileno(), "stdout")
    except BrokenPipeError:
        raise UserError("stdout: the reader closed the pipe before the output was "
                        "written") from None


def check_report_path(path: str | None, *reads: str | None, output: str | None = None) -> None:
    """Before any work: the outputs (-o, --json) are writable, name no input and not each
    other (espstream.outputs)."""
    from espstream import outputs

    outputs.check_outputs([output, None if path == "-" else path], list(reads))


def _paths(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple | list):
        return [v for v in value if isinstance(v, str)]
    return []


def parse_input_shapes(specs: tuple[str, ...]) -> dict[str, list[int]]:
    """`NAME:D0,D1,...` -> {NAME: [D0, D1, ...]}."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",")]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise UserError(
                f"--input-shape {spec!r}: expected NAME:D0,D1,... with positive integers, "
                "e.g. x:1,16,24"
            )
        shapes[name] = values
    return shapes


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="espstream")
def cli() -> None:
    """Streaming int8 conversion of temporal ONNX models for ESP-DL.

    \b
    espstream optimize m.onnx | espstream calibrate - -d calib.npy \\
      | espstream streamify - --chunk 3 | espstream export - -o m.espdl
    """


@cli.command(
    context_settings=CONTEXT,
    epilog=example(
        "espstream optimize model.onnx -o model.opt.onnx\n"
        "espstream optimize model.onnx --input-shape x:1,16,24 --skip fold_scale > opt.onnx"
    ),
)
@click.argument("input", default="-")
@stage
@click.option(
    "--input-shape",
    multiple=True,
    metavar="NAME:D0,D1,...",
    help="Fix an input's shape (repeatable).",
)
@click.option(
    "--skip", multiple=True, metavar="PASS", help="Skip a pass (repeatable); see --list-passes."
)
@click.option("--list-passes", is_flag=True, help="List the passes and exit.")
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime equivalence check.")
@click.option("--check-tolerance", type=float, default=1.0, show_default=True, metavar="F",
              help="Multiply the check's tolerances by F (its failure says which F would pass).")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V",
              help="The check feeds input NAME the value V (integer inputs are zeros otherwise).")
@click.option("--upgrade-opset", is_flag=True,
              help="Convert a model older than opset 11 to opset 13 with onnx.version_converter "
              "(said on stderr) instead of refusing it.")
def optimize(
    input: str,
    output: str,
    json_path: str | None,
    input_shape: tuple[str, ...],
    skip: tuple[str, ...],
    list_passes: bool,
    no_check: bool,
    check_tolerance: float,
    input_values: tuple[str, ...],
    upgrade_opset: bool,
) -> None:
    """Fold constants, BatchNorm and padding; clean the graph; check it is unchanged."""
    from espstream import modelio, report
    from espstream.optimize import PASSES, optimize_model, print_summary
    from espstream.quant.data import parse_input_values

    if list_passes:
        echo_stdout("".join(f"{p.name:<22} {p.summary}\n" for p in PASSES))
        return
    modelio.check_output_path(output, input)
    model = modelio.load_model(input, upgrade_opset=upgrade_opset)
    result = optimize_model(
        model, input_shapes=parse_input_shapes(input_shape), skip=list(skip), check=not no_check,
        check_tolerance=check_tolerance, input_values=parse_input_values(input_values),
    )
    print_summary(result)
    report.write_json(json_path, result.to_json())
    result.raise_if_check_failed()  # before writing: a model that failed its check is not kept
    modelio.save_model(result.model, output)


def mixed_options(f):
    """--int16 / --mixed auto with its budget (espstream.quant.mixed), on calibrate and convert."""
    f = click.option("--target-sqnr", type=float, metavar="DB",
                     help="With --mixed auto: the fewest int16 layers reaching DB output SQNR.")(f)
    f = click.option("--max-int16-macs", type=float, metavar="PCT",
                     help="With --mixed auto: at most PCT %% of MACs in int16.")(f)
    f = click.option("--mixed", type=str, metavar="auto",
                     help="Choose int16 layers by per-layer sensitivity within a budget.")(f)
    return click.option("--int16", type=str, metavar="NODE[,NODE...]",
                        help="These nodes' layers in int16, the rest int8.")(f)


@cli.command(
    context_settings=CONTEXT,
    epilog=example(
        "espstream calibrate model.opt.onnx -d calib.npy -o model.qdq.onnx --json q.json\n"
        "espstream calibrate model.opt.onnx --random 64 --target esp32s3 --bits 16 > q.onnx"
    ),
)
@click.argument("input", default="-")
@stage
@click.option("-d", "--data", metavar="PATH", help="Calibration data: .npy, .npz or a folder.")
@click.option("--random", "random_n", type=RANDOM, metavar="N",
              help="Use N standard-normal samples.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for --random.")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V",
              help="Input NAME holds V in every sample, not read from -d (with --random, "
              "integer / boolean inputs need one).")
@click.option("--target", type=click.Choice(TARGET_NAMES), default="esp32p4",
              show_default=True)
@click.option("--bits", type=click.Choice(["8", "16"]), default="8", show_default=True)
@click.option("--method", type=click.Choice(["minmax", "percentile", "kl", "mse"]), default=None,
              help="Activation exponent choice [default: mse].")
@click.option("--percentile", type=float, default=99.99, show_default=True,
              help="Percentile of |x| for --method percentile.")
@click.option("--per-channel/--per-tensor", "per_channel", default=None,
              help="Weight exponents [default: per channel on esp32p4, per tensor otherwise].")
@click.option("--weight-method", type=click.Choice(["mse", "minmax"]), default="mse",
              show_default=True,
              help="Weight exponent choice: least squared error, or covering max |w|.")
@click.option("--samples", type=int, metavar="N", help="Use only the first N samples.")
@mixed_options
@click.option("--batch", type=int, default=64, show_default=True, help="Samples per run.")
@click.option("--report-samples", type=int, default=32, show_default=True,
              help="Samples for the per-layer SQNR report (0: no report).")
@click.option("--state", "states", multiple=True, metavar="IN:OUT",
              help="A hand-written streaming model's state input and the output fed back into "
              "it (repeatable); the data are then whole sequences, run chunk by chunk.")
@click.option("--chunk", type=CHUNK, metavar="N",
              help="With --state: frames per call, where the input's time axis is symbolic.")
@click.option("--axis", multiple=True, metavar="NAME:AXIS",
              help="With --state: time axis of an input or output (else found from the model "
              "and the data).")
@ptq_options
def calibrate(
    input: str,
    output: str,
    json_path: str | None,
    data: str | None,
    random_n: int | None,
    seed: int,
    input_values: tuple[str, ...],
    target: str,
    bits: str,
    method: str | None,
    percentile: float,
    per_channel: bool | None,
    weight_method: str,
    samples: int | None,
    batch: int,
    report_samples: int,
    states: tuple[str, ...],
    chunk: int | None,
    axis: tuple[str, ...],
    ptq: dict[str, bool],
    int16: str | None,
    mixed: str | None,
    max_int16_macs: float | None,
    target_sqnr: float | None,
) -> None:
    """Choose power-of-two exponents on calibration data; write the QDQ model.

    A streaming model (streamify's output, or a hand-written one described by --state) is
    calibrated on whole sequences cut into chunks, with its states fed back.
    """
    from espstream import modelio, report
    from espstream.quant import (
        DEFAULT_METHOD,
        calibrate_model,
        model_inputs,
        print_summary,
        random_data,
        read_calibration_data,
    )
    from espstream.quant.data import parse_input_values, warn_random
    from espstream.quant.plan import check_float_model

    if (data is None) == (random_n is None):
        raise UserError("give calibration data with -d/--data PATH, or --random N (not both)")
    if not 0.0 < percentile <= 100.0:  # (nan too) before any work or warning
        raise UserError(f"--percentile {percentile}: give a value in (0, 100]")
    if batch < 1:
        raise UserError(f"--batch {batch}: give a positive number")
    values = parse_input_values(input_values)
    from espstream.quant.mixed import calibrate_kwargs

    mixed_kw = calibrate_kwargs(int16, mixed, max_int16_macs, target_sqnr)
    modelio.check_output_path(output, input)
    if data:
        modelio.check_output_path(output, data)
    model = modelio.load_model(input)
    check_float_model(model)
    from espstream.quant import stream_calib
    from espstream.stream.streamify import parse_axes

    stream = stream_calib.stream_spec(model, states, chunk, parse_axes(axis), data)
    inputs = model_inputs(model) if stream is None else stream_calib.sequence_inputs(model, stream)
    n_random = random_n if samples is None or random_n is None else min(random_n, samples)
    if data:
        calib = read_calibration_data(data, inputs, limit=samples, values=values)
    elif stream is not None:
        calib = stream_calib.random_sequences(model, stream, n_random, seed)
    else:
        calib = random_data(inputs, n_random, seed, values)
    result = calibrate_model(
        model, calib, target=target, bits=int(bits), method=method or DEFAULT_METHOD,
        percentile=percentile, per_channel=per_channel, weight_method=weight_method, batch=batch,
        report_samples=max(report_samples, 0), stream=stream, **ptq, **mixed_kw,
    )
    if not data:  # once it worked: an error before is its one line alone
        warn_random()
    print_summary(result)
    modelio.save_model(result.model, output)
    report.write_json(json_path, result.to_json())


@cli.command(
    context_settings=CONTEXT,
    epilog=example("espstream inspect model.espdl\nespstream inspect qdq.onnx --json info.json"),
)
@click.argument("file", default="-")
@click.option("--json", "json_path", metavar="PATH", help="Write the same as JSON ('-': stdout).")
@click.option("--target", type=click.Choice(TARGET_NAMES), default=None,
              help=".espdl: the chip, where the file does not record it [default: recorded, or "
              "told by the filter layout].")
@click.option("--model", "member", metavar="NAME", help="A packed file's model (by name).")
@click.option("--key", metavar="KEYFILE", help="The AES-128 key of an encrypted model.")
@click.option("-q", "--quiet", is_flag=True, help="Silence stderr except errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def inspect(file: str, json_path: str | None, target: str | None, member: str | None,
            key: str | None, quiet: bool, debug: bool) -> None:
    """Show what an .onnx or .espdl file holds: operators, exponents, caches, test values."""
    import json as jsonlib

    from espstream import inspect as inspection
    from espstream import modelio, report
    from espstream.espdl.crypt import read_key

    log.set_quiet(quiet)
    check_report_path(json_path, file, key)
    label = "<stdin>" if file == "-" else file
    k = read_key(key) if key else None
    info = inspection.inspect_bytes(modelio.read_bytes(file), label, target, member, k)
    inspection.print_summary(info)
    if json_path == "-":
        echo_stdout(jsonlib.dumps(info, indent=2, default=report._jsonable) + "\n")
    else:
        report.write_json(json_path, info)


@cli.command(
    "ops", context_settings=CONTEXT,
    epilog=example("espstream ops\nespstream ops --json - | jq '.operators[].onnx'"),
)
@click.option("--json", "json_path", metavar="PATH", help="Write the table as JSON ('-': stdout).")
def ops_command(json_path: str | None) -> None:
    """List every operator espstream knows: ONNX -> ESP-DL, int8 / int16, streaming rule, and
    what pins the simulator's arithmetic."""
    import json as jsonlib

    from espstream import report
    from espstream.ops import registry

    check_report_path(json_path)
    table = {"operators": registry.table(), "simulated": registry.sim_table()}
    if json_path == "-":
        echo_stdout(jsonlib.dumps(table, indent=2) + "\n")
        return
    echo_stdout(registry.format_table() + "\n")
    report.write_json(json_path, table)


@cli.command(
    context_settings=CONTEXT,
    epilog=example(
        "espstream streamify model.qdq.onnx --chunk 3 -o model.stream.onnx --json s.json\n"
        "espstream streamify kws.onnx --chunk 1 --axis x:2 --overrides over.json > s.onnx\n"
        "over.json: {\"tensors\": {\"/feat\": {\"window\": 16}, \"/aux\": {\"delay\": 2},\n"
        "                        \"/blk/out\": {\"axis\": 1}}}"
    ),
)
@click.argument("input", default="-")
@stage
@click.option("--chunk", type=CHUNK, required=True, metavar="N", help="Input frames per call.")
@click.option("--axis", multiple=True, metavar="INPUT:AXIS",
              help="Time axis of an input, where it is not found automatically (repeatable).")
@click.option("--overrides", metavar="FILE.json",
              help="Per tensor a window, axis or delay, for ops no rule covers.")
@click.option("--stages", type=int, default=1, show_default=True, metavar="K",
              help="Split into K streaming models run one step apart, MACs balanced; -o "
              "m.onnx writes m_0.onnx ... m_{K-1}.onnx.")
def streamify(
    input: str, output: str, json_path: str | None, chunk: int, axis: tuple[str, ...],
    overrides: str | None, stages: int,
) -> None:
    """Make a streaming model: one chunk per call, the past kept as state (StreamingCache)."""
    from espstream import modelio, report
    from espstream.stream import overrides as ovr
    from espstream.stream.streamify import parse_axes, print_summary, streamify_model

    if not 1 <= stages <= MAX_STAGES:
        raise UserError(f"--stages {stages}: give a number of parts between 1 and {MAX_STAGES}")
    modelio.check_output_path(output, input)
    model = modelio.load_model(input)
    ov = ovr.load(overrides) if overrides else None
    if stages != 1:  # staged deployment (espstream/stream/stages.py)
        from espstream.stream.stages import part_paths, print_split, streamify_stages

        paths = part_paths(output, stages)
        for p in paths:
            modelio.check_output_path(p, input)
            check_report_path(json_path, input, output=p)
        result, split = streamify_stages(model, chunk, stages, axes=parse_axes(axis),
                                         overrides=ov)
        print_summary(result)
        print_split(split)
        for part, p in zip(split.parts, paths, strict=True):
            modelio.save_model(part.model, p)
        split.files = paths
        report.write_json(json_path, {**result.to_json(), "staged": split.to_json()})
        return
    result = streamify_model(model, chunk, axes=parse_axes(axis), overrides=ov)
    print_summary(result)
    modelio.save_model(result.model, output)
    report.write_json(json_path, result.to_json())


@cli.command(
    context_settings=CONTEXT,
    epilog=example(
        "espstream verify model.onnx model.stream.onnx --random 8\n"
        "espstream verify model.qdq.onnx model.stream.onnx -d x.npy --engine fakequant\n"
        "espstream verify model.onnx --chunks 1,2,4 --json v.json   # streamifies each"
    ),
)
@click.argument("offline")
@click.argument("streaming", nargs=-1)
@click.option("-d", "--data", metavar="PATH", help="Input sequences: .npy [N, ...] or .npz.")
@click.option("--random", "random_n", type=RANDOM, metavar="N", help="N random sequences [4].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for --random.")
@click.option("--frames", type=int, metavar="T", help="Sequence length for a dynamic time axis.")
@click.option("--engine", metavar="NAME",
              help="float | fakequant | int8 [default: by the model; .espdl: int8].")
@click.option("--chunks", metavar="N,N,...",
              help="Streamify OFFLINE at each chunk size and check each (no STREAMING then).")
@click.option("--axis", multiple=True, metavar="INPUT:AXIS", help="With --chunks: as streamify.")
@click.option("--overrides", metavar="FILE.json", help="As streamify (also used for analysis).")
@click.option("--target", type=click.Choice(TARGET_NAMES), default=None,
              help=".espdl: the chip to simulate, where the files do not record it [default: "
              "recorded, or told by the filter layout].")
@click.option("--model", "members", metavar="NAME", multiple=True,
              help=".espdl: a packed file's model; twice for OFFLINE and STREAMING.")
@click.option("--key", metavar="KEYFILE", help=".espdl: the AES-128 key of encrypted models.")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V",
              help="With -d: input NAME is V in every sample (a zero state: h=0); repeatable.")
@click.option("--json", "json_path", metavar="PATH", help="Write a JSON report to PATH.")
@click.option("-q", "--quiet", is_flag=True, help="Silence stderr except errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def verify(
    offline: str, streaming: tuple[str, ...], data: str | None, random_n: int | None, seed: int,
    frames: int | None, engine: str | None, chunks: str | None, axis: tuple[str, ...],
    overrides: str | None, target: str | None, members: tuple[str, ...], key: str | None,
    input_values: tuple[str, ...], json_path: str | None, quiet: bool, debug: bool,
) -> None:
    """Check that STREAMING, run chunk by chunk, equals OFFLINE over whole sequences.

    Several STREAMING files are the parts of a staged deployment (streamify --stages), in
    order: they run as a pipeline, one step apart.
    """
    from espstream import modelio, report
    from espstream import verify as v
    from espstream.errors import CheckFailed
    from espstream.stream import overrides as ovr
    from espstream.stream.streamify import parse_axes

    log.set_quiet(quiet)
    check_report_path(json_path, offline, *streaming, data, overrides, key)
    parts = list(streaming)  # more than one: a staged deployment's parts, in order
    one = parts[0] if parts else None
    if data is not None and random_n is not None:
        raise UserError("give --data PATH or --random N, not both")
    from espstream.quant.data import parse_input_values

    values = parse_input_values(input_values)
    if values and data is None:
        raise UserError("--input-value goes with -d/--data (with --random every input is drawn)")
    from espstream import verify_int8

    verify_int8.register()  # --engine int8: lower + the integer simulator
    if verify_int8.is_espdl(offline):
        if len(parts) > 1:
            raise UserError("staged parts are checked as ONNX files: give OFFLINE.onnx "
                            "PART_0.onnx PART_1.onnx ... (--engine int8 runs the integer "
                            "arithmetic of the .espdl files)")
        if chunks is not None:
            raise UserError("--chunks streamifies ONNX models; give OFFLINE.espdl STREAMING.espdl")
        if len(members) > (2 if one else 1):
            raise UserError("--model: give one name per .espdl file (OFFLINE, then STREAMING)")
        if values:
            raise UserError("--input-value is for ONNX models; for .espdl files give an .npz "
                            "with one array per input")
        verify_int8.verify_espdl_command(offline, one, v.load_data(data) if data else None,
                                         random_n, seed, engine, json_path, target=target,
                                         model=list(members), key=key)  # fmt: skip
        return
    if target or members or key:
        raise UserError("--target, --model and --key are for .espdl files (an ONNX model "
                        "records its target from calibrate)")
    if (chunks is None) == (one is None):
        raise UserError(
            "give either STREAMING.onnx (check that model) or --chunks N,N,... (streamify "
            "OFFLINE at each chunk size and check each), not both"
        )
    off = modelio.load_model(offline)
    kw = dict(
        data=v.with_input_values(off, v.load_data(data), values) if data else None,
        random=random_n, frames=frames, engine=engine, seed=seed,
        overrides=ovr.load(overrides) if overrides else None,
    )
    if chunks is not None:
        sizes = v.parse_chunks(chunks)
        for c in sizes:
            check_count(c, "--chunks", 1, MAX_CHUNK)
        results = v.verify_chunks(off, sizes, axes=parse_axes(axis), **kw)
    elif len(parts) > 1:
        from espstream.stream.stages import verify_stages

        results = [verify_stages(off, [modelio.load_model(p) for p in parts], labels=parts,
                                 **kw)]
    else:
        results = [v.verify_models(off, modelio.load_model(one), **kw)]
    for r in results:
        v.print_result(r)
    extra = {}
    if engine == "int8":  # issue 5 point 4: how close the fake-quant model is to the chip
        agree = verify_int8.int8_vs_fakequant(
            off, verify_int8.onnx_samples(off, kw["data"], random_n, frames, seed))
        verify_int8.print_agreement(agree)
        extra["int8_vs_fakequant"] = agree.to_json()
    report.write_json(json_path, {"ok": all(r.ok for r in results), **extra,
                                  "runs": [r.to_json() for r in results]})
    failed = [r for r in results if not r.ok]
    if failed:
        raise CheckFailed("; ".join(r.failure() for r in failed))


@cli.command(
    context_settings=CONTEXT,
    epilog=example(
        "espstream export model.qdq.onnx -o model.espdl --test-random\n"
        "espstream export model.stream.onnx -o model.espdl --test-data x.npy --json e.json\n"
        "espstream export model.qdq.onnx --format cpp --name kws -o src/"
    ),
)
@click.argument("input", default="-")
@stage
@click.option("--target", type=click.Choice(TARGET_NAMES), default=None,
              help="Must match the target the model was calibrated for [default: that one].")
@click.option("--test-data", metavar="PATH", help="Embed test values: .npy (or .npz by input).")
@click.option("--test-random", is_flag=True, help="Embed test values from a random input.")
@click.option("--format", "fmt", type=click.Choice(["espdl", "cpp"]), default="espdl",
              show_default=True, help="cpp: NAME_coefficient.cpp/.hpp into -o FOLDER.")
@click.option("--name", metavar="NAME", help="Model name (graph name; C++ namespace and files).")
@click.option("--encrypt-key", metavar="KEYFILE",
              help="Encrypt the .espdl with this AES-128 key (ESP-DL's mode 1): 16 raw bytes, "
              "32 hex digits or ESP-PPQ's 0x.., list.")
def export(
    input: str,
    output: str,
    json_path: str | None,
    target: str | None,
    test_data: str | None,
    test_random: bool,
    fmt: str,
    name: str | None,
    encrypt_key: str | None,
) -> None:
    """Lower a QDQ model (streaming or not) to an ESP-DL .espdl file or C++ coefficients."""
    from pathlib import Path

    from espstream import modelio, report
    from espstream.export import (
        check_cpp_folder,
        export_model,
        print_summary,
        read_test_data,
        write_files,
    )

    if test_data and test_random:
        raise UserError("give --test-data or --test-random, not both")
    if fmt == "espdl":
        modelio.check_output_path(output, input)
    else:
        check_cpp_folder(output)
    if test_data:
        modelio.check_output_path(output, test_data)
    key = None
    if encrypt_key:
        from espstream.espdl.crypt import read_key

        if fmt != "espdl":
            raise UserError("--encrypt-key encrypts .espdl files; --format cpp writes C++")
        modelio.check_output_path(output, encrypt_key)
        key = read_key(encrypt_key)
    model = modelio.load_model(input)
    data = read_test_data(test_data) if test_data else None
    if fmt == "cpp" and not name:
        name = Path(input).stem.split(".")[0] if input != "-" else None
    if fmt == "cpp":  # the two files it will write, named after the model, checked before work
        from espstream.export import c_identifier

        cname = c_identifier(name or model.graph.name or "model")
        for ext in ("hpp", "cpp"):
            modelio.check_output_path(str(Path(output) / f"{cname}_coefficient.{ext}"), input)
    result = export_model(model, target=target, test_data=data, test_random=test_random,
                          fmt=fmt, name=name, encrypt_key=key)
    if key is not None:
        log.info("encrypted with AES-128-CTR (ESP-DL mode 1); load it with the same key")
    print_summary(result, output)
    write_files(result, output, fmt)
    report.write_json(json_path, {**result.to_json(), "encrypted": key is not None})


@cli.command(
    context_settings=CONTEXT,
    epilog=example(
        "espstream pack model.espdl streaming_model.espdl -o models.espdl\n"
        "espstream pack a.espdl b.espdl -o m.espdl --name off --name st --format pdl2"
    ),
)
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="The packed file.")
@click.option("--format", "fmt", type=click.Choice(["pdl3", "pdl2", "pdl1"]), default="pdl3",
              show_default=True, help="pdl3: with version, size and SHA-256; pdl1: EDL1 files.")
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="Member names, one per input in the order given [default: file names].")
@click.option("--package-version", default="v1.0", show_default=True,
              help="PDL3 package version (ASCII, at most 15 characters).")
@click.option("--json", "json_path", metavar="PATH", help="Also write a JSON report to PATH.")
@click.option("-q", "--quiet", is_flag=True, help="Silence stderr except errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def pack(inputs: tuple[str, ...], output: str, fmt: str, names: tuple[str, ...],
         package_version: str, json_path: str | None, quiet: bool, debug: bool) -> None:
    """Pack .espdl models into one file, byte for byte as ESP-DL's pack_espdl_models.py.

    Members are ordered by their paths (sorted, as the script does) and loaded on the chip by
    name: dl::Model(data, "model.espdl", ...). Encrypted members are packed as they are.
    """
    from espstream import modelio, report
    from espstream.espdl import pack as packing

    log.set_quiet(quiet)
    check_report_path(json_path, *inputs, output=output)
    if output == "-" and real_stdout().isatty():
        raise UserError("refusing to write a binary package to the terminal; use -o FILE")
    with stdout_reserved_for_output():
        data, members = packing.pack_files(list(inputs), list(names) or None, fmt,
                                           package_version)
        pkg = packing.unpack(data)  # what a reader will see (and a check of our own bytes)
        log.info(f"packed {len(members)} model(s) as {fmt.upper()}: {', '.join(members)}; "
                 f"{len(data)} bytes" + (f", SHA-256 {pkg.sha256}" if pkg.sha256 else ""))
        modelio.write_bytes(data, output)
    report.write_json(json_path, {**pkg.to_json(), "file": output})


@cli.command(
    context_settings=CONTEXT,
    epilog=example(
        "espstream convert m.onnx -o m.espdl -d calib.npy --chunk 3 --json convert.json\n"
        "espstream convert m.onnx -o m.espdl --random 64 --target esp32s3 --bits 16"
    ),
)
@click.argument("input", default="-")
@stage
@click.option("-d", "--data", metavar="PATH", help="Calibration data: .npy, .npz or a folder.")
@click.option("--random", "random_n", type=RANDOM, metavar="N",
              help="Use N standard-normal samples.")
@click.option("--chunk", type=CHUNK, metavar="N", help="Stream N input frames per call.")
@click.option("--target", type=click.Choice(TARGET_NAMES), default="esp32p4",
              show_default=True)
@click.option("--bits", type=click.Choice(["8", "16"]), default="8", show_default=True)
@click.option("--method", type=click.Choice(["minmax", "percentile", "kl", "mse"]), default=None,
              help="Activation exponent choice [default: mse].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for --random.")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V",
              help="Input NAME holds V in every sample, not read from -d (with --random, "
              "integer / boolean inputs need one).")
@click.option("--input-shape", multiple=True, metavar="NAME:D0,D1,...", help="As optimize.")
@click.option("--check-tolerance", type=float, default=1.0, show_default=True, metavar="F",
              help="As optimize: multiply the optimize check's tolerances by F.")
@click.option("--axis", multiple=True, metavar="INPUT:AXIS", help="As streamify.")
@click.option("--overrides", metavar="FILE.json", help="As streamify.")
@click.option("--test-data", metavar="PATH",
              help="Test values from this .npy/.npz [default: the data's first sample].")
@click.option("--no-test-values", is_flag=True, help="Embed no test values.")
@click.option("--verify-samples", type=int, default=4, show_default=True, metavar="N",
              help="Samples of the data the checks run on.")
@click.option("-v", "--verbose", is_flag=True, help="Also print every stage's own report.")
@click.option("--offline-too", is_flag=True,
              help="With --chunk: also write the offline model (test values: the whole first "
              "sample) to OUTPUT.offline.espdl, for ESP-DL's streaming tutorial loop.")
@ptq_options
@mixed_options
def convert(
    input: str, output: str, json_path: str | None, data: str | None, random_n: int | None,
    chunk: int | None, target: str, bits: str, method: str | None, seed: int,
    input_values: tuple[str, ...], input_shape: tuple[str, ...], check_tolerance: float,
    axis: tuple[str, ...], overrides: str | None,
    test_data: str | None, no_test_values: bool, verify_samples: int, verbose: bool,
    offline_too: bool, ptq: dict[str, bool], int16: str | None, mixed: str | None,
    max_int16_macs: float | None, target_sqnr: float | None,
) -> None:
    """Optimize, calibrate, streamify, export and verify in one step; the .espdl only if ok."""
    from espstream import modelio, report
    from espstream.convert import FIRST_SAMPLE, convert_model, offline_path, print_summary
    from espstream.errors import CheckFailed
    from espstream.export import read_test_data
    from espstream.quant.data import parse_input_values
    from espstream.stream import overrides as ovr
    from espstream.stream.streamify import parse_axes

    if (data is None) == (random_n is None):
        raise UserError("give calibration data with -d/--data PATH, or --random N (not both)")
    values = parse_input_values(input_values)
    if test_data and no_test_values:
        raise UserError("give --test-data or --no-test-values, not both")
    from espstream.quant.mixed import calibrate_kwargs

    mixed_kw = calibrate_kwargs(int16, mixed, max_int16_macs, target_sqnr)
    modelio.check_output_path(output, input, *(p for p in (data, test_data, overrides) if p))
    if offline_too:
        if output == "-":
            raise UserError("--offline-too writes a second file beside -o FILE.espdl; give a "
                            "file, not stdout")
        modelio.check_output_path(offline_path(output), input,
                                  *(p for p in (data, test_data, overrides) if p))
        check_report_path(json_path, input, output=offline_path(output))
    if output == "-" and real_stdout().isatty():
        raise UserError("refusing to write a binary model to the terminal; use -o FILE.espdl")
    model = modelio.load_model(input)
    tdata = None if no_test_values else (read_test_data(test_data) if test_data else FIRST_SAMPLE)
    result = convert_model(
        model, data, random=random_n, chunk=chunk, target=target, bits=int(bits), method=method,
        seed=seed, random_values=values, input_shapes=parse_input_shapes(input_shape),
        check_tolerance=check_tolerance, axes=parse_axes(axis),
        overrides=ovr.load(overrides) if overrides else None, test_data=tdata,
        verify_samples=verify_samples, verbose=verbose, offline_too=offline_too, ptq=ptq,
        calibrate_options=mixed_kw,
    )
    print_summary(result, output if output != "-" else "stdout")
    report.write_json(json_path, {**result.to_json(), "written": result.ok, "file": output})
    if not result.ok:
        raise CheckFailed(f"{result.failure()}; {output} was not written")
    modelio.write_bytes(result.data, output)
    if result.offline is not None:
        modelio.write_bytes(result.offline.data, offline_path(output))


@cli.command(
    "app", context_settings=CONTEXT,
    epilog=example(
        "espstream app m.offline.espdl m.espdl -o kws_app --target esp32s3\n"
        "cd kws_app && idf.py set-target esp32s3 && idf.py build flash monitor"
    ),
)
@click.argument("models", nargs=-1, required=True)
@click.option("-o", "--output", required=True, metavar="DIR", help="The project folder (new).")
@click.option("--target", type=click.Choice(TARGET_NAMES), required=True,
              help="The chip (ESP-IDF's target name).")
@click.option("--name", default="espstream_app", show_default=True, help="Project name.")
@click.option("--key", metavar="KEYFILE", help="The AES-128 key of encrypted models "
              "(written into app_main.cpp).")
@click.option("--state", "states", multiple=True, metavar="IN:OUT",
              help="A recurrent state input and the output copied back into it (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="Silence stderr except errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def app_command(models: tuple[str, ...], output: str, target: str, name: str,
                key: str | None, states: tuple[str, ...], quiet: bool, debug: bool) -> None:
    """Write a minimal ESP-IDF project that packs, loads, checks and profiles the models.

    Not built here: espstream has no ESP-IDF; build it with idf.py (see its README.md).
    """
    from espstream.app import make_app, write_app
    from espstream.espdl.crypt import read_key

    log.set_quiet(quiet)
    pairs = []
    for s in states:
        a, sep, b = s.partition(":")
        if not sep or not a or not b:
            raise UserError(f"--state {s!r}: expected IN:OUT")
        pairs.append((a, b))
    files = make_app(list(models), target, name, read_key(key) if key else None, pairs)
    written = write_app(files, output)
    log.info(f"wrote {len(written)} files into {output}: ESP-IDF project for {target} "
             "(not built here; see its README.md)")


def _quiet_libraries(debug: bool) -> None:
    """onnx-graphsurgeon and onnxruntime log chatty warnings; keep them for --debug. They are
    quieted when first imported, not imported here: `--version`, `--help` and commands that never
    touch them start without paying for them."""
    if debug:
        return
    from espstream.lazy_quiet import quiet_on_import

    quiet_on_import()
    import warnings

    warnings.simplefilter("ignore")  # a NumPy RuntimeWarning is not a second line


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127) if c != 9}
_CONTROL.update({10: "\\n", 13: "\\r"})


def _say(text: str) -> None:
    """One stderr line: newlines and other control characters (a terminal's escape codes) from
    file or tensor names are shown escaped."""
    text = text.strip().translate(_CONTROL)
    try:
        print(f"espstream: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class Terminated(BaseException):
    """SIGTERM or SIGINT, raised so that cleanup runs; not a KeyboardInterrupt, which click
    would answer with a blank line before our one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_signalled: list[int] = []  # the signals received: an import they cut short is not a crash


def _importing(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame: Any) -> None:
    outputs = sys.modules.get("espstream.outputs")
    if outputs is not None and outputs.defer_signal(signum):
        return  # raised again once the temporary file is registered / renamed
    if _importing(frame):
        # Never inside an import: an extension module cut short half initialised crashes the
        # interpreter (SIGSEGV seen on SIGTERM during `import onnx`). Asked again shortly.
        import os
        import threading

        t = threading.Timer(0.02, os.kill, (os.getpid(), signum))
        t.daemon = True
        t.start()
        return
    _signalled.append(signum)
    raise Terminated(signum)


def _interrupted(signum: int) -> None:
    for s in (signal.SIGTERM, signal.SIGINT):  # a second signal: the same single line
        signal.signal(s, signal.SIG_IGN)
    outputs = sys.modules.get("espstream.outputs")
    if outputs is not None:
        outputs.cleanup()
    _say("error: terminated" if signum == signal.SIGTERM else "error: interrupted")
    sys.exit(143 if signum == signal.SIGTERM else 130)


def _hold_closed_streams() -> None:
    """A standard stream closed at start stays closed to Python (stdin: "stdin is closed";
    stdout: "stdout is closed"), but its descriptor is taken by /dev/null, so that no file
    opened later gets it and receives what a library writes there; with stderr closed the
    messages go nowhere (never to stdout)."""
    import os

    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
            except OSError:
                continue
            if fd == 2:
                sys.stderr = open(os.devnull, "w")  # noqa: SIM115


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    from espstream import outputs

    debug = "--debug" in args
    _signalled.clear()
    _hold_closed_streams()
    saved = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _quiet_libraries(debug)
        _run(args, debug)
    except Terminated as e:  # before or after the command's own handling (an import)
        _interrupted(e.signum)
    finally:
        for s in saved:  # a late signal must not interrupt the last cleanup with a traceback
            signal.signal(s, signal.SIG_IGN)
        outputs.cleanup()  # whatever ended the command, no temporary file stays
        for s, h in saved.items():
            signal.signal(s, h)


def _run(args: list[str], debug: bool) -> None:
    from espstream import outputs
    from espstream.errors import CheckFailed
    from espstream.guard import as_user_error

    try:
        # Every output lands when the command ends, together; a failed check keeps its
        # report (which says "written": false). Errors and signals remove the temporary files.
        with outputs.transaction(commit_on=(CheckFailed,)):
            code = cli.main(args=args, prog_name="espstream", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _interrupted(signal.SIGINT)
    except Terminated as e:
        _interrupted(e.signum)
    except click.ClickException as e:
        _say(f"error: {e.format_message()}")
        sys.exit(2)
    except EspstreamError as e:
        if debug:
            raise
        kind = "check failed" if e.exit_code == 1 else "error"
        _say(f"{kind}: {e}")
        sys.exit(e.exit_code)
    except BrokenPipeError:
        print("espstream: error: the reader closed the pipe before the output was written",
              file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a bug of ours: one line, the traceback behind --debug
        if _signalled:  # a signal cut an import (or a library's C code) short
            _interrupted(_signalled[-1])
        if debug:
            raise
        user = as_user_error(e)  # or a library's exception only an input can cause
        if user is not None:
            _say(f"error: {user}")
            sys.exit(2)
        _say(f"error: internal error ({type(e).__name__}: {e}); rerun with --debug and report it")
        sys.exit(3)
    sys.exit(code if isinstance(code, int) else 0)

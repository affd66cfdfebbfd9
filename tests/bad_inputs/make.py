"""Generate the malformed inputs of `tests/test_bad_inputs.py` and their manifest.

Run from the repository root: `.venv/bin/python tests/bad_inputs/make.py`. Deterministic (fixed
seeds, no timestamps): rerunning it rewrites the same bytes, which the test checks.

Every case of `manifest.json` is one CLI call that must fail cleanly: `args` (the `espstream`
arguments; `{in}` is this folder, `{out}` an empty scratch folder given by the test), the
expected exit status (2), a fragment of the expected one-line message, and `output`, the path
that must not exist afterwards.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
T = 16  # frames of the tiny models


# ---- valid models the bad cases start from ------------------------------------------------


def _model(nodes, inits, shape_in, outputs: dict[str, list[int]], opset: int = 13
           ) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8,
                          producer_name="tests/bad_inputs/make.py")
    onnx.checker.check_model(m, full_check=True)
    return m


def _conv(rng, name, x, y, cin, cout, k=3, d=1, s=1, left=None, right=0):
    w = (rng.standard_normal([cout, cin, k]) / np.sqrt(cin * k)).astype(np.float32)
    b = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    left = (k - 1) * d if left is None else left
    node = helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name,
                            kernel_shape=[k], dilations=[d], strides=[s], pads=[left, right])
    return node, {f"{name}_w": w, f"{name}_b": b}


def tiny_tcn(seed: int = 0) -> onnx.ModelProto:
    """[1, 4, T] -> causal Conv k3 -> Relu -> causal dilated Conv k3 d2 -> [1, 4, T]."""
    rng = np.random.default_rng(seed)
    c1, i1 = _conv(rng, "conv1", "x", "h", 4, 8)
    c2, i2 = _conv(rng, "conv2", "r", "y", 8, 4, d=2)
    return _model([c1, helper.make_node("Relu", ["h"], ["r"], name="relu"), c2],
                  {**i1, **i2}, [1, 4, T], {"y": [1, 4, T]})


def strided_tcn() -> onnx.ModelProto:
    """A stride-2 causal Conv: streams in chunks of an even number of frames only."""
    rng = np.random.default_rng(1)
    c1, i1 = _conv(rng, "conv1", "x", "y", 4, 4, s=2)
    return _model([c1], i1, [1, 4, T], {"y": [1, 4, T // 2]})


def softmax_over_time() -> onnx.ModelProto:
    """Conv then Softmax along the time axis: every output frame needs every input frame."""
    rng = np.random.default_rng(2)
    c1, i1 = _conv(rng, "conv1", "x", "h", 4, 4)
    sm = helper.make_node("Softmax", ["h"], ["y"], name="softmax_t", axis=2)
    return _model([c1, sm], i1, [1, 4, T], {"y": [1, 4, T]})


def future_conv() -> onnx.ModelProto:
    """A centred (non-causal) Conv whose output frame t reads frame t + 1."""
    rng = np.random.default_rng(3)
    c1, i1 = _conv(rng, "conv1", "x", "y", 4, 4, left=1, right=1)
    return _model([c1], i1, [1, 4, T], {"y": [1, 4, T]})


def erf_model() -> onnx.ModelProto:
    """Conv -> Erf: an operator neither calibrate nor ESP-DL has."""
    rng = np.random.default_rng(4)
    c1, i1 = _conv(rng, "conv1", "x", "h", 4, 4)
    return _model([c1, helper.make_node("Erf", ["h"], ["y"], name="erf0")], i1, [1, 4, T],
                  {"y": [1, 4, T]})


def qdq_erf() -> onnx.ModelProto:
    """A hand-made fake-quant model with an Erf between Q/DQ pairs: ESP-DL has no Erf."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q0"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq0"),
        helper.make_node("Erf", ["xd"], ["e"], name="erf0"),
        helper.make_node("QuantizeLinear", ["e", "s", "z"], ["eq"], name="q1"),
        helper.make_node("DequantizeLinear", ["eq", "s", "z"], ["y"], name="dq1"),
    ]
    inits = {"s": np.array(2.0**-5, np.float32), "z": np.array(0, np.int8)}
    m = _model(nodes, inits, [1, 4, T], {"y": [1, 4, T]})
    m.metadata_props.add(key="espstream.target", value="esp32p4")
    m.metadata_props.add(key="espstream.bits", value="8")
    onnx.checker.check_model(m)
    return m


def no_time_axis() -> onnx.ModelProto:
    """[1, 8] -> Gemm -> [1, 3]: nothing along which to stream."""
    w = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm0", transB=1)
    return _model([gemm], {"w": w}, [1, 8], {"y": [1, 3]})


def opset9_model() -> onnx.ModelProto:
    m = tiny_tcn()
    m.opset_import[0].version = 9
    return m


def valid_files() -> dict[str, bytes]:
    from espstream.export import export_model
    from espstream.quant import calibrate_model, model_inputs
    from espstream.quant.data import random_data

    tcn = tiny_tcn()
    qdq = calibrate_model(tcn, random_data(model_inputs(tcn), 8, seed=0),
                          report_samples=0).model
    espdl = export_model(qdq, test_random=True).data
    rng = np.random.default_rng(0)
    return {
        "tiny.onnx": tcn.SerializeToString(),
        "tiny.qdq.onnx": qdq.SerializeToString(),
        "tiny.espdl": espdl,
        "tiny.data.npy": _npy(rng.standard_normal((3, 4, T)).astype(np.float32)),
        "qdq_erf.onnx": qdq_erf().SerializeToString(),
        "no_time.onnx": no_time_axis().SerializeToString(),
        "strided.onnx": strided_tcn().SerializeToString(),
        "softmax_time.onnx": softmax_over_time().SerializeToString(),
        "future_conv.onnx": future_conv().SerializeToString(),
        "erf.onnx": erf_model().SerializeToString(),
        "opset9.onnx": opset9_model().SerializeToString(),
    }


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# ---- the cases ------------------------------------------------------------------------------


def case(id: str, args: str, message: str, output: str | None = "{out}/o") -> dict:
    """One call: `args` split on spaces; `output` must not exist afterwards (None: no -o)."""
    return {"id": id, "args": args.split(), "exit": 2, "message": message, "output": output}


CASES = [
    # optimize: unreadable, invalid or unsupported ONNX; outputs that cannot be written
    case("optimize_truncated", "optimize {in}/onnx_truncated.onnx -o {out}/o",
         "onnx_truncated.onnx: not an ONNX model"),
    case("optimize_header_flipped", "optimize {in}/onnx_header_flipped.onnx -o {out}/o",
         "onnx_header_flipped.onnx: not an ONNX model"),
    case("optimize_zero_bytes", "optimize {in}/onnx_zero_bytes.onnx -o {out}/o",
         "onnx_zero_bytes.onnx: not an ONNX model"),
    case("optimize_text_file", "optimize {in}/onnx_text.onnx -o {out}/o",
         "onnx_text.onnx: not an ONNX model"),
    case("optimize_empty_file", "optimize {in}/onnx_empty.onnx -o {out}/o",
         "onnx_empty.onnx: the file is empty"),
    case("optimize_no_graph", "optimize {in}/onnx_no_graph.onnx -o {out}/o",
         "onnx_no_graph.onnx: not an ONNX model (no graph"),
    case("optimize_dangling_input", "optimize {in}/onnx_dangling_input.onnx -o {out}/o",
         "onnx_dangling_input.onnx: fails onnx.checker"),
    case("optimize_espdl_given", "optimize {in}/tiny.espdl -o {out}/o",
         "tiny.espdl: not an ONNX model"),
    case("optimize_old_opset", "optimize {in}/opset9.onnx -o {out}/o",
         "opset 9 is older than 11"),
    case("optimize_missing_input", "optimize {in}/no_such_model.onnx -o {out}/o",
         "no_such_model.onnx: no such file"),
    case("optimize_input_is_folder", "optimize {in} -o {out}/o",
         "is a folder, expected a file"),
    case("optimize_output_folder_missing", "optimize {in}/tiny.onnx -o {out}/missing/o.onnx",
         "missing does not exist", "{out}/missing/o.onnx"),
    case("optimize_output_parent_is_file", "optimize {in}/tiny.onnx -o {in}/tiny.onnx/o.onnx",
         "tiny.onnx does not exist", "{in}/tiny.onnx/o.onnx"),
    case("optimize_output_in_proc", "optimize {in}/tiny.onnx -o /proc/espstream-test.onnx",
         "cannot write in /proc", "/proc/espstream-test.onnx"),
    case("optimize_output_is_folder", "optimize {in}/tiny.onnx -o {out}",
         "is a folder; give a file name", None),
    case("optimize_bad_input_shape", "optimize {in}/tiny.onnx --input-shape x:1,4 -o {out}/o",
         "--input-shape x: the input has rank 3"),
    case("optimize_non_utf8_text", "optimize {in}/onnx_bad_utf8.onnx -o {out}/o",
         "field onnx.ModelProto.producer_name is not valid UTF-8"),
    case("optimize_tensor_size_mismatch", "optimize {in}/onnx_tensor_size.onnx -o {out}/o",
         "tensor 'conv1_w' holds 384 bytes where its dims [8, 4, 2] need 256"),
    case("optimize_no_outputs", "optimize {in}/onnx_no_outputs.onnx -o {out}/o",
         "the graph has no outputs"),
    case("optimize_fails_in_onnxruntime", "optimize {in}/qdq_bad_axis.onnx -o {out}/o",
         "the input model fails in onnxruntime"),
    case("optimize_empty_list_attribute", "optimize {in}/onnx_empty_kernel_shape.onnx -o {out}/o",
         "attribute 'kernel_shape' of node 'conv2' (Conv) is declared as a list but holds no"),
    # calibrate: data of the wrong shape, type or values; models it cannot take
    case("calibrate_nan", "calibrate {in}/tiny.onnx -d {in}/data_nan.npy -o {out}/o",
         "sample 1: contains NaN"),
    case("calibrate_inf", "calibrate {in}/tiny.onnx -d {in}/data_inf.npy -o {out}/o",
         "sample 2: contains Inf"),
    case("calibrate_wrong_shape",
         "calibrate {in}/tiny.onnx -d {in}/data_wrong_shape.npy -o {out}/o",
         "has shape [3, 5, 16], but the model's input 'x' is [1, 4, 16]"),
    case("calibrate_wrong_rank", "calibrate {in}/tiny.onnx -d {in}/data_wrong_rank.npy -o {out}/o",
         "has shape [4, 16], but the model's input 'x' is [1, 4, 16]"),
    case("calibrate_complex_dtype", "calibrate {in}/tiny.onnx -d {in}/data_complex.npy -o {out}/o",
         "element type complex64"),
    case("calibrate_truncated_npy",
         "calibrate {in}/tiny.onnx -d {in}/data_truncated.npy -o {out}/o",
         "data_truncated.npy: not a readable .npy file"),
    case("calibrate_pickled_npy", "calibrate {in}/tiny.onnx -d {in}/data_pickled.npy -o {out}/o",
         "data_pickled.npy: not a readable .npy file"),
    case("calibrate_npz_wrong_key",
         "calibrate {in}/tiny.onnx -d {in}/data_wrong_key.npz -o {out}/o",
         "key 'not_x' is not an input of the model"),
    case("calibrate_npz_truncated",
         "calibrate {in}/tiny.onnx -d {in}/data_truncated.npz -o {out}/o",
         "data_truncated.npz: not a readable .npz file"),
    case("calibrate_no_samples", "calibrate {in}/tiny.onnx -d {in}/data_empty.npy -o {out}/o",
         "holds no samples"),
    case("calibrate_random_zero", "calibrate {in}/tiny.onnx -q --random 0 -o {out}/o",
         "'--random': 0 is not in the range"),
    case("calibrate_quantized_model", "calibrate {in}/tiny.qdq.onnx --random 2 -o {out}/o",
         "already quantized"),
    case("calibrate_nan_weight", "calibrate {in}/onnx_nan_weight.onnx -q --random 2 -o {out}/o",
         "tensor 'r': the float model produces NaN or Inf on the calibration data"),
    case("calibrate_unsupported_op", "calibrate {in}/erf.onnx -q --random 2 -o {out}/o",
         "operator Erf is not supported by calibrate"),
    case("calibrate_bits_12", "calibrate {in}/tiny.onnx --random 2 --bits 12 -o {out}/o",
         "Invalid value for '--bits'"),
    # streamify: graphs that cannot stream, impossible chunks, bad overrides
    case("streamify_softmax_over_time", "streamify {in}/softmax_time.onnx --chunk 2 -o {out}/o",
         "(Softmax) normalises over the time axis"),
    case("streamify_chunk_zero", "streamify {in}/tiny.onnx --chunk 0 -o {out}/o",
         "'--chunk': 0 is not in the range"),
    case("streamify_chunk_negative", "streamify {in}/tiny.onnx --chunk -3 -o {out}/o",
         "'--chunk': -3 is not in the range"),
    case("streamify_no_time_axis", "streamify {in}/no_time.onnx --chunk 2 -o {out}/o",
         "no input has a time axis"),
    case("streamify_chunk_vs_stride", "streamify {in}/strided.onnx --chunk 3 -o {out}/o",
         "--chunk 3: every strided op must see whole strides"),
    case("streamify_bad_axis", "streamify {in}/tiny.onnx --chunk 2 --axis x:7 -o {out}/o",
         "--axis x:7: input x has rank 3"),
    case("streamify_overrides_not_json",
         "streamify {in}/tiny.onnx --chunk 2 --overrides {in}/overrides_not_json.json -o {out}/o",
         "overrides_not_json.json: not valid JSON"),
    case("streamify_overrides_bad_value",
         "streamify {in}/tiny.onnx --chunk 2 --overrides {in}/overrides_bad_value.json -o {out}/o",
         "window must be positive, between 1 and"),
    case("streamify_truncated_model", "streamify {in}/qdq_truncated.onnx --chunk 2 -o {out}/o",
         "qdq_truncated.onnx: not an ONNX model"),
    # export: float or unsupported models, wrong target, bad test data, bad paths
    case("export_float_model", "export {in}/tiny.onnx -o {out}/o.espdl",
         "it is a float model; calibrate it first", "{out}/o.espdl"),
    case("export_target_mismatch", "export {in}/tiny.qdq.onnx --target esp32s3 -o {out}/o.espdl",
         "--target esp32s3 differs from the target the model was calibrated for", "{out}/o.espdl"),
    case("export_test_data_wrong_shape",
         "export {in}/tiny.qdq.onnx --test-data {in}/data_wrong_shape.npy -o {out}/o.espdl",
         "has shape [1, 5, 16]; expected [1, 4, 16]", "{out}/o.espdl"),
    case("export_output_in_proc", "export {in}/tiny.qdq.onnx -o /proc/espstream-test.espdl",
         "cannot write in /proc", "/proc/espstream-test.espdl"),
    case("export_cpp_into_a_file", "export {in}/tiny.qdq.onnx --format cpp -o {in}/tiny.onnx",
         "not an existing folder", None),
    case("export_symbolic_time",
         "export {in}/qdq_symbolic_time.onnx --test-random -o {out}/o.espdl",
         "graph input 'x' has shape [1, 4, 'T']: ESP-DL needs fixed input shapes", "{out}/o.espdl"),
    case("export_malformed_qdq", "export {in}/qdq_wrong_scale.onnx -o {out}/o.espdl",
         "the model is malformed: it does not run in onnxruntime", "{out}/o.espdl"),
    case("export_unsupported_op", "export {in}/qdq_erf.onnx -o {out}/o.espdl",
         "ESP-DL has no kernel for (or espstream cannot lower): Erf 'erf0'", "{out}/o.espdl"),
    case("export_test_data_nan_one",
         "export {in}/tiny.qdq.onnx --test-data {in}/data_nan_one.npy -o {out}/o.espdl",
         "holds NaN or infinite values", "{out}/o.espdl"),
    case("export_json_missing_folder",
         "export {in}/tiny.qdq.onnx --json {out}/missing/e.json -o {out}/o.espdl",
         "missing does not exist", "{out}/o.espdl"),
    # verify: corrupt files, bad data, a model that is not a streaming one
    case("verify_corrupt_espdl", "verify {in}/espdl_flipped_root.espdl",
         "corrupt .espdl payload", None),
    case("verify_truncated_espdl", "verify {in}/espdl_truncated.espdl",
         "truncated .espdl file", None),
    case("verify_nan_data", "verify {in}/tiny.onnx --chunks 2 -d {in}/data_nan.npy",
         "data_nan.npy: contains NaN", None),
    case("verify_wrong_shape_data", "verify {in}/tiny.onnx --chunks 2 -d {in}/data_wrong_shape.npy",
         "expects [N, 4, 16], got [3, 5, 16]", None),
    case("verify_complex_data", "verify {in}/tiny.onnx --chunks 2 -d {in}/data_complex.npy",
         "element type complex64; expected real numbers", None),
    case("verify_offline_as_streaming", "verify {in}/tiny.onnx {in}/tiny.onnx --random 1",
         "not a streaming model", None),
    case("verify_truncated_streaming", "verify {in}/tiny.onnx {in}/qdq_truncated.onnx --random 1",
         "qdq_truncated.onnx: not an ONNX model", None),
    case("verify_inf_data", "verify {in}/tiny.onnx --chunks 2 -d {in}/data_inf.npy",
         "data_inf.npy: contains Inf", None),
    case("verify_truncated_npz", "verify {in}/tiny.onnx --chunks 2 -d {in}/data_truncated.npz",
         "data_truncated.npz: not an .npy/.npz file", None),
    case("verify_espdl_nan_data", "verify {in}/tiny.espdl {in}/tiny.espdl -d {in}/data_nan.npy",
         "data_nan.npy: contains NaN", None),
    case("verify_pickled_data", "verify {in}/tiny.onnx --chunks 2 -d {in}/data_pickled.npy",
         "data_pickled.npy: not an .npy/.npz file", None),
    case("verify_espdl_bias_without_exponent", "verify {in}/espdl_bias_no_exponent.espdl",
         "bias 'conv1_b' has 0 exponents for 8 output channels", None),
    # convert: the same faults met inside the one-step pipeline
    case("convert_truncated_model", "convert {in}/onnx_truncated.onnx --random 2 -o {out}/o.espdl",
         "onnx_truncated.onnx: not an ONNX model", "{out}/o.espdl"),
    case("convert_nan_data", "convert {in}/tiny.onnx -q -d {in}/data_nan.npy -o {out}/o.espdl",
         "sample 1: contains NaN", "{out}/o.espdl"),
    case("convert_softmax_over_time",
         "convert {in}/softmax_time.onnx -q --random 2 --chunk 2 -o {out}/o.espdl",
         "(Softmax) normalises over the time axis", "{out}/o.espdl"),
    case("convert_chunk_vs_stride",
         "convert {in}/strided.onnx -q --random 2 --chunk 3 -o {out}/o.espdl",
         "--chunk 3: every strided op must see whole strides", "{out}/o.espdl"),
    case("convert_unsupported_op", "convert {in}/erf.onnx -q --random 2 -o {out}/o.espdl",
         "operator Erf is not supported by calibrate", "{out}/o.espdl"),
    case("convert_output_in_proc",
         "convert {in}/tiny.onnx --random 2 -o /proc/espstream-test.espdl",
         "cannot write in /proc", "/proc/espstream-test.espdl"),
    # inspect: truncated, corrupted and foreign .espdl / .onnx files
    case("inspect_truncated_espdl", "inspect {in}/espdl_truncated.espdl",
         "truncated .espdl file", None),
    case("inspect_header_only_espdl", "inspect {in}/espdl_header_only.espdl",
         "shorter than its 16-byte header", None),
    case("inspect_bad_magic", "inspect {in}/espdl_bad_magic.espdl",
         "not an .espdl file: magic b'XYZ2'", None),
    case("inspect_flipped_root", "inspect {in}/espdl_flipped_root.espdl",
         "corrupt .espdl payload", None),
    case("inspect_length_huge", "inspect {in}/espdl_length_huge.espdl",
         "announces a 2147483647-byte payload", None),
    case("inspect_random_espdl", "inspect {in}/espdl_random.espdl",
         "unknown .espdl mode", None),
    case("inspect_empty_espdl", "inspect {in}/espdl_empty.espdl",
         "espdl_empty.espdl: the file is empty", None),
    case("inspect_truncated_onnx", "inspect {in}/onnx_truncated.onnx",
         "onnx_truncated.onnx: not an ONNX model", None),
    case("inspect_json_to_missing_folder", "inspect {in}/tiny.espdl --json {out}/missing/i.json",
         "missing does not exist", "{out}/missing/i.json"),
    # packed files (PDL3) and encrypted models (issue 17)
    case("inspect_pack_bad_hash", "inspect {in}/espdl_pack_bad_hash.espdl",
         "PDL3 SHA-256 mismatch", None),
    case("inspect_pack_truncated_header", "inspect {in}/espdl_pack_header_cut.espdl",
         "shorter than its 60-byte header", None),
    case("verify_pack_truncated", "verify {in}/espdl_pack_truncated.espdl",
         "truncated PDL3 file: package_size", None),
    case("verify_pack_needs_model", "verify {in}/espdl_pack2.espdl {in}/espdl_pack2.espdl",
         "holds 2 models: a.espdl, b.espdl; choose one with --model NAME", None),
    case("inspect_pack_unknown_model", "inspect {in}/espdl_pack2.espdl --model c.espdl",
         "no model of that name", None),
    case("inspect_encrypted_without_key", "inspect {in}/espdl_encrypted.espdl",
         "is encrypted (ESP-DL mode 1, AES-128-CTR); give its key with --key", None),
    case("verify_encrypted_wrong_key",
         "verify {in}/espdl_encrypted.espdl --key {in}/key_wrong.key", "wrong key", None),
    case("inspect_key_file_not_a_key",
         "inspect {in}/espdl_encrypted.espdl --key {in}/key_short.key",
         "not an AES-128 key", None),
    case("export_encrypt_key_not_a_key",
         "export {in}/tiny.qdq.onnx -q --encrypt-key {in}/key_short.key -o {out}/o.espdl",
         "not an AES-128 key", "{out}/o.espdl"),
    case("pack_a_packed_file", "pack {in}/espdl_pack2.espdl -o {out}/p.espdl",
         "is itself a packed file", "{out}/p.espdl"),
    case("pack_pdl1_of_edl2", "pack {in}/tiny.espdl --format pdl1 -o {out}/p.espdl",
         "--format pdl1: it packs EDL1 files", "{out}/p.espdl"),
    case("pack_truncated_member", "pack {in}/espdl_truncated.espdl -o {out}/p.espdl",
         "truncated .espdl file", "{out}/p.espdl"),
    case("app_encrypted_without_key",
         "app {in}/espdl_encrypted.espdl -o {out}/app --target esp32p4",
         "is encrypted", "{out}/app"),
    case("app_corrupt_model", "app {in}/espdl_flipped_root.espdl -o {out}/app --target esp32p4",
         "corrupt .espdl payload", "{out}/app"),
]


# ---- malformed files ------------------------------------------------------------------------


def _flip(data: bytes, start: int, count: int) -> bytes:
    b = bytearray(data)
    for i in range(start, min(start + count, len(b))):
        b[i] ^= 0xFF
    return bytes(b)


def bad_files(valid: dict[str, bytes]) -> dict[str, bytes]:
    onnx_b, espdl_b = valid["tiny.onnx"], valid["tiny.espdl"]
    qdq_b = valid["tiny.qdq.onnx"]
    rng = np.random.default_rng(7)
    f32 = np.float32
    good = rng.standard_normal((3, 4, T)).astype(f32)  # 3 samples of the [1, 4, T] input
    nan = good.copy()
    nan[1, 2, 5] = np.nan
    inf = good.copy()
    inf[2, 0, 0] = np.inf
    nan_one = good[:1].copy()  # export's --test-data: one sample
    nan_one[0, 3, 3] = np.nan
    wrong_dt = np.zeros((3, 4, T), np.complex64)
    trunc_npy = _npy(good)[:100]
    pickled = _pickled_npy()
    npz_ok = _npz({"x": good})
    no_onnx_graph = onnx.ModelProto(ir_version=8)  # parses, but holds no graph
    dangling = onnx.load_from_string(onnx_b)
    dangling.graph.node[0].input[0] = "nowhere"
    return {
        # ONNX files
        "onnx_truncated.onnx": onnx_b[: len(onnx_b) // 2],
        "onnx_header_flipped.onnx": _flip(onnx_b, 0, 8),
        "onnx_zero_bytes.onnx": b"\x00" * 256,
        "onnx_text.onnx": b"this is a text file, not an ONNX model\n" * 4,
        "onnx_empty.onnx": b"",
        "onnx_no_graph.onnx": no_onnx_graph.SerializeToString(),
        "onnx_dangling_input.onnx": dangling.SerializeToString(),
        "qdq_truncated.onnx": qdq_b[: len(qdq_b) - 40],
        "onnx_bad_utf8.onnx": _bad_utf8(onnx_b),
        "onnx_tensor_size.onnx": _resized_weight(onnx_b),
        "onnx_no_outputs.onnx": _no_outputs(onnx_b),
        "qdq_bad_axis.onnx": _bad_axis(qdq_b),
        "onnx_empty_kernel_shape.onnx": _empty_kernel_shape(onnx_b),
        "onnx_nan_weight.onnx": _nan_weight(onnx_b),
        "qdq_symbolic_time.onnx": _symbolic_time(qdq_b),
        "qdq_wrong_scale.onnx": _wrong_scale(qdq_b),
        # .espdl files
        "espdl_bias_no_exponent.espdl": _bias_without_exponent(espdl_b),
        "espdl_truncated.espdl": espdl_b[: len(espdl_b) // 2],
        "espdl_header_only.espdl": espdl_b[:12],
        "espdl_bad_magic.espdl": b"XYZ" + espdl_b[3:],
        "espdl_flipped_root.espdl": _flip(espdl_b, 16, 8),
        "espdl_length_huge.espdl": espdl_b[:8] + (2**31 - 1).to_bytes(4, "little")
        + espdl_b[12:],
        "espdl_random.espdl": b"EDL2" + rng.integers(0, 256, 200, dtype=np.uint8).tobytes(),
        "espdl_empty.espdl": b"",
        **_packed_and_encrypted(espdl_b),
        # data files
        "data_nan.npy": _npy(nan),
        "data_inf.npy": _npy(inf),
        "data_nan_one.npy": _npy(nan_one),
        "data_wrong_shape.npy": _npy(rng.standard_normal((3, 5, T)).astype(f32)),
        "data_wrong_rank.npy": _npy(rng.standard_normal((4, T)).astype(f32)),
        "data_complex.npy": _npy(wrong_dt),
        "data_truncated.npy": trunc_npy,
        "data_pickled.npy": pickled,
        "data_wrong_key.npz": _npz({"not_x": good}),
        "data_truncated.npz": npz_ok[: len(npz_ok) // 2],
        "data_empty.npy": _npy(np.zeros((0, 4, T), f32)),
        # streamify overrides
        "overrides_not_json.json": b"{\"tensors\": {\"h\": {\"window\": 3}",
        "overrides_bad_value.json": b"{\"tensors\": {\"h\": {\"window\": -4}}}",
    }


KEY = bytes(range(0xA0, 0xB0))  # the key of espdl_encrypted.espdl


def _packed_and_encrypted(espdl_b: bytes) -> dict[str, bytes]:
    """PDL3 packages of tiny.espdl (bad digest, cut header, cut body), an encrypted copy and
    key files (a wrong key, a file too short to be one)."""
    from espstream.espdl import crypt
    from espstream.espdl.pack import pack

    two = pack([("a.espdl", espdl_b), ("b.espdl", espdl_b)])
    bad = bytearray(two)
    bad[len(two) - 100] ^= 0x01  # a model byte changed after packing
    return {
        "espdl_pack2.espdl": two,
        "espdl_pack_bad_hash.espdl": bytes(bad),
        "espdl_pack_header_cut.espdl": two[:40],
        "espdl_pack_truncated.espdl": two[: len(two) - 64],
        "espdl_encrypted.espdl": crypt.encrypt(espdl_b, KEY),
        "key_wrong.key": bytes(range(16)),
        "key_short.key": b"0x01, 0x02\n",
    }


def _bad_utf8(onnx_b: bytes) -> bytes:
    """producer_name holding a byte that is not UTF-8 (proto2 parses it; text decoders choke)."""
    name = b"tests/bad_inputs/make.py"
    assert onnx_b.count(name) == 1
    return onnx_b.replace(name, b"tests/bad_inputs/make\x80py")


def _resized_weight(onnx_b: bytes) -> bytes:
    """conv1_w declares dims [8, 4, 2] but holds the 96 values of [8, 4, 3]."""
    m = onnx.load_from_string(onnx_b)
    next(t for t in m.graph.initializer if t.name == "conv1_w").dims[2] = 2
    return m.SerializeToString()


def _no_outputs(onnx_b: bytes) -> bytes:
    m = onnx.load_from_string(onnx_b)
    del m.graph.output[:]
    return m.SerializeToString()


def _bad_axis(qdq_b: bytes) -> bytes:
    """A per-channel DequantizeLinear with axis 5 on a rank-3 weight: passes onnx.checker and
    shape inference, fails only when onnxruntime runs it."""
    m = onnx.load_from_string(qdq_b)
    dq = next(n for n in m.graph.node if n.name == "conv1_w_DequantizeLinear")
    next(a for a in dq.attribute if a.name == "axis").i = 5
    return m.SerializeToString()


def _wrong_scale(qdq_b: bytes) -> bytes:
    """conv1's per-channel weight DequantizeLinear reads conv2's 4 scales for its 8 channels:
    passes onnx.checker, fails in onnxruntime (found by fuzzing)."""
    m = onnx.load_from_string(qdq_b)
    dq = next(n for n in m.graph.node if n.name == "conv1_w_DequantizeLinear")
    dq.input[1] = "conv2_b_scale"
    return m.SerializeToString()


def _symbolic_time(qdq_b: bytes) -> bytes:
    """The calibrated model with its time dimension made symbolic (found by fuzzing)."""
    m = onnx.load_from_string(qdq_b)
    d = m.graph.input[0].type.tensor_type.shape.dim[2]
    d.Clear()
    d.dim_param = "T"
    return m.SerializeToString()


def _nan_weight(onnx_b: bytes) -> bytes:
    """One NaN in conv1's weight: a valid model whose activations are NaN (found by fuzzing)."""
    m = onnx.load_from_string(onnx_b)
    w = m.graph.initializer[0]
    assert w.name == "conv1_w"
    a = onnx.numpy_helper.to_array(w).copy()
    a.flat[0] = np.nan
    w.CopyFrom(onnx.numpy_helper.from_array(a, w.name))
    return m.SerializeToString()


def _empty_kernel_shape(onnx_b: bytes) -> bytes:
    """conv2's `kernel_shape` typed INTS but empty: passes onnx.checker (found by fuzzing)."""
    m = onnx.load_from_string(onnx_b)
    ks = next(a for a in m.graph.node[2].attribute if a.name == "kernel_shape")
    assert m.graph.node[2].name == "conv2"
    del ks.ints[:]
    return m.SerializeToString()


def _bias_without_exponent(espdl_b: bytes) -> bytes:
    """conv1's bias stored with no exponent at all."""
    from espstream import espdl

    g = espdl.read(espdl_b)
    g.initializers["conv1_b"].exponents = []
    return espdl.write(g)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz without timestamps (np.savez stamps the current time into the zip)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for k, v in arrays.items():
            info = zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(info, _npy(v))
    return buf.getvalue()


def _pickled_npy() -> bytes:
    """An object array: loading it needs pickle, which every reader refuses."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def main(folder: Path = HERE) -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    valid = valid_files()
    sys.path.insert(0, str(HERE))
    import robust_cases
    import robust_more

    files = {**valid, **bad_files(valid), **robust_cases.files(valid),
             **robust_more.files(valid)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    cases = CASES + robust_cases.cases() + robust_more.cases()
    (folder / "manifest.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)

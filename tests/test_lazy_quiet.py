"""espstream/lazy_quiet.py: the libraries' loggers are quieted on import, and the CLI's
informational commands import neither onnx nor onnxruntime."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_quieted_when_imported_later() -> None:
    out = _run(
        "from espstream.lazy_quiet import quiet_on_import\n"
        "quiet_on_import()\n"
        "import onnx_graphsurgeon as gs, onnxruntime as ort\n"
        "print(gs.logger.G_LOGGER.severity == gs.logger.G_LOGGER.ERROR)\n"
        "import sys; print(any(type(f).__name__ == '_Finder' for f in sys.meta_path))\n"
        "print(ort.InferenceSession is not None)\n")
    assert out.split() == ["True", "False", "True"]


def test_quieted_when_already_imported() -> None:
    out = _run(
        "import onnx_graphsurgeon as gs\n"
        "from espstream.lazy_quiet import quiet_on_import\n"
        "quiet_on_import()\n"
        "print(gs.logger.G_LOGGER.severity == gs.logger.G_LOGGER.ERROR)\n")
    assert out == "True"


def test_version_imports_no_model_library() -> None:
    out = _run(
        "import sys\n"
        "from espstream.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnx_graphsurgeon', 'numpy')"
        " if m in sys.modules))\n")
    assert out.splitlines()[-1] == "[]"

"""Quiet onnx-graphsurgeon's and onnxruntime's loggers the moment either is imported.

Rules:
1. Nothing heavy is imported here: the CLI installs the hook before it knows which command runs.
2. A module already imported is quieted at once; one imported later is quieted right after its
   own code has run (an import hook on `sys.meta_path` that wraps the module's loader).
   onnxruntime's sessions are all made at log severity 4, whatever their options ask.
3. The hook removes itself once both are quieted.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType


def _quiet(name: str, module: ModuleType) -> None:
    if name == "onnx_graphsurgeon":
        module.logger.G_LOGGER.severity = module.logger.G_LOGGER.ERROR
    elif name == "onnxruntime":
        module.set_default_logger_severity(4)  # errors reach the user as our one line
        _quiet_sessions(module)


def _quiet_sessions(ort: ModuleType) -> None:
    """A session's own `log_severity_level` (3: errors) overrides the default logger's: each
    session is made at 4, so that a failing kernel does not print a coloured log line before
    the one error line (the failure still comes back as an exception)."""
    base = ort.InferenceSession
    if getattr(base, "_espstream_quiet", False):
        return

    class QuietSession(base):  # type: ignore[misc, valid-type]
        _espstream_quiet = True

        def __init__(self, path_or_bytes, sess_options=None, *args, **kwargs):  # noqa: ANN001
            if sess_options is None:
                sess_options = ort.SessionOptions()
            if sess_options.log_severity_level < 4:
                sess_options.log_severity_level = 4
            super().__init__(path_or_bytes, sess_options, *args, **kwargs)

    QuietSession.__name__ = QuietSession.__qualname__ = "InferenceSession"
    ort.InferenceSession = QuietSession


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, name: str) -> None:
        self.inner, self.name = inner, name

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.inner  # resource readers and the like see the real loader
        self.inner.exec_module(module)
        _quiet(self.name, module)

    def __getattr__(self, attr: str):  # noqa: ANN204
        return getattr(self.inner, attr)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        if not self.names and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, fullname)
        return spec


def quiet_on_import() -> None:
    pending = set()
    for name in ("onnx_graphsurgeon", "onnxruntime"):
        if name in sys.modules:
            _quiet(name, sys.modules[name])
        else:
            pending.add(name)
    if pending:
        sys.meta_path.insert(0, _Finder(pending))

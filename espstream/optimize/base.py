"""A pass: a named function that rewrites a graph in place and says whether it changed it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[gs.Graph], bool]

    @property
    def summary(self) -> str:
        doc = (self.run.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

"""The `.espdl` file format: FlatBuffers schema, generated accessors, reader, writer, layouts.

`read(data) -> IntGraph` and `write(graph) -> bytes`; see espstream/espdl/README.md.
"""

from espstream.espdl.reader import read
from espstream.espdl.writer import write

__all__ = ["read", "write"]

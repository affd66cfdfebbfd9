"""espstream.outputs (issue 18): special files written through, never renamed over; outputs
committed together."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from cli_util import espstream

from espstream import outputs
from espstream.errors import UserError

BAD = Path(__file__).resolve().parent / "bad_inputs"


def test_char_device_written_through_not_replaced(tmp_path):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("mknod of a character device needs root")
    proc = espstream("export", str(BAD / "tiny.qdq.onnx"), "-o", str(node))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(os.stat(node).st_mode)  # still the device node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]  # no temporary file left


def test_fifo_written_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    proc = espstream("export", str(BAD / "tiny.qdq.onnx"), "-o", str(fifo))
    data = reader.communicate(timeout=60)[0]
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert data[:4] != b"" and len(data) > 1000


def test_socket_refused(tmp_path):
    import socket

    path = tmp_path / "s"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    try:
        with pytest.raises(UserError, match="not a regular file"):
            outputs.check_output(str(path))
    finally:
        s.close()


def test_symlink_target_replaced_not_link(tmp_path):
    target = tmp_path / "real"
    target.write_bytes(b"old")
    link = tmp_path / "link"
    link.symlink_to(target)
    outputs.write_file(b"new", str(link))
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_transaction_all_or_nothing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(UserError):
        with outputs.transaction():
            outputs.write_file(b"1", str(a))
            raise UserError("later failure")
    assert list(tmp_path.iterdir()) == []
    with outputs.transaction():
        outputs.write_file(b"1", str(a))
        assert not a.exists()  # lands only at the end
        outputs.write_file(b"2", str(b))
    assert a.read_bytes() == b"1" and b.read_bytes() == b"2"


def test_two_outputs_same_file_refused(tmp_path):
    with pytest.raises(UserError, match="named twice"):
        outputs.check_outputs([str(tmp_path / "o"), str(tmp_path / "." / "o")], [])

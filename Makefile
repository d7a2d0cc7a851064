# Two commands on a fresh machine: `make run` (install, then serve the bundled model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# torch for the transformers tier's tests. On this project's machines pip takes ==2.13.0 from a
# local CPU-only wheel (~190 MB, about a minute); elsewhere PyPI's build of it (CUDA, several GB).
TORCH ?= torch==2.13.0

.PHONY: install install-test run test bench clean

# Serving needs the package, llama-cpp-python (compiled once, then reused from pip's wheel cache)
# and the bundled models.
$(STAMP): pyproject.toml scripts/install_models.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[cpu]'
	$(PY) scripts/install_models.py
	touch $(STAMP)

# The tests also need the dev tools and the transformers stack (torch on CPU).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install '$(TORCH)'
	$(PY) -m pip install -e '.[cpu,dev,hf]'
	touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

run: install
	$(VENV)/bin/localroute serve

test: install-test
	$(PY) -m pytest

bench: install-test
	$(PY) scripts/bench_decode.py

clean:
	rm -rf $(VENV) models/*.gguf

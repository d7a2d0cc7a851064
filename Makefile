# Two commands on a fresh machine: `make run` (install, then serve the bundled model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch for the transformers tier's tests. On this project's machines pip takes ==2.13.0 from a
# local CPU-only wheel (~190 MB, about a minute); elsewhere PyPI's build of it (CUDA, several GB).
TORCH ?= torch==2.13.0

.PHONY: install run test bench clean

$(STAMP): pyproject.toml scripts/install_models.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install '$(TORCH)'
	$(PY) -m pip install -e '.[cpu,dev,hf]'
	$(PY) scripts/install_models.py
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/localroute serve

test: install
	$(PY) -m pytest

bench: install
	$(PY) scripts/bench_decode.py

clean:
	rm -rf $(VENV) models/*.gguf

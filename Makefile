# Two commands on a fresh machine: `make run` (install, then serve the bundled model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml scripts/install_models.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[cpu,dev]'
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

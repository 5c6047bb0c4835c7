# Two commands from a fresh clone: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is enough here; on a GPU machine use e.g. `make TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench op clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/ddetr demo

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check ddetr tests benchmarks tune jobs && $(VENV)/bin/ruff format --check ddetr tests benchmarks tune jobs

op: setup
	$(VENV)/bin/ddetr op build

bench: setup
	$(PY) benchmarks/msda.py

clean:
	rm -rf $(VENV) build .pytest_cache

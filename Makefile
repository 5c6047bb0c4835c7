# Two commands from a fresh clone: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is enough here; on a GPU machine use e.g. `make TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: setup dev demo test lint floor bench op clean

# setup: what the package needs; dev: plus the test tools (pytest, ruff, moto, onnxruntime), for test and lint.
setup: $(VENV)/.installed
dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/ddetr demo

test: dev
	$(PY) -m pytest -q tests

lint: dev
	$(VENV)/bin/ruff check ddetr tests benchmarks tune jobs && $(VENV)/bin/ruff format --check ddetr tests benchmarks tune jobs

# floor: the lowest declared Ray, torch and pyarrow, installed together (cached in ~/.cache/ddetr-ci), run the op and a
# tiny Ray training (what CI runs after test and lint).
floor:
	bash .ci/floor

op: setup
	$(VENV)/bin/ddetr op build

bench: setup
	$(PY) benchmarks/msda.py

clean:
	rm -rf $(VENV) build .pytest_cache

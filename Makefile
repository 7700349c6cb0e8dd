# Heedful: `make demo` and `make test` do all set-up themselves (see README.md).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup test lint typecheck pytest demo bench readme clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/heedful demo

bench: setup
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.store
	$(BIN)/python -m bench.lsp
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.swap
	$(BIN)/python -m bench.eval

readme: setup
	$(BIN)/python scripts/update_readme.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# Heedful: `make demo` and `make test` do all set-up themselves (see README.md).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# mypy's cache lives outside the clone, so a fresh clone checks only what changed (it compares contents,
# not modification times, before it trusts an entry).
MYPY := MYPY_CACHE_DIR="$${XDG_CACHE_HOME:-$$HOME/.cache}/heedful/mypy" $(BIN)/mypy

.PHONY: cpu setup test lint typecheck pytest demo bench readme clean

# The CPU decides which vLLM kernels run (AMX-packed weights or oneDNN), so a test log says where it ran.
cpu:
	@echo "make: on $$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $$(nproc) cores," \
		"$$(grep -qw amx_tile /proc/cpuinfo && echo 'AMX' || echo 'no AMX')," \
		"$$(grep -qw avx512_bf16 /proc/cpuinfo && echo 'AVX-512 BF16' || echo 'no AVX-512 BF16')"

setup:
	@bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(MYPY)

pytest: cpu setup
	$(BIN)/pytest $(PYTEST_ARGS)

test: cpu setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MYPY)
	$(BIN)/pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/heedful demo

bench: setup
	$(BIN)/python -m bench.steadiness
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.store
	$(BIN)/python -m bench.lsp
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.swap
	$(BIN)/python -m bench.eval
	$(BIN)/python -m bench.quality

readme: setup
	$(BIN)/python scripts/update_readme.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

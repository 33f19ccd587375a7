# Two commands do all the set-up on a fresh clone:
#   make test   create .venv if missing, install, run the test suite (CPU is enough)
#   make demo   create .venv if missing, install, train baseline vs SiaSamRea on synthetic data (CPU)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.siasam-installed
# The CPU build of torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
# Triton is pinned for the interpreter tests and the sm_70 (V100) compile check: Triton 3.9 emits
# PTX 9.4, which its bundled ptxas 12.9 cannot assemble and CUDA 13's ptxas no longer targets sm_70.
TORCH_CPU ?= torch==2.13.0 triton==3.8.0
# Where the CPU build of torch comes from. This project's machines (CI included) hold it as a
# local wheel that pip finds by itself; elsewhere PyPI's torch 2.13.0 is the CUDA build (and pins
# another triton): `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
EXTRAS ?= dev,gpu

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(TORCH_CPU)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/siasam-fast demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check siasam_fast kernels benchmarks tests train.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs

# Two commands do all the set-up on a fresh clone:
#   make test   create .venv if missing, install, run the test suite (CPU is enough)
#   make demo   create .venv if missing, install, train baseline vs SiaSamRea on synthetic data (CPU)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.siasam-installed
# The CPU build of torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
EXTRAS ?= dev,gpu

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_CPU)"
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

# Two commands do all the set-up on a fresh clone:
#   make test   create .venv if missing, install, run the test suite (CPU is enough)
#   make demo   create .venv if missing, install, train baseline vs SiaSamRea on synthetic data (CPU)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
# Triton is pinned for the interpreter tests and the sm_70 (V100) compile check: Triton 3.9 emits
# PTX 9.4, which its bundled ptxas 12.9 cannot assemble and CUDA 13's ptxas no longer targets sm_70.
TORCH_CPU ?= torch==2.13.0 triton==3.8.0
# Where the CPU build of torch comes from. This project's machines (CI included) hold it as a
# local wheel that pip finds by itself; elsewhere PyPI's torch 2.13.0 is the CUDA build (and pins
# another triton): `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
EXTRAS ?= dev,gpu
# The tested versions of everything else (pip -c; see its header). `make test CONSTRAINTS=` installs
# the newest releases instead; `make constraints` rewrites the file from .venv.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# One stamp per kind of install, so that switching between the two reinstalls
STAMP := $(VENV)/.siasam-installed$(if $(CONSTRAINTS),,-newest)
# (TORCH_CPU is named again with the package: an upgrade would otherwise replace the CPU torch)
UPGRADE := $(if $(CONSTRAINTS),,--upgrade --upgrade-strategy eager)

.PHONY: install test demo lint clean constraints

install: $(STAMP)

$(STAMP): setup.py $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_C) $(UPGRADE) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(TORCH_CPU)
	$(BIN)/python -m pip install -q $(PIP_C) $(UPGRADE) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
	  -e ".[$(EXTRAS)]" $(TORCH_CPU)
	@rm -f $(VENV)/.siasam-installed*
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/siasam-fast demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check siasam_fast kernels benchmarks tests train.py scripts

# After `make test CONSTRAINTS=` passed with the newest releases: pin them (Python 3.11 only).
constraints:
	@test -x $(BIN)/python || { echo "no $(VENV): run make test CONSTRAINTS= first" >&2; exit 1; }
	@sed -n '/^#/p' constraints.txt > constraints.txt.new
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(torch|triton)==|^#' | sort -f \
	  | sed 's/$$/ ; python_version == "3.11"/' >> constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs

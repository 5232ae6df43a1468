# Engram sparsity-allocation suite. `make sweep` and `make test` set up .venv/ on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP    = $(VENV)/.installed-$(ACCEL)
GRID    ?= sweeps/grids/smoke.yaml
RESULTS ?= results
FORCE   ?= 0
STORAGE ?=
COMPILE_CACHE ?=
HOST_MALLOC ?=
# Experiment tracking of make sweep: tensorboard (the default of sweeps.run), mlflow, wandb, several
# comma-separated, or none.
TRACKING ?=
PYTEST_ARGS ?=
# Which JAX build `make setup` installs: cuda when nvidia-smi lists a GPU, else cpu; ACCEL=cpu,
# cuda or tpu overrides. The version range is the one pyproject.toml admits.
ACCEL   ?= $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo cuda || echo cpu)
JAX_RANGE := >=0.6,<0.13
JAX_REQ_cpu  :=
JAX_REQ_cuda := jax[cuda12]$(JAX_RANGE)
JAX_REQ_tpu  := jax[tpu]$(JAX_RANGE)
JAX_REQ := $(JAX_REQ_$(ACCEL))
ifeq ($(filter $(ACCEL),cpu cuda tpu),)
$(error ACCEL must be cpu, cuda or tpu, got '$(ACCEL)')
endif

.PHONY: setup test test-all sweep plots fit readme bench contracts lint clean

setup: $(STAMP)

# torch is pinned to the CPU build that `pip` finds locally on the development machines; an
# unpinned torch would pull a multi-GB CUDA build just for the parity test.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet "torch==2.13.0"
	$(VPY) -m pip install --quiet -e ".[sweep,tracking,analysis,notebooks,parity,test]"
	$(if $(JAX_REQ),$(VPY) -m pip install --quiet "$(JAX_REQ)",@echo "JAX: CPU build (ACCEL=cpu)")
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

sweep: $(STAMP)
	$(VPY) -m sweeps.run $(GRID) --results $(RESULTS) $(if $(filter 1,$(FORCE)),--force,) $(if $(STORAGE),--storage $(STORAGE),) $(if $(COMPILE_CACHE),--compile-cache $(COMPILE_CACHE),) $(if $(HOST_MALLOC),--host-malloc $(HOST_MALLOC),) $(if $(TRACKING),--tracking $(TRACKING),)

fit: $(STAMP)
	$(VPY) -m analysis fit $(RESULTS)/$(notdir $(basename $(GRID)))

plots: $(STAMP)
	$(VPY) -m analysis plots --results $(RESULTS)

readme: $(STAMP)
	$(VPY) -m analysis readme --results $(RESULTS)

bench: $(STAMP)
	$(VPY) -m bench.run --out $(RESULTS)/bench

contracts: $(STAMP)
	$(VPY) ../shared/checks/contracts.py

lint: $(STAMP)
	$(VPY) -m ruff check .

clean:
	rm -rf .cache .pytest_cache

# Engram sparsity-allocation suite. `make sweep` and `make test` set up .venv/ on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP    = $(VENV)/.installed-$(ACCEL)-torch-$(TORCH)
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
# torch is only for the parity tests (tests/test_torch_parity.py). TORCH=pypi: the pinned version
# from the package index (on the development machines pip finds the CPU build there); TORCH=cpu:
# PyTorch's CPU build from its own CPU wheel index; TORCH=none: no torch (the parity tests skip,
# saying why). With ACCEL=cuda or tpu the default is none: PyPI's torch for Linux is a CUDA build,
# gigabytes of CUDA libraries of its own that may clash with those of jax[cuda12].
TORCH   ?= $(if $(filter cpu,$(ACCEL)),pypi,none)
TORCH_VERSION := 2.13.0
TORCH_INSTALL_pypi := $(VPY) -m pip install --quiet "torch==$(TORCH_VERSION)"
TORCH_INSTALL_cpu  := $(VPY) -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu "torch==$(TORCH_VERSION)"
TORCH_INSTALL_none := @echo "torch: not installed (TORCH=none, the default with ACCEL=cuda or tpu): the parity tests skip; make setup TORCH=cpu installs PyTorch's CPU build"
ifeq ($(filter $(TORCH),pypi cpu none),)
$(error TORCH must be pypi, cpu or none, got '$(TORCH)')
endif
comma   := ,
EXTRAS  := sweep,tracking,analysis,notebooks,test$(if $(filter none,$(TORCH)),,$(comma)parity)

.PHONY: setup test test-all sweep plots fit readme bench bench-gpu bench-prepare contracts lint clean

setup: $(STAMP)

# torch first (TORCH above), so that the parity extra finds it installed and pulls no other build.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(TORCH_INSTALL_$(TORCH))
	$(VPY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(if $(JAX_REQ),$(VPY) -m pip install --quiet "$(JAX_REQ)",@echo "JAX: CPU build (ACCEL=cpu)")
	touch $(STAMP)

# The suite runs in TEST_WORKERS processes (pytest-xdist), each test module whole in one of them so
# that module fixtures are built once; most tests are single-threaded (XLA compilation, Python),
# so two workers use both cores of a 2-core machine. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
TEST_DIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadscope)

test: $(STAMP)
	$(VPY) -m pytest -q $(TEST_DIST) -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VPY) -m pytest -q $(TEST_DIST) $(PYTEST_ARGS)

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

# The accelerator check (on a GPU): the GPU budgets' train step with each option on and off,
# MFU against the measured and the rated peak (bench/gpucheck.py).
bench-gpu: $(STAMP)
	$(VPY) -m bench.gpucheck --out $(RESULTS)/bench

# Preparing a corpus once, measured (bench/prepare.py): throughput at 1 and 2 workers, peak memory
# at two corpus sizes, a killed run resumed, the no-op rerun and a trial's start-up, on PREPARE_GB
# gigabytes of pysrc's files copied into a temporary folder.
PREPARE_GB ?= 1.0
bench-prepare: $(STAMP)
	$(VPY) -m bench.prepare --gigabytes $(PREPARE_GB) --out $(RESULTS)/bench/prepare

# The public names other code relies on (docs/design.md section 4), checked in tests/test_contracts.py.
contracts: $(STAMP)
	$(VPY) -m pytest -q tests/test_contracts.py

lint: $(STAMP)
	$(VPY) -m ruff check .

clean:
	rm -rf .cache .pytest_cache

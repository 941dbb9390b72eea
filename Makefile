# Two targets a fresh clone needs: `make train` and `make test`. Each creates .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

# torch: a GPU machine (nvidia-smi present) takes the normal PyPI build through the package's own
# requirement; a CPU-only machine pins the CPU wheel first so pip never pulls a multi-GB CUDA build.
# Elsewhere than this workplace, point TORCH_INDEX at https://download.pytorch.org/whl/cpu for CPU wheels.
TORCH_CPU_VERSION ?= 2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: train test test-fast install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
ifeq ($(HAS_GPU),1)
	$(BIN)/python -m pip install -q torch
else
	$(BIN)/python -m pip install -q "torch==$(TORCH_CPU_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e '.[dev,deepspeed]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The default run: a tiny GPT on the Python standard library's source, BPE tokenizer, a sample at the end.
train: install
	@start=$$(date +%s); \
	$(BIN)/lmtrain prepare $(filter data=% data.% tokenizer=% tokenizer.%,$(ARGS)) && \
	$(BIN)/lmtrain train $(ARGS) && \
	echo "make train: prepare + train took $$(( $$(date +%s) - start )) s"

test: install-dev
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not slurm" $(PYTEST_ARGS)

bench: install-dev
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/prepare.py

clean:
	rm -rf runs outputs multirun

# Two set-up commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-busy lint typecheck format bench bench-full clean gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m async_ckpt.demo

# A PyTorch Lightning run saving asynchronously through AsyncCkptIO, then resuming.
lightning-demo: $(STAMP)
	$(PY) -m async_ckpt.integrations.lightning_demo

lint: $(STAMP) typecheck
	$(VENV)/bin/ruff format --check async_ckpt tests benchmarks
	$(VENV)/bin/ruff check async_ckpt tests benchmarks

# mypy on the public API; files and settings in pyproject.toml [tool.mypy] (a few seconds)
typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format async_ckpt tests benchmarks
	$(VENV)/bin/ruff check --fix async_ckpt tests benchmarks

test: lint
	$(PY) -m pytest -q

# The suite 3 times under one CPU hog per core, to catch tests that synchronise by time.
test-busy: $(STAMP)
	$(PY) tests/busy.py --repeat 3 -- $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run --size 1GiB --repeats 5
	$(PY) -m benchmarks.incremental --size 1GiB --repeats 5
	$(PY) -m benchmarks.memory_tier --size 1GiB --repeats 5

lightning-bench: $(STAMP)
	$(PY) -m benchmarks.lightning_bench

accelerate-bench: $(STAMP)
	$(PY) -m benchmarks.accelerate_bench

bench-full: $(STAMP)
	$(PY) -m benchmarks.run --size 1GiB --size 4GiB --repeats 5 --ranks 2 --ranks 4

# Issue 17: the gpu-marked tests and the GPU benchmark in at most 5 minutes; one table,
# JSON in benchmarks/results/gpu-<stamp>.json. Without CUDA: one line, exit 0.
# With the CPU build of torch on a GPU machine: GPU_CHECK_ARGS=--install-cuda-torch
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .bench-tmp

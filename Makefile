# Set-up and entry points. Everything installs into .venv with pip: the CPU torch wheel is
# found by pip (uv and poetry do not see it), and torchvision is pinned with torch.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# jemalloc where installed (Debian: libjemalloc2): glibc malloc costs about a fifth of CPU
# inference throughput here; Ray's workers inherit the preload.
JEMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2))

.PHONY: setup up demo test lint bench clean

$(BIN)/python:
	$(shell command -v $(PY) || echo python3) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0" "torchvision==0.28.0"
	$(BIN)/pip install -q -e ".[dev]"

up: setup
	LD_PRELOAD=$(JEMALLOC) $(BIN)/refit up --data-dir .refit

demo: setup
	$(BIN)/refit demo --data-dir .refit

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/feature_cache.py
	$(BIN)/python benchmarks/transfer.py
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/adapt.py
	$(BIN)/python benchmarks/availability.py

clean:
	rm -rf .refit benchmarks/results

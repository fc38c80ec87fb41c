# Set-up and entry points. Everything installs into .venv with pip: the CPU torch wheel is
# found by pip (uv and poetry do not see it), and torchvision is pinned with torch.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# jemalloc (Debian: libjemalloc2): glibc malloc costs about a fifth of CPU inference
# throughput here. `make setup` installs it where it can (root with apt-get) and says so plainly
# where it cannot; `refit up` preloads it itself (service/allocator.py), and Ray's processes
# inherit it.
JEMALLOC_LIB := /usr/lib/*-linux-gnu/libjemalloc.so.2

.PHONY: setup jemalloc up demo test lint bench clean

$(BIN)/python:
	$(shell command -v $(PY) || echo python3) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python jemalloc
	$(BIN)/pip install -q "torch==2.13.0" "torchvision==0.28.0"
	$(BIN)/pip install -q -e ".[dev]"

jemalloc:
	@if ls $(JEMALLOC_LIB) >/dev/null 2>&1; then \
		echo "jemalloc: $$(ls $(JEMALLOC_LIB) | head -n1)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		if (apt-get install -y -qq libjemalloc2 || (apt-get update -qq && apt-get install -y -qq libjemalloc2)) >/dev/null 2>&1; \
		then echo "jemalloc: installed libjemalloc2"; \
		else echo "jemalloc: apt-get could not install libjemalloc2; refit up serves with glibc malloc (about a fifth slower)"; fi; \
	else \
		echo "jemalloc: not installed, and installing it needs root: sudo apt-get install libjemalloc2 (until then refit up serves with glibc malloc, about a fifth slower)"; \
	fi

up: setup
	$(BIN)/refit up --data-dir .refit

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
	$(BIN)/python benchmarks/request_path.py
	$(BIN)/python benchmarks/adapt.py
	$(BIN)/python benchmarks/loop.py
	$(BIN)/python benchmarks/job_cost.py
	$(BIN)/python benchmarks/availability.py

clean:
	rm -rf .refit benchmarks/results

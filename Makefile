# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv and installs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
PYTEST_ARGS ?=

# glibc's allocator returns freed pages to the OS after every big free; small-CNN training then spends
# up to half its CPU time in page faults. Keeping the pages (documented in docs/troubleshooting.md)
# makes CPU training about 2x faster. Benchmarks state the allocator they ran with.
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 100000000000
export WANDB_MODE ?= disabled

.PHONY: install data data-text demo test lint bench gpu-check gpu-study gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package when we are root with apt; otherwise the data module
# looks in data_dir / LBO_DATA_DIR and explains how to get the files.
data: $(STAMP)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "apt-get could not install dataset-fashion-mnist; see README.md for other ways to get the data"; \
	fi
	$(VENV)/bin/lbo data

# GCIDE (Webster's 1913 dictionary) for the language-model benchmark, from Debian's dict-gcide the same way;
# lightning_lbo.text also looks in data_dir / LBO_DATA_DIR for gcide.dict.dz and gcide.index.
data-text: $(STAMP)
	@if [ ! -f /usr/share/dictd/gcide.index ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dict-gcide) \
		|| echo "apt-get could not install dict-gcide; see docs/transformers.md for other ways to get the data"; \
	fi
	$(PY) -c "from lightning_lbo.text import load_gcide_splits as f; t, v = f(); print(f'GCIDE: {t.numel()} train / {v.numel()} held-out bytes')"

# SGD at batch 256 against sgd, goyal, lars and kfac at 4096 (docs/compare.md): ~40 s on 2 cores once installed;
# the first run adds the .venv install (a fresh machine: 1:40-5:34 in all; docs/getting_started.md).
demo: data
	$(VENV)/bin/lbo compare $(DEMO_ARGS)

test: data
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_lbo tests benchmarks examples

# The measurements quoted in docs/ and benchmarks/REPORT.md (long: the study alone takes hours on 2 cores;
# it caches every run and resumes where it stopped).
bench: data
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) benchmarks/loader_throughput.py
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/kfac_overhead.py --case a
	$(PY) benchmarks/kfac_comm.py
	$(PY) benchmarks/study.py
	$(PY) benchmarks/report.py

# The prepared GPU check (docs/gpu.md): needs no venv; on a machine without CUDA it says so and exits 0.
# Writes gpu_check.json / gpu_check.txt to $OUT (the device machine's result folder), else build/gpu_check.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out "$${OUT:-build/gpu_check}" $(GPU_CHECK_ARGS)

# The study variant (docs/gpu.md): study v2's SmallCNN cells on one GPU in about 7 minutes (carry data/).
gpu-study:
	$(PYTHON) benchmarks/gpu_check.py --study --out "$${OUT:-build/gpu_study}" $(GPU_CHECK_ARGS)

# Wheels the GPU machine lacks and cannot download (no package registry there): carry build/gpu_wheels.
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d build/gpu_wheels \
		"asdfghjkl==0.1a5"

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs lbo_runs

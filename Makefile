# Two commands do everything: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse .venv and install the project into it. torch 2.13.0 (CPU build) is
# installed only when no torch is importable yet: GPU users install their CUDA torch first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cse-ray-installed

.PHONY: setup demo smoke test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cse-ray pipeline --config configs/demo.yaml --out runs/demo

smoke: $(STAMP)
	$(VENV)/bin/cse-ray pipeline --config configs/smoke.yaml --out runs/smoke

test: $(STAMP)
	$(PY) -m ruff check cse_ray jobs tests benchmarks
	$(PY) -m pytest -q tests

test-fast: $(STAMP)   # everything that does not start Ray, in about a minute
	$(PY) -m ruff check cse_ray jobs tests benchmarks
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check cse_ray jobs tests benchmarks

clean:
	rm -rf runs .pytest_cache

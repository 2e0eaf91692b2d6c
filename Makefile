# Two entry points on a fresh machine: `make repro` and `make test`.
# The virtual environment is created once and refreshed when pyproject.toml changes.
# TORCH_SPEC is installed first so that no unwanted CUDA build is pulled on CPU machines;
# on a GPU machine use e.g. `make repro TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

repro: setup
	$(VENV)/bin/dvc repro

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

# The same checks as .pre-commit-config.yaml: lint, format, types.
LINT_PATHS := forcenet pipeline tests benchmarks
lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/python benchmarks/bench_data.py
	$(VENV)/bin/python benchmarks/bench_models.py
	$(VENV)/bin/python benchmarks/bench_relax.py

clean-venv:
	rm -rf $(VENV)

# Two entry points on a fresh machine: `make repro` and `make test`.
# The virtual environment is created once and refreshed when pyproject.toml changes.
# TORCH_SPEC is installed first so that no unwanted CUDA build is pulled on CPU machines;
# on a GPU machine use e.g. `make repro TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test lint bench exp show plots compare mlflow dvc clean-venv

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# CPU_PIN=avx2 (`make repro CPU_PIN=avx2`, also for `make exp`): every stage runs on the AVX2
# code paths of numpy, OpenBLAS and torch, so that an AVX-512 machine computes what an AVX2
# machine does (pipeline/cpu_pin.py). Off by default.
CPU_PIN ?=
PIN := $(if $(CPU_PIN),$(VENV)/bin/python -m pipeline.cpu_pin $(CPU_PIN) --,)

repro: setup
	$(PIN) $(VENV)/bin/dvc repro

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

# The same checks as .pre-commit-config.yaml: lint, format, types.
LINT_PATHS := forcenet pipeline tests benchmarks
lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# The DVC and MLflow commands of the README, run inside the environment (so a stage never
# starts without it), e.g. `make exp ARGS="-S model.hidden=128"`.
ARGS ?=
exp: setup
	$(PIN) $(VENV)/bin/dvc exp run $(ARGS)

# A screen-sized `dvc exp show`: ForceNet's width and its in-domain force MAE, overall and
# on adsorbate atoms (`make compare` tabulates every model, experiment and split).
show: setup
	$(VENV)/bin/dvc exp show --no-pager --drop '.*' \
	  --keep 'Experiment|model\.hidden|.*forcenet\.json:val_id\.forces_mae(_adsorbate)?$$' $(ARGS)

plots: setup
	$(VENV)/bin/dvc plots show $(ARGS)

compare: setup
	$(VENV)/bin/python -m pipeline.compare $(ARGS)

mlflow: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db $(ARGS)

dvc: setup
	$(VENV)/bin/dvc $(ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/bench_data.py
	$(VENV)/bin/python benchmarks/bench_models.py
	$(VENV)/bin/python benchmarks/bench_relax.py

clean-venv:
	rm -rf $(VENV)

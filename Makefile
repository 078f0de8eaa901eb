# `make test` works from a fresh clone: it bootstraps .venv, pins the local CPU torch wheel first
# (an unpinned torch pulls a multi-GB CUDA build), installs the package with its dev extras, then
# runs ruff and pytest.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

LINT_PATHS := $(wildcard src tests examples benchmarks)

.PHONY: test lint format demo install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: install
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: install
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

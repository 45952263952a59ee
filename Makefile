# Developer entry points. `make install` is idempotent: it reinstalls only when pyproject.toml changes.

PYTHON ?= python3.11
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp

.PHONY: install up test lint bench clean distclean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes first, pinned: with the local wheel mirror this is the CPU build. Letting `.[worker]` resolve a
# plain "torch" would pull the much larger CUDA build instead.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -e '.[worker,dev]'
	@touch $@

up: install
	$(BIN)/distill up

# Everything, including the integration and slow tests (-m "" overrides any marker filter).
test: install
	$(BIN)/python -m pytest -q -m "" tests

lint: install
	$(BIN)/ruff check app worker tests
	$(BIN)/lint-imports

# Benchmarks live in bench/ (a `python -m bench` entry point).
bench: install
	$(BIN)/python -m bench

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .import_linter_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also drops the virtualenv and the local data (SQLite database, store, var/local-api-key).
distclean: clean
	rm -rf $(VENV) var

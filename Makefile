# catgrad: `make train` (one run, default experiment) and `make test` (the test suite).
# Each target creates .venv and installs the project (editable, with dev extras) when needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m experiments.train $(ARGS)

test: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf outputs multirun wandb .pytest_cache

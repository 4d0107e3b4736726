# catgrad: `make compare` (every estimator x seeds on digits, then the report), `make train` (one
# run, default experiment) and `make test` (the test suite).
# Each target creates .venv and installs the project (editable, with dev extras) when needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=
# One pytest worker per core (pytest-xdist); a test file stays on one worker, so module-scoped
# fixtures (the SLURM cluster) start once. TEST_WORKERS= runs the suite in one process.
TEST_WORKERS ?= -n auto --dist loadfile

.PHONY: install compare train test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The sweep of conf/experiment/compare_estimators.yaml, then its report (even when a job failed;
# the exit status is the sweep's). ARGS are extra overrides, e.g. ARGS="seed=0,1,2,3,4".
compare: $(STAMP)
	@stamp=$$(date +%Y-%m-%d_%H-%M-%S); dir=multirun/compare_estimators/$$stamp; \
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m experiments.train -m \
	  experiment=compare_estimators hydra.sweep.dir=$$dir sweep_name=compare_estimators_$$stamp \
	  $(ARGS); status=$$?; \
	$(BIN)/python -m experiments.report $$dir --log-wandb --group compare_estimators_$$stamp \
	  || status=$$?; \
	echo "wandb group: compare_estimators_$$stamp (offline runs: wandb sync $$dir/*/wandb/offline-run-*)"; \
	exit $$status

train: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m experiments.train $(ARGS)

test: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(BIN)/python -m pytest -q $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy estimators models datamodules experiments

clean:
	rm -rf outputs multirun wandb .pytest_cache

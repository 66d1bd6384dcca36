PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint fmt fuzz bench crash clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/parley serve --dev

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix-only --quiet . || true
	$(BIN)/ruff format --quiet .

# Schemathesis with a larger example budget than `make test` uses.
fuzz: $(STAMP)
	PARLEY_FUZZ_EXAMPLES=$${PARLEY_FUZZ_EXAMPLES:-100} $(BIN)/python -m pytest tests/test_fuzz.py

# Benchmarks and the crash harness: opt-in, never part of `make test` (see bench/).
bench: $(STAMP)
	$(BIN)/python bench/run.py

crash: $(STAMP)
	$(BIN)/python bench/crash.py --kills 100

clean:
	rm -rf $(VENV) build *.egg-info

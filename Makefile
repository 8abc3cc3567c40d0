# Two commands for a fresh machine: `make study` runs the main job, `make test` the checks.
# Both create .venv (pip only) when it is missing or pyproject.toml has changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDY ?= studies/quick.yaml

.PHONY: study test

study: $(VENV)/.installed
	$(BIN)/gvae study run $(STUDY)

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# One virtualenv (.venv) holds the client, the server extra and the dev tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test bench proto lint format demo

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[server,dev]"
	touch $(STAMP)

serve: install
	$(BIN)/vitscope serve

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/activations.py

proto: install
	$(BIN)/python proto/generate.py

lint: install
	$(BIN)/ruff check server client tests bench proto
	$(BIN)/ruff format --check server client tests bench proto
	$(BIN)/mypy

format: install
	$(BIN)/ruff format server client tests bench proto
	$(BIN)/ruff check --fix server client tests bench proto

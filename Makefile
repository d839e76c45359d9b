# One virtualenv (.venv) holds the client, the server extra and the dev tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# buf (proto lint and breaking-change checks) from npm, kept beside the virtualenv.
BUF_VERSION := 1.75.0
BUF := $(VENV)/npm/node_modules/.bin/buf

DEMO_PORT ?= 50061

.PHONY: install serve test bench proto docs lint format demo

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[server,dev]"
	npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/npm @bufbuild/buf@$(BUF_VERSION)
	touch $(STAMP)

serve: install
	$(BIN)/vitscope serve

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

BENCHMARKS := activations feature_viz class_projection inversion oip

# Every benchmark in turn; each prints its JSON object last. One: make bench-inversion.
bench: $(addprefix bench-,$(BENCHMARKS))

bench-%: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/$*.py

proto: install
	$(BIN)/python proto/generate.py

# docs/api.md from the protos and their comments.
docs: install
	$(BIN)/python proto/docgen.py

lint: install
	$(BUF) lint
	$(BIN)/ruff check server client tests bench proto
	$(BIN)/ruff format --check server client tests bench proto
	$(BIN)/mypy

format: install
	$(BIN)/ruff format server client tests bench proto
	$(BIN)/ruff check --fix server client tests bench proto

# Starts a server on DEMO_PORT, writes the demo into demo-out/, stops the server.
demo: install
	@$(BIN)/vitscope serve --port $(DEMO_PORT) --metrics-port -1 & pid=$$!; \
	trap "kill $$pid" EXIT; \
	for i in $$(seq 120); do $(BIN)/vitscope --target localhost:$(DEMO_PORT) health 2>/dev/null | grep -qx SERVING && break; sleep 1; done; \
	$(BIN)/vitscope --target localhost:$(DEMO_PORT) demo --out demo-out

# One virtualenv (.venv) holds the client, every extra (server, train, demo) and the dev tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# buf (proto lint and breaking-change checks) from npm, kept beside the virtualenv.
BUF_VERSION := 1.75.0
BUF := $(VENV)/npm/node_modules/.bin/buf

DEMO_PORT ?= 50061

.PHONY: install serve test test-fast fuzz bench proto lint format demo docs samples gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[server,train,demo,dev]"
	npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/npm @bufbuild/buf@$(BUF_VERSION)
	touch $(STAMP)

serve: install
	$(BIN)/vitscope-server serve

# VITSCOPE_TEST_DEVICE=cuda make test: the test servers compute on the GPU; -rs says what
# was skipped and why.
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs --durations=15

# The inner loop: unit and integration tests, without the deployment, demo, zoo and fuzz runs.
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs --durations=10 tests/unit tests/integration

# The long fuzz run; `make test` runs a short one. Bounded in examples per RPC and in time.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 1800
fuzz: install
	HF_HUB_OFFLINE=1 VITSCOPE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) VITSCOPE_FUZZ_SECONDS=$(FUZZ_SECONDS) \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/system/test_fuzz.py

BENCHMARKS := activations feature_viz class_projection inversion oip explain serving load

# Every benchmark in turn; each prints its JSON object last. One: make bench-inversion.
bench: $(addprefix bench-,$(BENCHMARKS))

bench-%: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/$*.py

# The CUDA tests and every benchmark on the GPU, JSON summary last. Needs no virtualenv:
# `make gpu-check PY=python3` runs with any interpreter that has the dependencies.
PY ?= $(BIN)/python
gpu-check:
	PYTHONPATH=$(CURDIR)/client:$(CURDIR)/server$${PYTHONPATH:+:$$PYTHONPATH} HF_HUB_OFFLINE=1 \
		$(PY) bench/gpu_check.py

proto: install
	$(BIN)/python proto/generate.py

# Pages generated from the code (tests fail while they are stale): the API reference from the
# protos and their comments, the configuration from the settings. Checkout-only tools live in
# tools/, outside the installed package.
docs: install
	$(BIN)/python proto/docgen.py
	$(BIN)/python tools/settings_docs.py docs/configuration.md

# The client's sample digits (the first held-out test digit of each class); a test checks them.
samples: install
	$(BIN)/python tools/export_samples.py

lint: install
	$(BUF) lint
	$(BIN)/ruff check server client tests bench proto tools
	$(BIN)/ruff format --check server client tests bench proto tools
	$(BIN)/mypy

format: install
	$(BIN)/ruff format server client tests bench proto tools
	$(BIN)/ruff check --fix server client tests bench proto tools

# Starts a server on DEMO_PORT, writes the demo into demo-out/, stops the server.
demo: install
	@$(BIN)/vitscope-server serve --port=$(DEMO_PORT) --metrics-port=-1 & pid=$$!; \
	trap "kill $$pid" EXIT; \
	for i in $$(seq 120); do $(BIN)/vitscope --target localhost:$(DEMO_PORT) health 2>/dev/null | grep -qx SERVING && break; sleep 1; done; \
	$(BIN)/vitscope --target localhost:$(DEMO_PORT) demo --out demo-out

# One virtualenv (.venv) holds the client, every extra (server, train, demo) and the dev tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# buf (proto lint and breaking-change checks) from npm, kept beside the virtualenv.
BUF_VERSION := 1.75.0
BUF := $(VENV)/npm/node_modules/.bin/buf

DEMO_PORT ?= 50061
DEMO_UI_PORT ?= 8061
# The browser the explorer's tests, benchmark and screenshots drive (Playwright cannot
# download its own here): Debian's chromium, installed by `make install` when missing.
CHROMIUM := /usr/bin/chromium

.PHONY: install serve test test-fast fuzz bench proto lint format demo docs samples gpu-check builtin-sae

install: $(STAMP) $(CHROMIUM)

# Needs root on Debian or Ubuntu (as CI runs); elsewhere install chromium yourself.
$(CHROMIUM):
	apt-get update && apt-get install -y --no-install-recommends chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[server,train,demo,dev]"
	npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/npm @bufbuild/buf@$(BUF_VERSION)
	touch $(STAMP)

serve: install
	@echo "explorer: http://localhost:$${VITSCOPE_UI_PORT:-8080}/ (gRPC on :$${VITSCOPE_PORT:-50051})"
	$(BIN)/vitscope-server serve

# VITSCOPE_TEST_DEVICE=cuda make test: the test servers compute on the GPU; -rs says what
# was skipped and why.
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs --durations=15

# The inner loop: unit and integration tests, without the deployment, demo, zoo and fuzz runs.
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs --durations=10 tests/unit tests/integration

# The long fuzz run; `make test` runs a short one. Bounded in examples per RPC and in time.
# Prints the status codes reached and the server's resident memory at start, peak and end;
# fails when the end is over FUZZ_MAX_GROWTH times the start.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 1800
FUZZ_MAX_GROWTH ?= 1.2
fuzz: install
	HF_HUB_OFFLINE=1 VITSCOPE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) VITSCOPE_FUZZ_SECONDS=$(FUZZ_SECONDS) \
		VITSCOPE_FUZZ_MAX_GROWTH=$(FUZZ_MAX_GROWTH) \
		$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/system/test_fuzz.py

BENCHMARKS := activations feature_viz projection inversion oip explain serving load compiled interventions explorer sae

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

# The built-in SAE of vitscope-digits (server/vitscope_server/builtin/saes/SAE_CARD.md):
# activations of the training digits, a TopK SAE trained on them, measured on the held-out
# digits. The checkpoint and the datasets stay in build/.
SAE_SITE := blocks.3.out
BUILTIN_SAE := server/vitscope_server/builtin/saes/vitscope-digits/resid3-topk
builtin-sae: install
	rm -rf build/builtin-sae
	$(BIN)/vitscope-server extract --model vitscope-digits --data builtin-digits-train \
		--site $(SAE_SITE) --out build/builtin-sae/train --device cpu
	$(BIN)/vitscope-server extract --model vitscope-digits --data builtin-digits \
		--site $(SAE_SITE) --out build/builtin-sae/test --device cpu
	$(BIN)/vitscope-server train-sae --dataset build/builtin-sae/train \
		--eval-dataset build/builtin-sae/test --out build/builtin-sae/sae --device cpu \
		--kind topk --expansion 8 --latents-per-token 16 --batch-size 1024 --steps 3000 \
		--warmup-steps 100 --lr 0.0004 --seed 0 --log-every 500
	mkdir -p $(BUILTIN_SAE)
	cp build/builtin-sae/sae/cfg.json build/builtin-sae/sae/sae_weights.safetensors \
		build/builtin-sae/sae/sparsity.safetensors $(BUILTIN_SAE)/
	$(BIN)/vitscope-server evaluate-sae --model vitscope-digits --sae resid3-topk \
		--data builtin-digits --device cpu | tail -1 > $(BUILTIN_SAE)/evaluation.json

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

# Starts a server on DEMO_PORT (explorer on DEMO_UI_PORT), writes the demo and a screenshot of
# every explorer page (explorer-*.png) into demo-out/, stops the server.
demo: install
	@$(BIN)/vitscope-server serve --port=$(DEMO_PORT) --metrics-port=-1 --ui-port=$(DEMO_UI_PORT) & pid=$$!; \
	trap "kill $$pid" EXIT; \
	for i in $$(seq 120); do $(BIN)/vitscope --target localhost:$(DEMO_PORT) health 2>/dev/null | grep -qx SERVING && break; sleep 1; done; \
	$(BIN)/vitscope --target localhost:$(DEMO_PORT) demo --out demo-out && \
	$(BIN)/python tools/explorer_browser.py --url http://localhost:$(DEMO_UI_PORT) --out demo-out

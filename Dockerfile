# syntax=docker/dockerfile:1
# modelserve: the server image, with the default model zoo built in (or mount / fetch your own repository).
#
#   docker build -t modelserve .                                    # CPU, zoo built in a build stage (~10 min, 2 cores)
#   docker build --build-arg BUILD_ZOO=0 -t modelserve .           # server only; models from a volume or a URL
#   docker build --build-arg VARIANT=gpu -t modelserve:0.1.0-gpu . # onnxruntime-gpu with CUDA + cuDNN pip wheels
#   docker build --build-arg VARIANT=gpu --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 ...
#                                                                   # or on NVIDIA's CUDA base (needs python3 there)
#   docker build --build-arg PIP_INDEX_URL=https://mirror/simple --secret id=pip_ca,src=/etc/ssl/certs/ca.pem ...
#   docker run -p 8000:8000 -p 8001:8001 -p 8002:8002 [-v $PWD/model_repository:/models:ro] modelserve
#
# Dependencies come from requirements/server-$VARIANT.lock (exact versions) in a layer of their own, before the
# source, so a code change does not reinstall them. Package indexes are build args and a CA bundle is a build
# secret: nothing about this build machine is written into the image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=${PYTHON_IMAGE}

FROM ${PYTHON_IMAGE} AS zoo
ARG BUILD_ZOO=1
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
# NOTE: the CPU index keeps pip from pulling several GB of CUDA packages for torch==2.13.0 (training only).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements requirements
COPY service service
COPY models models
COPY export export
COPY loadtests loadtests
RUN --mount=type=secret,id=pip_ca \
    mkdir -p /models && if [ "$BUILD_ZOO" = "1" ]; then \
      if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
      [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
      apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/* && \
      python3 -m venv /opt/zoo && \
      /opt/zoo/bin/pip install -c requirements/server-cpu.lock --extra-index-url "$TORCH_INDEX_URL" '.[train]' && \
      /opt/zoo/bin/modelserve build --profile default --model-repository /models ; \
    fi && chmod -R a+rX,go-w /models

FROM ${RUNTIME_IMAGE} AS runtime
ARG VARIANT=cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/modelserve PATH=/opt/modelserve/bin:$PATH TMPDIR=/tmp \
    MODELSERVE_MODEL_REPOSITORY=/models MODELSERVE_HTTP_PORT=8000 MODELSERVE_GRPC_PORT=8001 \
    MODELSERVE_METRICS_PORT=8002 ORT_DISABLE_TELEMETRY=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
# NOTE: ORT_DISABLE_TELEMETRY: onnxruntime 1.29+ on Linux otherwise writes a device id and an event cache under
# $HOME/.cache/Microsoft (and `.ses` in /tmp or the working directory) and uploads usage events to
# mobile.events.data.microsoft.com (microsoft/onnxruntime#27379); a server pod phones nowhere.
# libsndfile for WAV decoding; python3-venv where the base lacks ensurepip (Debian's, Ubuntu's CUDA images).
# NOTE: apt-get clean and the package caches removed: a base without Docker's apt "docker-clean" hook (a
# debootstrapped one) otherwise keeps the downloaded .debs and pkgcache.bin, 78 MB of the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 \
       $(python3 -c 'import ensurepip' 2>/dev/null || echo python3-venv) \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && python3 -m venv --without-pip /opt/modelserve \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/modelserve --shell /usr/sbin/nologin modelserve
WORKDIR /app
# NOTE: the server's venv has no pip or setuptools (27 MB): each install runs a throwaway pip from /tmp against
# it (`pip --python`), removed in the same layer; the chart's read-only root installs nothing at run time anyway.
# Dependency layer: changes only when a lock changes. On the GPU variant, the CUDA / cuDNN libraries of
# NVIDIA's wheels are registered with the loader (ld.so.conf.d), so no LD_LIBRARY_PATH is needed.
COPY requirements requirements
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    python3 -m venv /tmp/pip && /tmp/pip/bin/pip --python /opt/modelserve/bin/python install -q \
       -r "requirements/server-$VARIANT.lock" && rm -rf /tmp/pip \
    && if [ "$VARIANT" = gpu ]; then \
      find /opt/modelserve -path '*/nvidia/*' -name 'lib*.so*' -printf '%h\n' | sort -u > /etc/ld.so.conf.d/modelserve-nvidia.conf \
      && ldconfig; \
    fi
# Source layer.
COPY pyproject.toml README.md ./
COPY service service
COPY models models
COPY export export
COPY loadtests loadtests
# NOTE: --no-deps: the lock is the whole dependency set. The GPU variant has onnxruntime-gpu where the package
# metadata names onnxruntime (same import), so `pip check` runs on the CPU variant only.
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    python3 -m venv /tmp/pip && pip="/tmp/pip/bin/pip --python /opt/modelserve/bin/python" \
    && $pip install -q --no-deps . && if [ "$VARIANT" = cpu ]; then $pip check; fi && rm -rf /tmp/pip
# Models: owned by root, readable and not writable by the server.
COPY --from=zoo /models /models
USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('MODELSERVE_HTTP_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/v2/health/ready', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["modelserve", "serve"]

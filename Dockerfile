# syntax=docker/dockerfile:1
# modelserve: the server image, with the default model zoo built in (or mount your own repository).
#
#   docker build -t modelserve .                       # builds the zoo in a build stage (~10 min on 2 cores)
#   docker build --build-arg BUILD_ZOO=0 -t modelserve . # server only; mount a repository at /models
#   docker run -p 8000:8000 -p 8001:8001 -p 8002:8002 [-v $PWD/model_repository:/models] modelserve
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS zoo
ARG BUILD_ZOO=1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service service
COPY models models
COPY export export
COPY loadtests loadtests
# NOTE: the CPU index keeps pip from pulling several GB of CUDA packages for torch==2.13.0 (training only).
RUN mkdir -p /models && if [ "$BUILD_ZOO" = "1" ]; then \
      apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/* && \
      pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[train]' && \
      modelserve build --profile default --model-repository /models ; \
    fi

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    MODELSERVE_MODEL_REPOSITORY=/models MODELSERVE_HTTP_PORT=8000 MODELSERVE_GRPC_PORT=8001 \
    MODELSERVE_METRICS_PORT=8002
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service service
COPY models models
COPY export export
COPY loadtests loadtests
# Server dependencies only (no torch): onnxruntime, fastapi/uvicorn, tritonclient's protobufs, ...
RUN pip install . && useradd --system --uid 10001 modelserve
COPY --from=zoo --chown=modelserve /models /models
USER modelserve
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready').status != 200)"
ENTRYPOINT ["modelserve", "serve"]

"""KServe V2 over HTTP. Handlers only parse, call the InferenceCore and serialize."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.access import ASGIApp, read_control_body, wrap_http_app
from service.core import InferenceCore
from service.errors import InvalidInput, ServingError, error_document, unexpected
from service.http_docs import install_docs
from service.http_extensions import add_extension_routes
from service.http_infer import InferFastPath
from service.metrics import CONTENT_TYPE, exposition
from service.modelrepo.config import config_as_json
from service.modelrepo.overrides import FILE_PREFIX
from service.settings import ServerSettings
from service.tasks.openai_embeddings import build_openai_router
from service.tasks.router import build_router

log = logging.getLogger("modelserve.http")

_JSON = "application/json"


def json_response(doc: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=_JSON, headers=headers)


def error_response(exc: ServingError, *, path: str = "") -> Response:
    return json_response(error_document(exc, path=path), exc.status_code, exc.headers or None)


def create_app(core: InferenceCore, settings: ServerSettings) -> ASGIApp:
    """The ASGI application: access control (service/access.py, only when something is enforced), then the infer
    fast path in front of FastAPI. The server (service/server.py) owns the lifecycle of the repository and the
    transports; this app only parses, calls the core and serializes."""
    app = FastAPI(
        title="modelserve",
        version=__version__,
        description="KServe V2 / Triton-compatible inference server with dynamic batching on ONNX Runtime.",
        docs_url=None,  # served by install_docs from local assets (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    _install_error_handlers(app)
    _add_health_routes(app, core)
    _add_model_routes(app, core)
    _add_repository_routes(app, core, max_request_bytes=settings.max_request_bytes)
    add_extension_routes(app, core)
    _document_infer_routes(app)
    app.include_router(build_router(core, max_request_bytes=settings.max_request_bytes,
                                    body_timeout_s=settings.http_body_timeout_secs))
    app.include_router(build_openai_router(core, max_request_bytes=settings.max_request_bytes,
                                           body_timeout_s=settings.http_body_timeout_secs))
    install_docs(app)

    if settings.allow_metrics:  # Triton's --allow-metrics=false: no metrics anywhere
        @app.get("/metrics", tags=["metrics"], summary="Prometheus metrics (Triton's names)")
        async def prometheus() -> Response:
            return Response(exposition(core.metrics.registry), media_type=CONTENT_TYPE)

    return wrap_http_app(InferFastPath(app, core=core, max_request_bytes=settings.max_request_bytes,
                                       body_timeout_s=settings.http_body_timeout_secs), settings)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> Response:
        return error_response(exc, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(InvalidInput(f"invalid request: {exc.errors()}"), path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        method, path = request.method, request.url.path
        allowed = (exc.headers or {}).get("Allow")
        if exc.status_code == 404:
            message = f"no route for {method} {path}"
        elif exc.status_code == 405 and allowed:  # Starlette's detail was only "Method Not Allowed"
            message = f"method {method} is not allowed on {path}; it serves {allowed}"
        else:
            message = exc.detail
        error = ServingError(message)
        error.status_code = exc.status_code
        # NOTE: the headers were dropped, and with them 405's Allow (RFC 9110 §15.5.6: MUST).
        return json_response(error_document(error, path=path), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        # the type only: its text carried temporary paths to clients
        return error_response(unexpected(exc), path=request.url.path)


def _add_health_routes(app: FastAPI, core: InferenceCore) -> None:
    @app.get("/", tags=["health"], summary="Server liveness for KServe V1 clients")
    async def v1_live() -> Response:
        # KServe's V1 protocol checks liveness with GET / and reads {"status": "alive"}.
        live = core.live()
        return json_response({"status": "alive" if live else "not alive"}, 200 if live else 503)

    @app.get("/v2/health/live", tags=["health"], summary="Server liveness")
    async def live() -> Response:
        return json_response({"live": core.live()})

    @app.get("/v2/health/ready", tags=["health"], summary="Server readiness")
    async def ready() -> Response:
        ok = core.ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    @app.get("/v2", tags=["health"], summary="Server metadata")
    async def server_metadata() -> Response:
        return json_response(core.server_metadata())


def _add_model_routes(app: FastAPI, core: InferenceCore) -> None:
    # Stats routes first: "/v2/models/stats" must not be read as a model named "stats".
    @app.get("/v2/models/stats", tags=["statistics"], summary="Statistics of every loaded model")
    async def all_stats() -> Response:
        return json_response(core.statistics(None, None))

    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        _add_model_prefix_routes(app, core, prefix)


def _add_model_prefix_routes(app: FastAPI, core: InferenceCore, prefix: str) -> None:
    @app.get(prefix + "/stats", tags=["statistics"], summary="Statistics of one model (or version)")
    async def stats(model_name: str, model_version: str | None = None) -> Response:
        return json_response(core.statistics(model_name, model_version))

    @app.get(prefix, tags=["models"], summary="Model metadata")
    async def metadata(model_name: str, model_version: str | None = None) -> Response:
        return json_response(core.model_metadata(model_name, model_version))

    @app.get(prefix + "/ready", tags=["models"], summary="Model readiness")
    async def model_ready(model_name: str, model_version: str | None = None) -> Response:
        core.model(model_name, model_version)  # 404 / 503 with the reason when not ready
        return json_response({"name": model_name, "ready": True})

    @app.get(prefix + "/config", tags=["models"], summary="Model configuration (Triton ModelConfig as JSON)")
    async def config(model_name: str, model_version: str | None = None) -> Response:
        config = core.served_config(model_name, model_version)
        return json_response(config_as_json(config))


def _document_infer_routes(app: FastAPI) -> None:
    """Put the infer routes (served by InferFastPath, not FastAPI) into the OpenAPI schema."""
    example = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[0.5, 1.0, 2.0, 4.0]]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
    }
    operation = {
        "tags": ["inference"],
        "summary": "Run inference (KServe V2: JSON, or JSON header + raw tensors with the binary data extension)",
        "description": (
            "Binary tensor data extension: send the JSON header, then the raw tensor bytes, with header "
            "`Inference-Header-Content-Length` giving the JSON length and `parameters.binary_data_size` on each "
            "binary input; ask for binary outputs with `parameters.binary_data_output` or per-output "
            "`binary_data`. Errors: 400 bad input, 404 unknown model/version, 413 too large, 503 not ready, "
            "queue full (Retry-After) or timed out in the queue (\"Request timeout expired\")."
        ),
        "requestBody": {"required": True, "content": {_JSON: {"example": example},
                                                      "application/octet-stream": {}}},
        "responses": {"200": {"description": "Inference outputs"}, "400": {"description": "Bad input"},
                      "404": {"description": "Unknown model or version"},
                      "503": {"description": "Not ready or queue full"}},
    }
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            for path, params in (("/v2/models/{model_name}/infer", ["model_name"]),
                                 ("/v2/models/{model_name}/versions/{model_version}/infer",
                                  ["model_name", "model_version"])):
                parameters = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                              for p in params]
                schema["paths"][path] = {"post": {**operation, "parameters": parameters,
                                                  "operationId": "infer_" + "_".join(params)}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _load_overrides(name: str, doc: dict) -> tuple[object | None, dict[str, bytes]]:
    """Triton's load parameters over HTTP: 'config' (JSON text) and 'file:<path>' (base64 file contents)."""
    params = doc.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise InvalidInput(f"failed to load '{name}': 'parameters' must be a JSON object")
    files = {}
    for key, value in params.items():
        if key.startswith(FILE_PREFIX):
            try:
                files[key[len(FILE_PREFIX):]] = base64.b64decode(value, validate=True)
            except (TypeError, ValueError):
                raise InvalidInput(f"failed to load '{name}': parameter {key!r} must be the file's contents "
                                   "as a base64 string") from None
    return params.get("config"), files


def _unload_dependents(name: str, doc: dict) -> bool:
    """Triton's unload parameter `unload_dependents` (tritonclient always sends it, false by default)."""
    params = doc.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise InvalidInput(f"failed to unload '{name}': 'parameters' must be a JSON object")
    value = params.get("unload_dependents", False)
    if not isinstance(value, bool):
        raise InvalidInput(f"failed to unload '{name}': 'unload_dependents' must be true or false, got {value!r:.80}")
    return value


def _add_repository_routes(app: FastAPI, core: InferenceCore, *, max_request_bytes: int) -> None:
    @app.post("/v2/repository/index", tags=["repository"], summary="Models in the repository and their state")
    async def index(request: Request) -> Response:
        doc = await read_control_body(request, limit=max_request_bytes)
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput(f"repository index: 'ready' must be true or false, got {ready!r:.80}")
        return json_response(core.repository_index(ready_only=ready))

    @app.post("/v2/repository/models/{model_name}/load", tags=["repository"], summary="Load or reload a model")
    async def load(model_name: str, request: Request) -> Response:
        config, files = _load_overrides(model_name, await read_control_body(request, limit=max_request_bytes))
        await core.load_model(model_name, config=config, files=files)
        return json_response({})

    @app.post("/v2/repository/models/{model_name}/unload", tags=["repository"], summary="Unload a model")
    async def unload(model_name: str, request: Request) -> Response:
        doc = await read_control_body(request, limit=max_request_bytes)
        await core.unload_model(model_name, unload_dependents=_unload_dependents(model_name, doc))
        return json_response({})

"""KServe V2 over HTTP. Handlers only parse, call the InferenceCore and serialize."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core import InferenceCore
from service.errors import InvalidInput, PayloadTooLarge, RequestCancelled, ServingError, UnsupportedMediaType
from service.metrics import Metrics
from service.protocol_v2 import decode_request, encode_response
from service.repository import ModelRepository
from service.settings import ServerSettings

log = logging.getLogger("modelserve.http")

HEADER_LENGTH = "inference-header-content-length"
_JSON = "application/json"


def json_response(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=_JSON, headers=headers)


def error_response(exc: ServingError) -> Response:
    return json_response({"error": exc.message}, exc.status_code, exc.headers or None)


async def read_body(request: Request, *, limit: int) -> bytes:
    """The request body, decompressed (gzip/deflate), refusing more than `limit` bytes either way."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or identity")
    # max_length bounds the output so a small compressed bomb cannot exhaust memory.
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    return out


async def _cancel_on_disconnect(request: Request, task: asyncio.Task, flag: list[bool]) -> None:
    """Cancel the handler when the client goes away, so its row is dropped before compute is spent on it."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            flag.append(True)
            task.cancel()
            return


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI application: lifespan owns the repository; routes delegate to the core."""
    repository = ModelRepository(settings)
    metrics = Metrics(lambda: [mv.stats for mv in repository.ready_versions()])
    core = InferenceCore(repository, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await repository.start()
        yield
        await repository.close()

    app = FastAPI(
        title="modelserve",
        version="0.1.0",
        description="KServe V2 / Triton-compatible inference server with dynamic batching on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.core = core
    app.state.settings = settings
    _install_error_handlers(app)
    _add_health_routes(app, core)
    _add_model_routes(app, core)
    _add_infer_routes(app, core, settings)
    _add_repository_routes(app, core)

    @app.get("/metrics", tags=["metrics"], summary="Prometheus metrics (Triton's names)")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(_: Request, exc: ServingError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": f"invalid request: {exc.errors()}"}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if exc.status_code != 404 else f"no route for {request.method} {request.url.path}"
        return json_response({"error": message}, exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)


def _add_health_routes(app: FastAPI, core: InferenceCore) -> None:
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
        core.repository.get(model_name, model_version)  # 404 / 503 with the reason when not ready
        return json_response({"name": model_name, "ready": True})

    @app.get(prefix + "/config", tags=["models"], summary="Model configuration (Triton ModelConfig as JSON)")
    async def config(model_name: str, model_version: str | None = None) -> Response:
        return json_response(core.model_config(model_name, model_version))


def _add_infer_routes(app: FastAPI, core: InferenceCore, settings: ServerSettings) -> None:
    limit = settings.max_request_bytes

    async def infer(request: Request, model_name: str, model_version: str | None) -> Response:
        body = await read_body(request, limit=limit)
        req = decode_request(
            body, header_length=_header_length(request), model_name=model_name, model_version=model_version
        )
        task = asyncio.current_task()
        assert task is not None
        gone: list[bool] = []
        watcher = asyncio.create_task(_cancel_on_disconnect(request, task, gone))
        try:
            resp = await core.infer(req)
        except RequestCancelled as exc:
            if gone:
                task.uncancel()
                return error_response(exc)  # nobody reads it; the connection is closed
            raise
        finally:
            watcher.cancel()
        payload, header_len = encode_response(resp, binary_default=bool(req.parameters.get("binary_data_output")))
        if header_len is None:
            return Response(payload, media_type=_JSON)
        return Response(
            payload, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_len)}
        )

    doc: dict[str, Any] = {
        "summary": "Run inference (KServe V2; JSON or binary tensor data extension)",
        "tags": ["inference"],
        "openapi_extra": {
            "requestBody": {
                "content": {
                    _JSON: {
                        "example": {
                            "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
                            "outputs": [{"name": "output"}],
                        }
                    }
                }
            }
        },
    }

    @app.post("/v2/models/{model_name}/infer", **doc)
    async def infer_latest(request: Request, model_name: str) -> Response:
        return await infer(request, model_name, None)

    @app.post("/v2/models/{model_name}/versions/{model_version}/infer", **doc)
    async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
        return await infer(request, model_name, model_version)


def _add_repository_routes(app: FastAPI, core: InferenceCore) -> None:
    @app.post("/v2/repository/index", tags=["repository"], summary="Models in the repository and their state")
    async def index(request: Request) -> Response:
        body = await request.body()
        try:
            doc = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"repository index body must be JSON like {{\"ready\": true}}: {exc}") from None
        ready_only = bool(doc.get("ready")) if isinstance(doc, dict) else False
        return json_response(core.repository_index(ready_only=ready_only))

    @app.post("/v2/repository/models/{model_name}/load", tags=["repository"], summary="Load or reload a model")
    async def load(model_name: str) -> Response:
        await core.load_model(model_name)
        return json_response({})

    @app.post("/v2/repository/models/{model_name}/unload", tags=["repository"], summary="Unload a model")
    async def unload(model_name: str) -> Response:
        await core.unload_model(model_name)
        return json_response({})

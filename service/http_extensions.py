"""Triton's extension routes over HTTP: system shared memory, CUDA shared memory (refused), trace and logging.

Handlers only parse, call the InferenceCore and serialize, as the other routes in service/http_app.py.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from service.access import read_control_body
from service.core import InferenceCore
from service.errors import InvalidInput
from service.shm import CUDA_UNSUPPORTED, cuda_region_missing, cuda_register_refused

_SHM = "/v2/systemsharedmemory"
_CUDA = "/v2/cudasharedmemory"


def _json(doc: object) -> Response:
    return Response(orjson.dumps(doc), media_type="application/json")


async def _body(request: Request, core: InferenceCore) -> dict[str, Any]:
    return await read_control_body(request, limit=core.max_request_bytes)


def _int_field(doc: dict, key: str, *, default: int | None = None) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"failed to register shared memory region: invalid args: '{key}' must be a "
                           f"non-negative integer, got {value!r}")
    return value


def add_extension_routes(app: FastAPI, core: InferenceCore) -> None:
    _add_shm_routes(app, core)
    _add_trace_routes(app, core)
    _add_logging_routes(app, core)


def _add_shm_routes(app: FastAPI, core: InferenceCore) -> None:
    tags: list[str | Enum] = ["shared memory"]

    @app.get(_SHM + "/status", tags=tags, summary="Every registered system shared memory region")
    @app.get(_SHM + "/region/{region}/status", tags=tags, summary="One registered region")
    async def status(region: str | None = None) -> Response:
        return _json(core.shm.status(region))

    @app.post(_SHM + "/region/{region}/register", tags=tags, summary="Register a /dev/shm region")
    async def register(region: str, request: Request) -> Response:
        doc = await _body(request, core)
        key = doc.get("key")
        if not isinstance(key, str):
            raise InvalidInput("failed to register shared memory region: invalid args: 'key' must be a string "
                               "such as '/input0'")
        core.shm.register(name=region, key=key, offset=_int_field(doc, "offset", default=0),
                          byte_size=_int_field(doc, "byte_size"))
        return _json({})

    @app.post(_SHM + "/unregister", tags=tags, summary="Unregister every region")
    @app.post(_SHM + "/region/{region}/unregister", tags=tags, summary="Unregister one region")
    async def unregister(request: Request, region: str | None = None) -> Response:
        await _body(request, core)
        core.shm.unregister(region)
        return _json({})

    # No CUDA region can ever be registered, so status lists none and unregistering is a no-op (as Triton
    # answers with none registered); registering says why it cannot.
    @app.get(_CUDA + "/status", tags=tags, summary="CUDA shared memory regions: always none")
    async def cuda_status() -> Response:
        return _json([])

    @app.get(_CUDA + "/region/{region}/status", tags=tags, summary="A CUDA shared memory region: never registered")
    async def cuda_region_status(region: str) -> Response:
        raise InvalidInput(cuda_region_missing(region))

    @app.post(_CUDA + "/unregister", tags=tags, summary="Unregister every CUDA region: none to unregister")
    @app.post(_CUDA + "/region/{region}/unregister", tags=tags, summary="Unregister a CUDA region: a no-op")
    async def cuda_unregister(request: Request, region: str | None = None) -> Response:
        await _body(request, core)
        return _json({})

    summary = "CUDA shared memory registration: not supported (answers 400 saying so)"

    @app.post(_CUDA + "/region/{region}/register", tags=tags, summary=summary)
    async def cuda_register(region: str) -> Response:
        raise InvalidInput(cuda_register_refused(region))

    @app.get(_CUDA + "/{rest:path}", tags=tags, summary=summary, operation_id="cuda_shared_memory_get")
    @app.post(_CUDA + "/{rest:path}", tags=tags, summary=summary, operation_id="cuda_shared_memory_post")
    async def cuda(rest: str) -> Response:
        raise InvalidInput(CUDA_UNSUPPORTED)


def _add_trace_routes(app: FastAPI, core: InferenceCore) -> None:
    tags: list[str | Enum] = ["trace"]

    @app.get("/v2/trace/setting", tags=tags, summary="Global trace settings")
    @app.get("/v2/models/{model_name}/trace/setting", tags=tags, summary="A model's trace settings")
    async def get_trace(model_name: str | None = None) -> Response:
        if model_name:
            core.model(model_name)
        return _json(core.tracing.settings(model_name))

    @app.post("/v2/trace/setting", tags=tags, summary="Update global trace settings (null resets)")
    @app.post("/v2/models/{model_name}/trace/setting", tags=tags, summary="Update a model's trace settings")
    async def update_trace(request: Request, model_name: str | None = None) -> Response:
        if model_name:
            core.model(model_name)
        return _json(core.tracing.update(model_name, await _body(request, core)))


def _add_logging_routes(app: FastAPI, core: InferenceCore) -> None:
    @app.get("/v2/logging", tags=["logging"], summary="Log settings")
    async def get_logging() -> Response:
        return _json(core.logging.get())

    @app.post("/v2/logging", tags=["logging"], summary="Update log settings")
    async def update_logging(request: Request) -> Response:
        return _json(core.logging.update(await _body(request, core)))

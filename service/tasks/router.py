"""Task endpoints: `/v1/models/{name}/predict` (and KServe V1 `:predict`) on the same batcher as V2.

Handlers only parse an upload or JSON and serialize; the core pins one model version and its processor
(service/processing/) for the request's life and runs it through the batcher V2 uses.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.content_encoding import decompress
from service.core import InferenceCore
from service.errors import InvalidInput, PayloadTooLarge, RequestCancelled, UnsupportedMediaType
from service.http_infer import read_body, server_disconnect_flag
from service.processing.base import b64decode, setting
from service.tasks.openai_embeddings import model_object
from service.tasks.openapi_docs import MODELS_EXAMPLE, PREDICT_DOC, V1_DOC

# JSON key holding the items, per task.
ITEM_KEYS = {"image-classification": "images", "keyword-spotting": "audio", "text-embedding": "texts",
             "text-classification": "texts", "recommendation": "user_ids"}
UPLOAD_TASKS = {"image-classification", "keyword-spotting"}


def _json(doc: object, status: int = 200) -> Response:
    return Response(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


async def _body(request: Request, *, limit: int, timeout_s: float | None) -> bytes:
    body = await read_body(request.receive, declared=request.headers.get("content-length"), limit=limit,
                           timeout_s=timeout_s)
    if body is None:
        raise RequestCancelled("client went away while sending the request")
    body = decompress(body, encoding=request.headers.get("content-encoding", "").lower(), limit=limit)
    request._body = body  # so request.form() parses what we already read
    return body


async def _uploads(request: Request, task: str, *, max_items: int) -> tuple[list[bytes], dict]:
    if task not in UPLOAD_TASKS:
        raise UnsupportedMediaType(f"multipart uploads are for image and speech models; send JSON "
                                   f"{{\"{ITEM_KEYS[task]}\": [...]}} to this {task} model")
    try:
        form = await request.form(max_files=max_items)
    except StarletteHTTPException as exc:  # Starlette's multipart parser refusing the body
        if "Too many files" in str(exc.detail):
            raise PayloadTooLarge(f"more than {max_items} files in one request; send at most {max_items} "
                                  f"({setting('max_task_items')})") from None
        raise InvalidInput(f"multipart body: {exc.detail}; expected files in the field 'file'") from None
    files = [f for f in form.getlist("file") if not isinstance(f, str)]
    if not files:
        raise InvalidInput("multipart body has no file; upload one or more files in the field 'file'")
    params = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    return [await f.read() for f in files], params


PARAMS = ("k", "exclude_seen")  # parameters a body may give at its top level or under "parameters"


def _known_keys(doc: dict, *, task: str, key: str) -> None:
    """A key this route does not read (a typo, `params`, `top_k`) would be ignored silently and the answer not be
    what was asked: refuse it, naming the keys that are read."""
    known = {key, "parameters", *PARAMS, *(("user_id",) if task == "recommendation" else ())}
    inner = doc.get("parameters", {})
    if not isinstance(inner, dict):
        raise InvalidInput(f"'parameters' must be a JSON object such as {{\"k\": 5}}, got {type(inner).__name__}")
    unknown = [k for k in doc if k not in known] + [f"parameters.{k}" for k in inner if k not in PARAMS]
    if unknown:
        raise InvalidInput(f"unknown key {unknown[0]!r} in the request body; expected {sorted(known)} (parameters: "
                           f"{list(PARAMS)})")


def _json_items(doc: object, *, task: str, v1: bool) -> tuple[list[Any], dict]:
    key = "instances" if v1 else ITEM_KEYS[task]
    if not isinstance(doc, dict):
        raise InvalidInput(f"expected a JSON object with {key!r}")
    if not v1:
        _known_keys(doc, task=task, key=key)
    params = {k: v for k, v in doc.items() if k in PARAMS}
    if isinstance(doc.get("parameters"), dict):
        params.update(doc["parameters"])
    if task == "recommendation" and not v1 and "user_id" in doc:
        return [doc["user_id"]], params
    items = doc.get(key)
    if not isinstance(items, list):
        raise InvalidInput(f"expected {key!r}: a list of items for this {task} model")
    if task in UPLOAD_TASKS:
        what = "PNG, JPEG, WebP, GIF, BMP or TIFF image" if task == "image-classification" else "WAV file"
        items = [b64decode(x, index=i, what=what) for i, x in enumerate(items)]
    return items, params


async def _parse(request: Request, task: str, *, v1: bool, limit: int, max_items: int,
                 timeout_s: float | None) -> tuple[list[Any], dict]:
    body = await _body(request, limit=limit, timeout_s=timeout_s)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = dict(request.query_params)
    if ctype == "multipart/form-data":
        items, params = await _uploads(request, task, max_items=max_items)
    elif ctype in ("application/json", ""):
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        items, params = _json_items(doc, task=task, v1=v1)
    else:
        # `curl -d` sends application/x-www-form-urlencoded: say which flag sends JSON instead.
        raise UnsupportedMediaType(f"Content-Type {ctype!r} is not accepted; send JSON with "
                                   "-H 'Content-Type: application/json' (curl: --json)"
                                   + (" or a multipart upload (curl: -F file=@FILE)" if task in UPLOAD_TASKS else ""))
    return items, {**query, **params}


def build_router(core: InferenceCore, *, max_request_bytes: int, body_timeout_s: float | None = None) -> APIRouter:
    router = APIRouter(tags=["tasks"])

    @router.get("/v1/models", summary="Models with their task, inputs, labels and variants",
                responses={200: {"content": {"application/json": {"example": MODELS_EXAMPLE}}}})
    async def list_models() -> Response:
        docs = core.task_models()
        # `object`/`data` answer OpenAI's list models (`client.models.list()`) beside KServe's `models`.
        return _json({"models": docs, "object": "list", "data": [model_object(d) for d in docs]})

    @router.get("/v1/models/{name}", summary="One model: task, inputs, labels, variants and readiness (KServe V1)")
    async def one_model(name: str) -> Response:
        docs = {d["name"]: d for d in core.task_models()}
        if name not in docs:
            core.model(name)  # raises ModelNotFound listing the models
        return _json({**docs[name], "ready": docs[name]["state"] == "READY", **model_object(docs[name])})

    @router.post("/v1/models/{name}/predict", summary="Task prediction: images, texts, WAV audio or user ids",
                 openapi_extra=PREDICT_DOC)
    async def predict(name: str, request: Request) -> Response:
        model = core.task_model(name)
        items, params = await _parse(request, model.processor.task, v1=False, limit=max_request_bytes,
                                     max_items=core.max_task_items, timeout_s=body_timeout_s)
        results = await core.predict(model, items, params, client_gone=server_disconnect_flag(request.receive))
        return _json({"model_name": name, "task": model.processor.task, "results": results})

    @router.post("/v1/models/{name}:predict", summary="KServe V1 predict: {\"instances\": [...]}",
                 openapi_extra=V1_DOC)
    async def predict_v1(name: str, request: Request) -> Response:
        model = core.task_model(name)
        items, params = await _parse(request, model.processor.task, v1=True, limit=max_request_bytes,
                                     max_items=core.max_task_items, timeout_s=body_timeout_s)
        results = await core.predict(model, items, params, client_gone=server_disconnect_flag(request.receive))
        return _json({"predictions": results})

    return router

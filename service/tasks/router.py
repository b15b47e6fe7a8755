"""Task endpoints: `/v1/models/{name}/predict` (and KServe V1 `:predict`) on the same batcher as V2.

Handlers parse an upload or JSON, run the family's processor (service/tasks/*.py), send the tensors
through InferenceCore.infer (the dynamic batcher and ONNX Runtime instances V2 uses) and post-process.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.config import ModelSpec
from service.core import InferenceCore, InferRequest
from service.errors import InvalidInput, PayloadTooLarge, RequestCancelled, ServingError, UnsupportedMediaType
from service.http_infer import read_body
from service.tasks.base import Processor, b64decode
from service.tasks.openapi_docs import MODELS_EXAMPLE, PREDICT_DOC, V1_DOC
from service.tasks.registry import build_processor, describe_model

MAX_ITEMS = 1024
# JSON key holding the items, per task.
ITEM_KEYS = {"image-classification": "images", "keyword-spotting": "audio", "text-embedding": "texts",
             "text-classification": "texts", "recommendation": "user_ids"}
UPLOAD_TASKS = {"image-classification", "keyword-spotting"}


def _json(doc: object, status: int = 200) -> Response:
    return Response(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


class TaskService:
    """Caches one processor per loaded model version (rebuilt when the version is swapped)."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core
        self._cache: dict[str, tuple[object, Processor]] = {}

    def processor(self, name: str) -> Processor:
        mv = self.core.repository.get(name)
        cached = self._cache.get(name)
        if cached is None or cached[0] is not mv:
            cached = (mv, build_processor(mv.spec, model_dir=self.core.repository.root / name))
            self._cache[name] = cached
        return cached[1]

    async def predict(self, name: str, items: list[Any], params: dict) -> tuple[str, list[dict]]:
        processor = self.processor(name)
        if not items:
            raise InvalidInput(f"no items to predict; {processor.describe()['accepts']}")
        if len(items) > MAX_ITEMS:
            raise PayloadTooLarge(f"{len(items)} items in one request; send at most {MAX_ITEMS}")
        prepared = await asyncio.to_thread(lambda: [processor.prepare(x, index=i) for i, x in enumerate(items)])
        mv = self.core.repository.get(name)
        size = mv.spec.max_batch_size or len(prepared)
        chunks = [prepared[i:i + size] for i in range(0, len(prepared), size)]
        responses = await asyncio.gather(*(self.core.infer(InferRequest(name, None, processor.collate(c)))
                                           for c in chunks))
        results: list[dict] = []
        for chunk, resp in zip(chunks, responses):
            outputs = {o.name: np.asarray(o.data) for o in resp.outputs}
            results.extend(processor.postprocess(outputs, chunk, params=params))
        return processor.task, results


async def _body(request: Request) -> bytes:
    limit = request.app.state.settings.max_request_bytes
    body = await read_body(request.receive, declared=request.headers.get("content-length"), limit=limit)
    if body is None:
        raise RequestCancelled("client went away while sending the request")
    request._body = body  # so request.form() parses what we already read
    return body


async def _uploads(request: Request, task: str) -> tuple[list[bytes], dict]:
    if task not in UPLOAD_TASKS:
        raise UnsupportedMediaType(f"multipart uploads are for image and speech models; send JSON "
                                   f"{{\"{ITEM_KEYS[task]}\": [...]}} to this {task} model")
    form = await request.form(max_files=MAX_ITEMS)
    files = [f for f in form.getlist("file") if not isinstance(f, str)]
    if not files:
        raise InvalidInput("multipart body has no file; upload one or more files in the field 'file'")
    params = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    return [await f.read() for f in files], params


def _json_items(doc: object, *, task: str, v1: bool) -> tuple[list[Any], dict]:
    key = "instances" if v1 else ITEM_KEYS[task]
    if not isinstance(doc, dict):
        raise InvalidInput(f"expected a JSON object with {key!r}")
    params = {k: v for k, v in doc.items() if k in ("k", "exclude_seen")}
    if isinstance(doc.get("parameters"), dict):
        params.update(doc["parameters"])
    if task == "recommendation" and not v1 and "user_id" in doc:
        return [doc["user_id"]], params
    items = doc.get(key)
    if not isinstance(items, list):
        raise InvalidInput(f"expected {key!r}: a list of items for this {task} model")
    if task in UPLOAD_TASKS:
        what = "PNG or JPEG image" if task == "image-classification" else "WAV file"
        items = [b64decode(x, index=i, what=what) for i, x in enumerate(items)]
    return items, params


async def _parse(request: Request, task: str, *, v1: bool) -> tuple[list[Any], dict]:
    body = await _body(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = dict(request.query_params)
    if ctype == "multipart/form-data":
        items, params = await _uploads(request, task)
    elif ctype in ("application/json", ""):
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        items, params = _json_items(doc, task=task, v1=v1)
    else:
        raise UnsupportedMediaType(f"Content-Type {ctype!r} is not accepted; send application/json"
                                   + (" or multipart/form-data (field 'file')" if task in UPLOAD_TASKS else ""))
    return items, {**query, **params}


def build_router(core: InferenceCore) -> APIRouter:
    router = APIRouter(tags=["tasks"])
    service = TaskService(core)

    @router.get("/v1/models", summary="Models with their task, inputs, labels and variants",
                responses={200: {"content": {"application/json": {"example": MODELS_EXAMPLE}}}})
    async def list_models() -> Response:
        return _json({"models": _model_list(service)})

    @router.get("/v1/models/{name}", summary="One model: task, inputs, labels, variants and readiness (KServe V1)")
    async def one_model(name: str) -> Response:
        docs = {d["name"]: d for d in _model_list(service)}
        if name not in docs:
            core.repository.get(name)  # raises ModelNotFound listing the models
        return _json({**docs[name], "ready": docs[name]["state"] == "READY"})

    @router.post("/v1/models/{name}/predict", summary="Task prediction: images, texts, WAV audio or user ids",
                 openapi_extra=PREDICT_DOC)
    async def predict(name: str, request: Request) -> Response:
        task = service.processor(name).task
        items, params = await _parse(request, task, v1=False)
        task, results = await service.predict(name, items, params)
        return _json({"model_name": name, "task": task, "results": results})

    @router.post("/v1/models/{name}:predict", summary="KServe V1 predict: {\"instances\": [...]}",
                 openapi_extra=V1_DOC)
    async def predict_v1(name: str, request: Request) -> Response:
        task = service.processor(name).task
        items, params = await _parse(request, task, v1=True)
        _, results = await service.predict(name, items, params)
        return _json({"predictions": results})

    return router


def _model_list(service: TaskService) -> list[dict]:
    repo = service.core.repository
    docs = []
    for name in sorted(repo.entries):
        spec: ModelSpec | None = None
        processor: Processor | ServingError | None = None
        try:
            spec = repo.get(name).spec
            processor = service.processor(name)
        except ServingError as exc:
            processor = exc
        doc = describe_model(spec, name=name, model_dir=repo.root / name, processor=processor)
        doc["state"] = repo.entries[name].state
        docs.append(doc)
    by_parent: dict[str, list[dict]] = {}
    for d in docs:
        if d["parent"]:
            by_parent.setdefault(d["parent"], []).append({"name": d["name"], "variant": d["variant"]})
    for d in docs:
        d["variants"] = [{"name": d["name"], "variant": d["variant"]}, *by_parent.get(d["name"], [])]
    return docs

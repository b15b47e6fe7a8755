"""OpenAI-compatible embeddings: `POST /v1/embeddings` on the sentence encoder (text-embedding task).

The route only parses OpenAI's request, calls the core (the same task processor and dynamic batcher as
`/v1/models/{name}/predict`) and serializes OpenAI's response; errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` so the official `openai` client raises its usual exceptions.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.content_encoding import decompress
from service.core import InferenceCore
from service.errors import (
    InvalidInput,
    PayloadTooLarge,
    RequestCancelled,
    ServingError,
    UnsupportedMediaType,
    openai_error,
)
from service.http_infer import read_body, server_disconnect_flag
from service.processing.base import setting
from service.processing.text import PreparedText

_REQUEST_EXAMPLE = {"model": "transformer", "input": ["Read a file line by line.", "Compress a folder."],
                    "encoding_format": "float"}
_DOC = {
    "description": (
        "OpenAI-compatible embeddings (`openai.OpenAI(base_url='http://HOST:8000/v1', api_key='unused')`). "
        "`input`: a string or a list of at most 2048 strings (token-id arrays are refused: they would be "
        "another tokenizer's ids), each within the model's max_sequence_length (a longer one is refused, as "
        "OpenAI does, not truncated); `encoding_format`: `float` (default) or `base64` (little-endian float32, "
        "as OpenAI); `dimensions`: only the model's own width; `user` is accepted and not used. Served by the "
        "text-embedding models (`transformer`) through the same dynamic batcher as the task routes."),
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "required": ["model", "input"], "additionalProperties": False, "properties": {
            "model": {"type": "string"},
            "input": {"oneOf": [{"type": "string"},
                                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2048}]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
            "dimensions": {"type": "integer"}, "user": {"type": "string"}}},
        "example": _REQUEST_EXAMPLE}}},
    "responses": {
        "200": {"description": "One embedding per input, in order", "content": {"application/json": {"example": {
            "object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.0123, -0.0456]}],
            "model": "transformer", "usage": {"prompt_tokens": 9, "total_tokens": 9}}}}},
        "400": {"description": "Bad input (OpenAI error shape)", "content": {"application/json": {"example": {
            "error": {"message": "input 0 has 300 tokens; model 'transformer' reads at most 256 tokens per input "
                                 "([CLS] and [SEP] included): shorten it or split it into several inputs",
                      "type": "invalid_request_error", "param": "input", "code": None}}}}},
        "404": {"description": "Unknown model"}, "413": {"description": "Body too large"},
        "503": {"description": "Model not ready or queue full"}},
}


class OpenAIError(InvalidInput):
    """A bad request field, named in OpenAI's `param`."""

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def _error(exc: ServingError) -> Response:
    return Response(orjson.dumps(openai_error(exc)), status_code=exc.status_code, media_type="application/json",
                    headers=exc.headers or None)


# OpenAI's own limit on `input` items (its API reference: "any array must be 2048 dimensions or less").
OPENAI_MAX_INPUTS = 2048
KEYS = ("model", "input", "encoding_format", "dimensions", "user")


def _texts(value: object, *, max_items: int) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        limit = min(OPENAI_MAX_INPUTS, max_items)
        if len(value) > limit:
            raise OpenAIError(f"'input' has {len(value)} items; send at most {limit} per request (OpenAI's limit "
                              f"is {OPENAI_MAX_INPUTS}; this server's {setting('max_task_items')} is {max_items}) "
                              "and the rest in further requests", param="input")
        return value
    if isinstance(value, list) and value and all(isinstance(x, (int, list)) for x in value):
        # NOTE: LangChain's OpenAIEmbeddings sends tiktoken (cl100k) ids by default; read as this model's ids
        # they would embed other words with no error (langchain-ai/langchain#12854), so they are refused.
        raise OpenAIError("token-id arrays are not supported: they would be read with this model's tokenizer, "
                          "not the one that made them; send 'input' as a string or a list of strings (LangChain: "
                          "OpenAIEmbeddings(..., check_embedding_ctx_length=False))", param="input")
    raise OpenAIError(f"'input' must be a non-empty string or a non-empty list of strings, got {value!r:.80}",
                      param="input")


def _whole_texts(*, model: str, max_length: int) -> Callable[[list[Any]], None]:
    """Refuse a text longer than the model reads, before any inference: OpenAI answers 400 where the task
    routes truncate (and say so per text), and an embedding of the first part only would pass for the whole."""
    def check(prepared: list[Any]) -> None:
        for i, p in enumerate(prepared):
            if isinstance(p, PreparedText) and p.truncated:
                raise OpenAIError(f"input {i} has {p.tokens} tokens; model {model!r} reads at most {max_length} "
                                  "tokens per input ([CLS] and [SEP] included): shorten it or split it into "
                                  "several inputs", param="input")
    return check


def _parse(body: bytes, content_type: str) -> dict[str, Any]:
    if content_type not in ("application/json", ""):
        raise UnsupportedMediaType(f"Content-Type {content_type!r} is not accepted; send JSON with "
                                   "-H 'Content-Type: application/json' (curl: --json)")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(f"request body is not valid JSON: {exc}", param=None) from None
    if not isinstance(doc, dict):
        raise OpenAIError("expected a JSON object with 'model' and 'input'", param=None)
    unknown = [k for k in doc if k not in KEYS]
    if unknown:  # as OpenAI: an ignored key (`truncate`, `normalize`) would leave its caller believing it worked
        raise OpenAIError(f"unrecognized request argument {unknown[0]!r}; expected {list(KEYS)}", param=unknown[0])
    if not isinstance(doc.get("model"), str) or not doc["model"]:
        raise OpenAIError("'model' is required: the name of a text-embedding model (e.g. 'transformer')",
                          param="model")
    if doc.get("encoding_format", "float") not in ("float", "base64", None):
        raise OpenAIError(f"'encoding_format' must be 'float' or 'base64', got {doc['encoding_format']!r}",
                          param="encoding_format")
    dims = doc.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)):
        raise OpenAIError(f"'dimensions' must be an integer, got {dims!r}", param="dimensions")
    if doc.get("user") is not None and not isinstance(doc["user"], str):
        raise OpenAIError(f"'user' must be a string, got {doc['user']!r:.80}", param="user")
    return doc


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def model_object(doc: dict) -> dict:
    """OpenAI's model object (`client.models.list()` / `.retrieve()`) for one `GET /v1/models` entry."""
    return {"id": doc["name"], "object": "model", "created": doc.get("created", 0), "owned_by": "modelserve"}


def build_openai_router(core: InferenceCore, *, max_request_bytes: int,
                        body_timeout_s: float | None = None) -> APIRouter:
    router = APIRouter(tags=["openai"])

    @router.post("/v1/embeddings", summary="OpenAI-compatible embeddings", openapi_extra=_DOC)
    async def embeddings(request: Request) -> Response:
        started = time.monotonic()
        try:
            body = await read_body(request.receive, declared=request.headers.get("content-length"),
                                   limit=max_request_bytes, timeout_s=body_timeout_s)
            if body is None:
                raise RequestCancelled("client went away while sending the request")
            body = decompress(body, encoding=request.headers.get("content-encoding", "").lower(),
                              limit=max_request_bytes)
            doc = _parse(body, request.headers.get("content-type", "").split(";")[0].strip().lower())
            texts = _texts(doc.get("input"), max_items=core.max_task_items)
            model, width = core.embedding_model(doc["model"])
            if doc.get("dimensions") is not None and doc["dimensions"] != width:
                raise OpenAIError(f"model {doc['model']!r} gives {width}-dimensional embeddings; 'dimensions' "
                                  f"must be {width} or left out, got {doc['dimensions']}", param="dimensions")
            check = _whole_texts(model=doc["model"], max_length=getattr(model.processor, "max_length", 0))
            try:
                results = await core.predict(model, texts, {}, check=check,
                                             client_gone=server_disconnect_flag(request.receive))
            except OpenAIError:
                raise
            except (InvalidInput, PayloadTooLarge) as exc:  # an empty or too long text: one of the inputs
                raise OpenAIError(exc.message, param="input") from None
        except ServingError as exc:
            return _error(exc)
        fmt = doc.get("encoding_format") or "float"
        tokens = sum(int(r["tokens_used"]) for r in results)
        # OpenAI's response headers that carry a meaning here (`with_raw_response`): the model version that
        # answered and the time spent.
        headers = {"openai-model": f"{model.version.name}/{model.version.version}",
                   "openai-processing-ms": str(round((time.monotonic() - started) * 1000))}
        return Response(orjson.dumps({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": _encode(r["embedding"], fmt)}
                     for i, r in enumerate(results)],
            "model": doc["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
            media_type="application/json", headers=headers)

    return router

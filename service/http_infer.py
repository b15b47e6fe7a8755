"""The V2 infer route as a pure-ASGI handler in front of FastAPI.

NOTE: written by hand because profiling the server at concurrency 32 showed FastAPI/Starlette's per-request
machinery (middleware stack, route matching over ~18 routes, dependency solving, Request/Response objects)
taking about a third of the event loop's time on the hot path, more than our own decode/infer/encode. Every
other route stays on FastAPI; this handler only parses, calls the same InferenceCore, and serializes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from service.content_encoding import decompress
from service.core import InferenceCore, InferRequest
from service.errors import (
    InvalidInput,
    PayloadTooLarge,
    RequestCancelled,
    RequestTimeout,
    ServingError,
    unexpected,
)
from service.http_server import arrived, body_complete, corked, respond_at_once
from service.protocol_v2 import OutputEncoding, decode_raw_request, encode_response_parts
from service.v2_plans import RequestPlans

log = logging.getLogger("modelserve.http")

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
_JSON = b"application/json"


def _headers(scope: dict) -> dict[bytes, bytes]:
    return dict(scope["headers"])


async def _receive(receive: Callable, timeout_s: float | None) -> dict:
    """One ASGI message; RequestTimeout (408, then the connection closes) if the client stalls longer."""
    if timeout_s is None or arrived(receive):
        return await receive()
    try:
        async with asyncio.timeout(timeout_s):
            return await receive()
    except TimeoutError:
        raise RequestTimeout(f"request body stalled: nothing received for {timeout_s:g} s; "
                             "send the whole body without long pauses") from None


async def read_body(receive: Callable, *, declared: bytes | str | None, limit: int,
                    timeout_s: float | None = None) -> bytes | None:
    """The whole body from an ASGI `receive`, refusing more than `limit` bytes and pauses longer than
    `timeout_s` between chunks; None if the client left."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    message = await _receive(receive, timeout_s)
    if message["type"] == "http.disconnect":
        return None
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body  # the common case: one chunk, no join
    chunks, size = [body], len(body)
    while True:
        message = await _receive(receive, timeout_s)
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send: Callable, *, status: int, body: bytes | list, content_type: bytes,
                extra: list | None = None, receive: Callable | None = None) -> None:
    """Answer with one response; `body` may be a list of parts (joined once, into the single write that
    carries the status line and headers too, where the connection offers it: see http_server.corked)."""
    size = len(body) if isinstance(body, bytes) else sum(len(part) for part in body)
    headers = [(b"content-type", content_type), (b"content-length", str(size).encode())]
    if extra:
        headers.extend(extra)
    with corked(receive):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if isinstance(body, bytes) else b"".join(body)})


async def send_error(send: Callable, exc: ServingError) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await _send(send, status=exc.status_code, body=orjson.dumps({"error": exc.message}), content_type=_JSON,
                extra=extra)


def server_disconnect_flag(receive: Callable) -> Callable[[], bool] | None:
    """A cheap "has the client hung up?" check, where the ASGI server keeps one.

    NOTE: uvicorn (httptools and h11) sets `RequestResponseCycle.disconnected` in connection_lost and `receive`
    is that cycle's bound method. Reading the flag when a batch is formed costs nothing per request, where a
    watcher task that awaits `receive()` cost ~70 us of event-loop time per request under load (py-spy).
    Under another ASGI server (no such flag) a disconnected caller's request is still computed.
    """
    cycle = getattr(receive, "__self__", None)
    if cycle is None or not isinstance(getattr(cycle, "disconnected", None), bool):
        return None
    return lambda: cycle.disconnected


class InferFastPath:
    """POST /v2/models/{m}[/versions/{v}]/infer handled directly; all else delegated to `app`."""

    def __init__(self, app: ASGIApp, *, core: InferenceCore, max_request_bytes: int,
                 body_timeout_s: float | None = None) -> None:
        self.app = app
        self.core = core
        self.limit = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.plans = RequestPlans()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # e.g. `.state`, `.openapi` of the wrapped FastAPI app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.match(scope["path"])
            if match is not None:
                await self._infer(scope, receive, send, match["model"], match["version"])
                return
        await self.app(scope, receive, send)

    async def _infer(self, scope: dict, receive: Callable, send: Callable, model: str, version: str | None) -> None:
        trace = None
        try:
            headers = _headers(scope)
            declared = headers.get(b"content-length")
            if body_complete(receive):  # the common case: the body came with the headers
                body = await read_body(receive, declared=declared, limit=self.limit, timeout_s=self.body_timeout_s)
            else:
                # A body still arriving is announced: an adaptive batcher waits for a request on its way.
                with self.core.arriving(model, version):
                    body = await read_body(receive, declared=declared, limit=self.limit, timeout_s=self.body_timeout_s)
            if body is None:
                return
            body = decompress(body, encoding=headers.get(b"content-encoding", b"").decode().lower(), limit=self.limit)
            trace = self.core.tracing.begin(model) if self.core.tracing.enabled else None
            length = header_length(headers)
            if length == 0:  # Triton's raw binary request: the body is the only input's data
                spec = self.core.model(model, version).spec
                req, encoding = decode_raw_request(body, spec=spec, model_name=model, model_version=version)
            else:
                req, encoding = self._decode(body, header_length=length, model=model, version=version)
            if trace is not None:
                trace.decoded(req)
                req.trace = trace
            req.client_gone = server_disconnect_flag(receive)
            try:
                resp = await self.core.infer(req)
            except RequestCancelled:
                return  # the client is gone: nobody to answer
            payload, header_len = encode_response_parts(resp, encoding)
            if trace is not None:
                trace.end(version=resp.model_version)
        except ServingError as exc:
            if trace is not None:
                trace.end(error=exc)
            await send_error(send, exc)
            return
        except Exception as exc:  # never a bare 500 in plain text
            log.exception("unhandled error in infer")
            await send_error(send, unexpected(exc))
            return
        await send_infer_response(send, payload, header_len, receive=receive)

    def _decode(self, body: bytes, *, header_length: int | None, model: str,
                version: str | None) -> tuple[InferRequest, OutputEncoding]:
        """A JSON (+ binary) request; a binary request's header is parsed and checked once (v2_plans)."""
        return self.plans.decode(body, header_length=header_length, model_name=model, model_version=version,
                                 max_tensor_bytes=self.limit, shm=self.core.shm)


async def send_infer_response(send: Callable, payload: bytes | list, header_len: int | None, *,
                              receive: Callable | None = None) -> None:
    """Answer 200 with an encoded infer response: JSON, or JSON + binary parts with Triton's header length.
    Under our uvicorn protocol it is one write straight to the connection (http_server.respond_at_once)."""
    parts = [payload] if isinstance(payload, bytes) else payload
    size = sum(len(part) for part in parts)
    if header_len is None:
        head = b"content-type: application/json\r\ncontent-length: %d\r\n" % size
    else:
        head = (b"content-type: application/octet-stream\r\ncontent-length: %d\r\n"
                b"inference-header-content-length: %d\r\n" % (size, header_len))
    if respond_at_once(receive, status=200, head=head, parts=parts):
        return
    if header_len is None:
        await _send(send, status=200, body=payload, content_type=_JSON, receive=receive)
    else:
        await _send(send, status=200, body=payload, content_type=b"application/octet-stream",
                    extra=[(b"inference-header-content-length", str(header_len).encode())], receive=receive)


def header_length(headers: dict[bytes, bytes]) -> int | None:
    value = headers.get(b"inference-header-content-length")
    if value is None:
        return None
    # NOTE: int() alone would also take b"1_0" and b" +10"; the header is plain ASCII digits.
    if not value.isdigit():
        raise InvalidInput("Inference-Header-Content-Length must be a non-negative integer (the JSON header's byte "
                           f"count), got {value.decode(errors='replace')!r}")
    return int(value)

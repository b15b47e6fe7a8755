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
from dataclasses import dataclass
from typing import Any

import orjson

from service.content_encoding import decompress
from service.core import InferenceCore, InferRequest, InferResponse
from service.errors import (
    InvalidInput,
    NotImplementedByServer,
    PayloadTooLarge,
    RequestCancelled,
    RequestTimeout,
    ServingError,
    error_document,
    unexpected,
)
from service.http_server import arrived, body_complete, corked, respond_at_once
from service.protocol_v2 import OutputEncoding, decode_raw_request, encode_response_parts
from service.tracing import RequestTrace
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


def error_answer(exc: ServingError, *, path: str = "") -> tuple[list[tuple[bytes, bytes]], bytes]:
    """An error's response headers and body (KServe V2's {"error": ...}, OpenAI's on its routes); the one
    encoding of both paths."""
    body = orjson.dumps(error_document(exc, path=path))
    headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    return headers, body


async def send_error(send: Callable, exc: ServingError, *, path: str = "") -> None:
    headers, body = error_answer(exc, path=path)
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def failure(exc: Exception, call: InferCall | None) -> ServingError:
    """What to answer for `exc`, raised while serving `call` (None: before it was decoded); call from the
    `except` block, so an unexpected error is logged with its traceback."""
    if not isinstance(exc, ServingError):  # never a bare 500 in plain text
        log.exception("unhandled error in infer")
        return unexpected(exc)
    if call is not None and call.trace is not None:
        call.trace.end(error=exc)
    return exc


@dataclass(slots=True)
class InferCall:
    """One decoded V2 infer request: what to run, how its answer is encoded, its trace (when sampled)."""

    req: InferRequest
    encoding: OutputEncoding
    trace: RequestTrace | None

    def answer(self, resp: InferResponse) -> tuple[list[bytes | memoryview], int | None]:
        """The response's body parts and JSON header length (None: plain JSON)."""
        parts, header_len = encode_response_parts(resp, self.encoding)
        if self.trace is not None:
            self.trace.end(version=resp.model_version)
        return parts, header_len


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
        if scope["type"] == "http" and (refused := transfer_coding_refusal(scope["headers"])) is not None:
            await send_error(send, refused, path=scope["path"])
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.match(scope["path"])
            if match is not None:
                await self._infer(scope, receive, send, match["model"], match["version"])
                return
        await self.app(scope, receive, send)

    async def _infer(self, scope: dict, receive: Callable, send: Callable, model: str, version: str | None) -> None:
        call = None
        try:
            headers = _headers(scope)
            body = await self._read(receive, headers, model=model, version=version)
            if body is None:
                return
            body = decompress(body, encoding=headers.get(b"content-encoding", b"").decode().lower(), limit=self.limit)
            call = self.decode(headers, body, model=model, version=version)
            call.req.client_gone = server_disconnect_flag(receive)
            try:
                resp = await self.core.infer(call.req)
            except RequestCancelled:
                return  # the client is gone: nobody to answer
            payload, header_len = call.answer(resp)
        except Exception as exc:
            await send_error(send, failure(exc, call))
            return
        await send_infer_response(send, payload, header_len, receive=receive)

    async def _read(self, receive: Callable, headers: dict[bytes, bytes], *, model: str,
                    version: str | None) -> bytes | None:
        declared = headers.get(b"content-length")
        if body_complete(receive):  # the common case: the body came with the headers
            return await read_body(receive, declared=declared, limit=self.limit, timeout_s=self.body_timeout_s)
        # A body still arriving is announced: an adaptive batcher waits for a request on its way.
        with self.core.arriving(model, version):
            return await read_body(receive, declared=declared, limit=self.limit, timeout_s=self.body_timeout_s)

    def decode(self, headers: dict[bytes, bytes], body: bytes, *, model: str, version: str | None) -> InferCall:
        """The route's request logic, shared by the ASGI route and the protocol (service/http_protocol_infer.py):
        a raw binary request (header length 0), or JSON (+ binary) with the header parsed once (v2_plans)."""
        trace = self.core.tracing.begin(model) if self.core.tracing.enabled else None
        try:
            length = header_length(headers)
            if length == 0:  # Triton's raw binary request: the body is the only input's data
                spec = self.core.model(model, version).spec
                req, encoding = decode_raw_request(body, spec=spec, model_name=model, model_version=version)
            else:
                req, encoding = self.plans.decode(body, header_length=length, model_name=model, model_version=version,
                                                  max_tensor_bytes=self.limit, shm=self.core.shm)
        except ServingError as exc:
            if trace is not None:
                trace.end(error=exc)
            raise
        if trace is not None:
            trace.decoded(req)
            req.trace = trace
        return InferCall(req, encoding, trace)


async def send_infer_response(send: Callable, payload: bytes | list, header_len: int | None, *,
                              receive: Callable | None = None) -> None:
    """Answer 200 with an encoded infer response: JSON, or JSON + binary parts with Triton's header length.
    Under our uvicorn protocol it is one write straight to the connection (http_server.respond_at_once)."""
    parts = [payload] if isinstance(payload, bytes) else payload
    head = infer_head(parts, header_len)
    if respond_at_once(receive, status=200, head=head, parts=parts):
        return
    if header_len is None:
        await _send(send, status=200, body=payload, content_type=_JSON, receive=receive)
    else:
        await _send(send, status=200, body=payload, content_type=b"application/octet-stream",
                    extra=[(b"inference-header-content-length", str(header_len).encode())], receive=receive)


def infer_head(parts: list[bytes | memoryview] | list[bytes], header_len: int | None) -> bytes:
    """A 200 infer answer's header lines: JSON, or JSON + binary parts with Triton's header length."""
    size = sum(len(part) for part in parts)
    if header_len is None:
        return b"content-type: application/json\r\ncontent-length: %d\r\n" % size
    return (b"content-type: application/octet-stream\r\ncontent-length: %d\r\n"
            b"inference-header-content-length: %d\r\n" % (size, header_len))


def transfer_coding_refusal(headers: list[tuple[bytes, bytes]]) -> NotImplementedByServer | None:
    """501 (RFC 9112 §6.1) for a Transfer-Encoding other than `chunked` alone (None when there is none or only
    chunked).

    NOTE: httptools decodes the final `chunked` and ignores codings before it, so `Transfer-Encoding: gzip,
    chunked` was read as if the body were not compressed (200), where a proxy in front may have decoded it:
    the two would disagree on the body. A coding that does not end in `chunked` is llhttp's 400 (the body's
    length is unknown: service/http_refusals.py).
    """
    codings = [c.strip().lower() for name, value in headers if name == b"transfer-encoding" for c in value.split(b",")]
    unsupported = [c.decode(errors="replace") for c in codings if c != b"chunked"]
    if not unsupported:
        return None
    return NotImplementedByServer(f"Transfer-Encoding {', '.join(unsupported)!r} is not supported: only 'chunked' "
                                  "is; send a compressed body with Content-Encoding (gzip or deflate) instead")


def header_length(headers: dict[bytes, bytes]) -> int | None:
    value = headers.get(b"inference-header-content-length")
    if value is None:
        return None
    # NOTE: int() alone would also take b"1_0" and b" +10"; the header is plain ASCII digits.
    if not value.isdigit():
        raise InvalidInput("Inference-Header-Content-Length must be a non-negative integer (the JSON header's byte "
                           f"count), got {value.decode(errors='replace')!r}")
    return int(value)

"""The hand-off between HTTP front-end processes and the one model process (`--http-workers N`, experimental).

A front end decodes a V2 infer request into an `InferRequest` and sends it to the model process over a Unix
socket; the model process runs it through its InferenceCore (so its batcher sees every front end's requests)
and sends the `InferResponse` back; the front end encodes it. One connection per front end, many requests in
flight on it, each frame tagged with a request id.

NOTE: hand-written framing (length + id header; bodies: service/frontend_codec.py) because asyncio's streams cost an
await and a buffer copy per frame on each side, and each loop iteration's frames are written with one
`write` (what loadtests/ipc_micro.py measured at 1.4 CPU-us per request round trip against 18.6 for one
write per frame). Pickle (the codec's fallback) is only read from this server's own processes over a private
socket.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

from service.core import InferenceCore, InferRequest, InferResponse
from service.errors import ModelNotReady, ServingError, unexpected
from service.frontend_codec import dump_reply, dump_request, load_reply, load_request
from service.shm import OFFSET_PARAM, REGION_PARAM, SIZE_PARAM

log = logging.getLogger("modelserve.frontends")

FRAME = struct.Struct("<IQ")  # payload bytes, request id


class ModelProcessDecodes(Exception):
    """This request needs the model process's own decoder (shared memory lives there)."""


class NoShm:
    """Stands in for the shared-memory registry: any tensor that names a region goes to the model process."""

    def ref(self, params: dict[str, Any], *, tensor: str) -> None:
        if REGION_PARAM in params or SIZE_PARAM in params or OFFSET_PARAM in params:
            raise ModelProcessDecodes
        return None


class FrameProtocol(asyncio.Protocol):
    """Length-prefixed frames both ways; what one loop iteration sends goes out in one write."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._in = bytearray()
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._in
        buf += data
        pos, size = 0, len(buf)
        while size - pos >= FRAME.size:
            length, rid = FRAME.unpack_from(buf, pos)
            end = pos + FRAME.size + length
            if end > size:
                break
            self.frame_received(rid, bytes(buf[pos + FRAME.size:end]))
            pos = end
        del buf[:pos]

    def frame_received(self, rid: int, payload: bytes) -> None:
        raise NotImplementedError

    def send_frame(self, rid: int, payload: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(FRAME.pack(len(payload), rid))
        self._out.append(payload)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))


def _error_reply(exc: ServingError) -> tuple:
    headers = exc.headers if exc.headers is not type(exc).headers else None
    return ("err", type(exc), exc.message, headers)


def _rebuild_error(cls: type[ServingError], message: str, headers: dict[str, str] | None) -> ServingError:
    """The model process's error, same class and message (constructors differ, so not through pickle)."""
    exc = cls.__new__(cls)
    ServingError.__init__(exc, message)
    if headers:
        exc.headers = headers  # type: ignore[misc]
    return exc


class WorkerProtocol(FrameProtocol):
    """Model-process side: one front end's connection; each request frame becomes a task on the core."""

    def __init__(self, core: InferenceCore) -> None:
        super().__init__()
        self.core = core
        self._tasks: set[asyncio.Task] = set()

    def frame_received(self, rid: int, payload: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._infer(rid, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _infer(self, rid: int, payload: bytes) -> None:
        try:
            reply: InferResponse | tuple = await self.core.infer(load_request(payload))
        except ServingError as exc:
            reply = _error_reply(exc)
        except Exception as exc:  # never a bare 500: the front end answers with the V2 error shape
            log.exception("unhandled error in infer (front-end request)")
            reply = _error_reply(unexpected(exc))
        self.send_frame(rid, dump_reply(reply))

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self._tasks:
            task.cancel()  # the front end is gone: nobody to answer


class FrontEndLink(FrameProtocol):
    """Front-end side: `await link.infer(req)` returns the model process's InferResponse or raises its error."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: dict[int, asyncio.Future] = {}
        self._next = 0
        self.closed = asyncio.Event()

    async def infer(self, req: InferRequest) -> InferResponse:
        if self.transport is None or self.transport.is_closing():
            raise ModelNotReady("the model process is not reachable (server shutting down?); retry later")
        self._next += 1
        rid = self._next
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self.send_frame(rid, dump_request(req))
        try:
            return await fut
        finally:
            self._waiting.pop(rid, None)

    def frame_received(self, rid: int, payload: bytes) -> None:
        fut = self._waiting.pop(rid, None)
        if fut is None or fut.done():
            return  # the caller left (cancelled) before the answer came
        reply = load_reply(payload)
        if isinstance(reply, InferResponse):
            fut.set_result(reply)
        else:
            fut.set_exception(_rebuild_error(*reply[1:]))

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ModelNotReady("the model process closed the connection (server shutting down?)"))
        self._waiting.clear()
        self.closed.set()


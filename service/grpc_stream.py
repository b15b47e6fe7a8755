"""gRPC ModelStreamInfer: many requests in flight on one bidirectional stream, answered as they finish.

Each request is decoded, run through the core and encoded exactly as a unary ModelInfer; its answer (or its
error, as `error_message`) is written on the stream with the request's id, so answers may come out of order
and a bad request never ends the stream.

Decoupled models (`model_transaction_policy { decoupled: true }`): an ONNX graph yields exactly one result per
request, so a decoupled model here sends one response per request; when the client asks for it
(`triton_enable_empty_final_response`, tritonclient's `enable_empty_final_response=True`), that response is
flagged `triton_final_response: false` and followed by an empty response flagged `triton_final_response:
true`, as Triton sends it. A non-decoupled model's single response is itself the final one (flagged true when
the client asked for the flag).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from service.core import InferenceCore, InferResponse
from service.errors import ServingError, unexpected
from service.protocol_grpc import Unparsable, decode_infer, encode_infer

log = logging.getLogger("modelserve.grpc")

ENABLE_EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL_FLAG = "triton_final_response"
# Responses waiting to be written per stream, and requests taken but not yet answered: past either the reader
# stops taking new requests, so an unread stream pushes back on its client (gRPC flow control) instead of
# growing the server (30,000 unread 20 KB requests held 1.1 GB before).
MAX_PENDING_RESPONSES = 1024
MAX_IN_FLIGHT = 1024


async def infer_one(core: InferenceCore, request: pb.ModelInferRequest, *,
                    encode: Callable[[InferResponse], Any] = encode_infer) -> Any:
    """Decode (inputs may be in shared memory), infer, encode: one ModelInfer, traced when sampled. `encode`:
    encode_infer (a message, as the stream needs) or encode_infer_wire (its bytes, for unary ModelInfer)."""
    trace = core.tracing.begin(request.model_name) if core.tracing.enabled else None
    try:
        req = decode_infer(request, shm=core.shm, max_tensor_bytes=core.max_request_bytes)
        if trace is not None:
            trace.decoded(req)
            req.trace = trace
        result = await core.infer(req)
        resp = encode(result)
    except ServingError as exc:
        if trace is not None:
            trace.end(error=exc)
        raise
    if trace is not None:
        trace.end(version=result.model_version)
    return resp


def _error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    resp = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                 id=request.id)
    return pb.ModelStreamInferResponse(error_message=message, infer_response=resp)


def _flag(resp: pb.ModelInferResponse, final: bool) -> pb.ModelInferResponse:
    resp.parameters[FINAL_FLAG].bool_param = final
    return resp


async def answer(core: InferenceCore,
                 request: pb.ModelInferRequest | Unparsable) -> list[pb.ModelStreamInferResponse]:
    """The stream responses for one request: its result (plus the empty final one for a decoupled model
    when asked), or one error_message response (a message that is not a ModelInferRequest gets one too, and
    the stream goes on)."""
    if isinstance(request, Unparsable):
        return [pb.ModelStreamInferResponse(error_message=(
            f"ModelStreamInfer: a message on the stream is not a valid {request.message_type} protobuf "
            f"({request.reason}); expected a serialized ModelInferRequest"))]
    try:
        decoupled = core.model_config(request.model_name, request.model_version or None) \
            .model_transaction_policy.decoupled
        result = await infer_one(core, request)
    except ServingError as exc:
        return [_error(request, exc.message)]
    except Exception as exc:  # one broken request must not end everyone's stream
        log.exception("unhandled error in a streamed request")
        return [_error(request, unexpected(exc).message)]
    empty_final = ENABLE_EMPTY_FINAL in request.parameters and \
        request.parameters[ENABLE_EMPTY_FINAL].bool_param
    if not empty_final:
        return [pb.ModelStreamInferResponse(infer_response=result)]
    if not decoupled:
        return [pb.ModelStreamInferResponse(infer_response=_flag(result, True))]
    final = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version, id=result.id)
    return [pb.ModelStreamInferResponse(infer_response=_flag(result, False)),
            pb.ModelStreamInferResponse(infer_response=_flag(final, True))]


class StreamShutdown(Exception):
    """The server began shutting down: the stream took no more requests, and answered every one it took."""


class _StopReading:
    """Stops a stream's reader when the server begins shutting down, by cancelling it only while it waits for
    the next request. NOTE: no Task per read: racing each read against shutdown (asyncio.wait) cost 14 µs of
    CPU per read more than a plain read; this costs 0.3 µs. A request whose read completes in the same instant
    as the cancel is dropped unanswered: it was not taken, and the stream's closing UNAVAILABLE says so."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self.reading = False  # the reader waits for the next request
        self.stopped = False  # the reader stopped because the server is stopping (not because the client left)
        self.reader: asyncio.Task | None = None
        self._waiter = asyncio.ensure_future(stopping.wait())
        self._waiter.add_done_callback(self._fire)

    @property
    def fired(self) -> bool:
        return self._waiter.done() and not self._waiter.cancelled()

    def _fire(self, waiter: asyncio.Future) -> None:
        if not waiter.cancelled() and self.reading and self.reader is not None:
            self.reader.cancel()

    def close(self) -> None:
        self._waiter.cancel()

    async def next(self, iterator: AsyncIterator[Any]) -> Any:
        """The next request; None when the client closed its side or the server is stopping."""
        if self.fired:
            self.stopped = True
            return None
        self.reading = True
        try:
            return await anext(iterator)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not self.fired:
                raise  # the client left: the stream is being closed
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()
            self.stopped = True
            return None
        finally:
            self.reading = False


async def stream_infer(core: InferenceCore,
                       requests: AsyncIterator[pb.ModelInferRequest | Unparsable]) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """Read requests as they come, run each concurrently, yield responses as they finish. When the server
    begins shutting down the stream stops reading, answers what it took, then raises StreamShutdown (rather
    than holding the stream open until the exit timeout cuts it, losing the requests in flight then)."""
    out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(MAX_PENDING_RESPONSES)
    tasks: set[asyncio.Task] = set()
    guard = _StopReading(core.stopping)
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def run_one(request: pb.ModelInferRequest | Unparsable) -> None:
        try:
            for resp in await answer(core, request):
                await out.put(resp)
        finally:
            slots.release()

    async def read_all() -> None:
        try:
            try:
                iterator = aiter(requests)
                while (request := await guard.next(iterator)) is not None:
                    await slots.acquire()
                    task = asyncio.create_task(run_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except Exception:  # reading broke: still answer every request already taken (none is lost)
                log.exception("reading a ModelStreamInfer stream failed")
            if tasks:
                await asyncio.wait(set(tasks))
        finally:
            await out.put(None)  # the client closed its side and every answer is written

    reader = guard.reader = asyncio.create_task(read_all())
    try:
        while (item := await out.get()) is not None:
            yield item
    finally:
        # The client went away (or the exit timeout cut the stream): stop reading and drop what is in flight.
        reader.cancel()
        guard.close()
        for task in list(tasks):
            task.cancel()
    if guard.stopped:
        raise StreamShutdown("the server is shutting down: this stream takes no more requests and has answered "
                             "every request it took; send the rest to another server")

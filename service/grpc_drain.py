"""A gRPC server's drain on SIGTERM: every call gets its answer or UNAVAILABLE "shutting down", never CANCELLED.

NOTE: grpc.aio's `server.stop(grace)` (grpc-core's Server::ShutdownAndNotify) first kills every call that has
reached the server but not yet a handler, and every call that reaches it before its clients read the GOAWAY,
and they end CANCELLED (https://github.com/grpc/grpc/issues/41785, fix proposed in grpc/grpc#41786): the
client cannot tell whether it ran. Under steady traffic some call is always in that state, so stop() is the
last step here, taken when no call is on its way:

1. draining (from SIGTERM): the port stays open. Calls already running finish; a new call that reads (health,
   readiness, metadata, statistics) is answered as before; any other new call is refused at once with
   UNAVAILABLE "the server is shutting down".
2. closing (once no call is running): every new call is held, unanswered and not run. Clients with a call
   held send nothing more, so once no call has arrived for QUIET_SECS none is on its way.
3. stop(): grpc-core closes the port and sends GOAWAY, then the held calls are refused with UNAVAILABLE.
   Their clients read the GOAWAY before that answer, so their next call goes to a new connection (refused:
   the port is closed) rather than into this server's last instant.

`DrainGate` wraps the server's generic handlers (every method goes through one; register no method handlers
beside it, e.g. with a generated add_...Servicer_to_server, or those calls bypass the gate).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

log = logging.getLogger("modelserve.grpc")

# How long no call may have arrived before stop(): a client whose call was just answered sends its next one
# well within it (loopback: microseconds; a busy client process: milliseconds), and a client with a call held
# sends nothing. Bounded by the exit timeout, and by MAX_QUIET_WAIT_SECS under a flood of new connections.
QUIET_SECS = 0.2
MAX_QUIET_WAIT_SECS = 3.0
# A quiet wait that ended this many times later than asked was a stalled loop, not silence.
LATE_WAKE_FACTOR = 1.5
# After stop() began, before the held calls are answered: grpc-core has queued its GOAWAY by then.
RELEASE_AFTER_SECS = 0.05
SHUTTING_DOWN = ("the server is shutting down: this call was not run; send it to another server "
                 "(or retry once this one is back)")
# Calls a draining server still answers: they read state, run no model and change nothing.
READS = frozenset({
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    *(f"/inference.GRPCInferenceService/{m}" for m in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
        "ModelStatistics", "RepositoryIndex", "SystemSharedMemoryStatus", "CudaSharedMemoryStatus",
        "TraceSetting", "LogSettings")),
})


class Phase(enum.Enum):
    OPEN = "open"
    DRAINING = "draining"
    CLOSING = "closing"


class DrainGate(grpc.GenericRpcHandler):
    """Every call of a gRPC server passes here: counted while it runs, refused or held while the server stops.

    NOTE: one wrapped method handler per method, built on first use and kept, so a call costs a dict lookup
    and one more coroutine frame (the count) rather than a new handler per call.
    """

    def __init__(self, handlers: Iterable[grpc.GenericRpcHandler] = (), *, reads: frozenset[str] = READS,
                 quiet_s: float = QUIET_SECS, max_quiet_wait_s: float = MAX_QUIET_WAIT_SECS) -> None:
        self._handlers = list(handlers)
        self._reads = reads
        self._quiet_s, self._max_quiet_wait_s = quiet_s, max_quiet_wait_s
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self.phase = Phase.OPEN
        self.running = 0  # calls in a handler now (held calls are not counted)
        self.draining = asyncio.Event()  # set when the drain begins: streams that would run on end
        self.closing = asyncio.Event()  # set when nothing runs any more and new calls are held
        self._idle: asyncio.Event | None = None
        self._released: asyncio.Event | None = None
        self._arrived = asyncio.Event()  # a call came while closing
        self._forced = False

    def add(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Serve these handlers' methods too (before the server starts)."""
        self._handlers.extend(handlers)

    # ------------------------------------------------------------------ per call

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method  # type: ignore[attr-defined]
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            inner = next((h for g in self._handlers if (h := g.service(handler_call_details)) is not None), None)
            if inner is None:
                return None
            wrapped = self._wrap(method, inner)
            if len(self._wrapped) < 1024:  # only the service's own methods are looked up again and again
                self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, inner: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        read = method in self._reads
        if inner.response_streaming:
            behaviour = self._streaming(inner.stream_stream if inner.request_streaming else inner.unary_stream, read)
            make = grpc.stream_stream_rpc_method_handler if inner.request_streaming else grpc.unary_stream_rpc_method_handler
        else:
            behaviour = self._unary(inner.stream_unary if inner.request_streaming else inner.unary_unary, read)
            make = grpc.stream_unary_rpc_method_handler if inner.request_streaming else grpc.unary_unary_rpc_method_handler
        return make(behaviour, request_deserializer=inner.request_deserializer,
                    response_serializer=inner.response_serializer)

    def _unary(self, run: Callable, read: bool) -> Callable:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.phase is not Phase.OPEN:
                await self._refuse_unless(read, context)
            self.running += 1
            try:
                return await run(request, context)
            finally:
                self._finished()

        return unary

    def _streaming(self, run: Callable, read: bool) -> Callable:
        if not inspect.isasyncgenfunction(run):  # it writes its responses with context.write(): a coroutine
            return self._unary(run, read)

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if self.phase is not Phase.OPEN:
                await self._refuse_unless(read, context)
            self.running += 1
            try:
                async for response in run(request, context):
                    yield response
            finally:
                self._finished()

        return streaming

    def _finished(self) -> None:
        self.running -= 1
        if self.running == 0 and self._idle is not None:
            self._idle.set()

    async def _refuse_unless(self, read: bool, context: grpc.aio.ServicerContext) -> None:
        """Return (the call runs) for a read while draining; otherwise end the call with UNAVAILABLE, at once
        while draining, once the server has begun to stop while closing."""
        if self.phase is Phase.DRAINING and read:
            return
        if self.phase is Phase.CLOSING and self._released is not None:
            self._arrived.set()
            await self._released.wait()
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    # ------------------------------------------------------------------ the server's stop

    def begin_drain(self) -> None:
        """Refuse new calls that would run a model or change anything (reads are still answered)."""
        if self.phase is Phase.OPEN:
            self.phase = Phase.DRAINING
            self.draining.set()

    def stop_now(self) -> None:
        """End the drain's waits at once (a second signal; the caller cancels what runs)."""
        self._forced = True
        self.begin_drain()
        for event in (self._idle, self._released):
            if event is not None:
                event.set()

    async def stop(self, server: grpc.aio.Server, *, deadline: float) -> None:
        """Drain `server` (see the module's steps) and stop it; what still runs at `deadline` (loop time) is
        cancelled."""
        loop = asyncio.get_running_loop()
        self.begin_drain()
        self._idle = asyncio.Event()
        if self.running and not self._forced:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, deadline - loop.time()))
        self._released = asyncio.Event()
        if self._forced:
            self._released.set()
        self.phase = Phase.CLOSING
        self.closing.set()
        give_up = min(deadline, loop.time() + self._max_quiet_wait_s)
        while not self._forced and (left := give_up - loop.time()) > 0:
            self._arrived.clear()
            began = loop.time()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=min(self._quiet_s, left))
            except asyncio.TimeoutError:
                if loop.time() - began <= self._quiet_s * LATE_WAKE_FACTOR:
                    break  # no call for QUIET_SECS: none is on its way
                # NOTE: the loop woke late (a stalled loop, a loaded machine): calls that grpc-core received
                # meanwhile may not have reached a handler yet, so the silence proves nothing; watch again.
        stopping = asyncio.ensure_future(server.stop(grace=max(0.0, deadline - loop.time())))
        await asyncio.sleep(RELEASE_AFTER_SECS)
        self._released.set()
        await stopping

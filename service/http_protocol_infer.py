"""V2 infer answered inside the HTTP protocol, without an ASGI task (setting `http_protocol_infer`).

NOTE: py-spy at concurrency 32 (docs/BENCHMARKS.md, "Per-request cost, round 3") put uvicorn's per-request
RequestResponseCycle + its asyncio task at ~18 % of the event loop, and uvloop's task steps in most of its
~39 %: per infer request a task, the run_asgi/route/read_body/receive/core.infer coroutines and a task wake-up
when the batch's future resolves. Here a complete infer POST is decoded in the parser's callback, queued on
the core (InferenceCore.submit), and answered from the future's done callback (InferenceCore.finish): no task,
no coroutine. uvicorn's cycle object is kept, so its connection handling (pipelining, keep-alive, flow control,
disconnects, `Connection: close`, the drain) is unchanged. Decoding and encoding are the ASGI route's own
functions (service/http_infer.py: InferFastPath.decode, InferCall.answer, error_answer, infer_head).

Only the narrow case is taken: POST /v2/models/{m}[/versions/{v}]/infer whose body arrived with its headers
(or before its turn on a pipelined connection), within the byte limit, without Transfer-Encoding, Expect,
Upgrade or Content-Encoding, on the app this module knows (the infer route, optionally behind the access
middleware, whose check is applied here first) and with uvicorn's access log off. Everything else starts the
ASGI task as before.
"""

from __future__ import annotations

import re
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.access import AccessMiddleware, AccessPolicy, http_denial
from service.core import InferResponse, PendingInfer
from service.errors import RequestCancelled, ServingError
from service.http_infer import INFER_PATH, InferCall, InferFastPath, error_answer, failure, infer_head
from service.http_server import InFlight, TimedHttpToolsProtocol, write_answer

# Headers whose request the ASGI route handles: a body still arriving or compressed, an interim 100, a switch.
_ASGI_ONLY = (b"transfer-encoding", b"content-encoding", b"expect", b"upgrade")
# uvicorn's answer when an ASGI app returns without starting a response (RequestResponseCycle.send_500_response).
_500_HEAD = b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\n"
_500_BODY = b"Internal Server Error"


def infer_route(app: Any) -> tuple[InferFastPath | None, AccessPolicy | None]:
    """The infer route inside uvicorn's loaded app and the access policy in front of it; (None, None) when the
    app is anything else (another wrapper would not see the requests answered here)."""
    policy = None
    if type(app) is AccessMiddleware:
        policy, app = app.policy, app.app
    return (app, policy) if type(app) is InferFastPath else (None, None)


class InferHttpProtocol(TimedHttpToolsProtocol):
    """TimedHttpToolsProtocol that answers complete V2 infer requests itself (see the module's NOTE)."""

    in_flight: InFlight = InFlight()  # one per server, set by http_server.protocol_class()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._route, self._policy = (None, None) if self.access_log else infer_route(self.app)
        self._parsing = False
        # The request whose headers just completed, until its body does (then answered here) or the data
        # received so far ends without it (then the ASGI route reads the rest, with its timeouts and limits).
        self._deferred: tuple[RequestResponseCycle, re.Match, dict[bytes, bytes]] | None = None
        self._taken: RequestResponseCycle | None = None  # the last request answered here (one at a time)

    def connection_lost(self, exc: Exception | None) -> None:
        # NOTE: uvicorn marks only the connection's latest request disconnected; with pipelining that is a later
        # one, and the running request's answer would be written to the closed transport (uvloop raises). Marked
        # here too, its batcher skips it if not started yet and nothing is written.
        taken = self._taken
        if taken is not None and not taken.response_complete:
            taken.disconnected = True
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._parsing = True
        try:
            super().data_received(data)
        finally:
            self._parsing = False
        if self._deferred is not None:
            cycle = self._deferred[0]
            self._deferred = None
            HttpToolsProtocol._start_asgi_task(self, cycle, self.app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        deferred = self._deferred
        if deferred is not None and deferred[0] is self.cycle and self.cycle.more_body is False:
            self._deferred = None
            self._take(*deferred)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:  # type: ignore[override]
        """uvicorn's hook for a request whose turn came (at its headers, or popped from the pipeline)."""
        taken = self._eligible(cycle) if self._route is not None and app is self.app else None
        if taken is None:
            super()._start_asgi_task(cycle, app)
        elif cycle.more_body is False:  # a pipelined request whose body is already here
            self._take(cycle, *taken)
        elif self._parsing and cycle is self.cycle:
            self._deferred = (cycle, *taken)
        else:
            super()._start_asgi_task(cycle, app)

    @staticmethod
    def _eligible(cycle: RequestResponseCycle) -> tuple[re.Match, dict[bytes, bytes]] | None:
        scope = cycle.scope
        if scope["method"] != "POST" or cycle.waiting_for_100_continue:
            return None
        match = INFER_PATH.match(scope["path"])
        if match is None:
            return None
        headers = dict(scope["headers"])
        if any(name in headers for name in _ASGI_ONLY):
            return None
        return match, headers

    def _take(self, cycle: RequestResponseCycle, match: re.Match, headers: dict[bytes, bytes]) -> None:
        """Check, decode and queue the request (the ASGI route's order: access, size, decode, core)."""
        route = self._route
        assert route is not None
        denied = http_denial(self._policy, cycle.scope) if self._policy is not None else None
        if denied is None and len(cycle.body) > route.limit:
            HttpToolsProtocol._start_asgi_task(self, cycle, self.app)  # 413, as the route words it
            return
        body, cycle.body = bytes(cycle.body), bytearray()  # as the route's receive() takes it
        self.flow.resume_reading()  # as receive() does
        self.in_flight.add(cycle)
        self._taken = cycle
        call = None
        try:
            if denied is not None:
                raise denied
            call = route.decode(headers, body, model=match["model"], version=match["version"])
            call.req.client_gone = lambda: cycle.disconnected
            pending = route.core.submit(call.req)
        except Exception as exc:
            # Answered on the next loop turn, as the route would be: never inside the parser's callbacks.
            self.loop.call_soon(self._answer_error, cycle, failure(exc, call))
            return
        if pending is None:  # raw texts to tokenize first: the core's async path, in a task
            self._run(cycle, self._infer_later(cycle, call))
        else:
            pending.future.add_done_callback(lambda _: self._answered(cycle, call, pending))

    def _answered(self, cycle: RequestResponseCycle, call: InferCall, pending: PendingInfer) -> None:
        try:
            resp = self._route.core.finish(pending)  # type: ignore[union-attr]
        except Exception as exc:
            self._failed(cycle, call, exc)
            return
        self._respond(cycle, call, resp)

    async def _infer_later(self, cycle: RequestResponseCycle, call: InferCall) -> None:
        try:
            resp = await self._route.core.infer(call.req)  # type: ignore[union-attr]
        except Exception as exc:
            self._failed(cycle, call, exc)
            return
        self._respond(cycle, call, resp)

    def _respond(self, cycle: RequestResponseCycle, call: InferCall, resp: InferResponse) -> None:
        try:
            parts, header_len = call.answer(resp)
        except Exception as exc:
            self._answer_error(cycle, failure(exc, call))
            return
        self._write(cycle, status=200, head=infer_head(parts, header_len), parts=parts)

    def _failed(self, cycle: RequestResponseCycle, call: InferCall, exc: Exception) -> None:
        """Called from an `except` block (failure() logs an unexpected error with its traceback)."""
        if not isinstance(exc, RequestCancelled):
            self._answer_error(cycle, failure(exc, call))
        elif cycle.disconnected:
            self.in_flight.discard(cycle)  # the client is gone: nobody to answer
        else:  # the ASGI route returns without answering; uvicorn then answers 500 and closes
            self.logger.error("ASGI callable returned without starting response.")
            cycle.keep_alive = False
            self._write(cycle, status=500, head=_500_HEAD, parts=[_500_BODY])

    def _answer_error(self, cycle: RequestResponseCycle, exc: ServingError) -> None:
        headers, body = error_answer(exc)
        head = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
        self._write(cycle, status=exc.status_code, head=head, parts=[body])

    def _write(self, cycle: RequestResponseCycle, *, status: int, head: bytes, parts: list) -> None:
        """The answer, as uvicorn's `send` would write it: nothing to a gone client, after a paused writer."""
        if cycle.disconnected:
            self.in_flight.discard(cycle)
            return
        if cycle.flow.write_paused:
            self._run(cycle, self._write_when_drained(cycle, status=status, head=head, parts=parts))
            return
        try:
            write_answer(cycle, status=status, head=head, parts=parts)
        finally:
            self.in_flight.discard(cycle)

    async def _write_when_drained(self, cycle: RequestResponseCycle, *, status: int, head: bytes,
                                  parts: list) -> None:
        await cycle.flow.drain()
        self._write(cycle, status=status, head=head, parts=parts)

    def _run(self, cycle: RequestResponseCycle, coro: Any) -> None:
        """A task for the rare step that must wait, kept where uvicorn keeps its own (the drain waits for it)."""
        task = self.loop.create_task(coro)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

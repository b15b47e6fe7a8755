"""A connection's transport and flow control, as our uvicorn protocol (service/http_server.py) wraps them:
writes gathered into one, and reading kept paused behind a bounded pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import Sized
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl


class CorkableTransport:
    """A connection's transport that can hold writes back and send them as one.

    NOTE: uvicorn writes a response's status line and headers, then its body, in two transport.write calls:
    two send syscalls (and two TCP segments) per response; py-spy put ~10% of the event loop's time at
    concurrency 32 in those writes. While `corked`, writes are gathered and go out in one write. Everything
    else is the wrapped transport's.
    """

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._transport.write(data)
        else:
            self._held.append(data)

    def cork(self) -> None:
        if self._held is None:
            self._held = []

    def uncork(self) -> None:
        held, self._held = self._held, None
        if held:
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.uncork()  # uvicorn closes right after the last write of a `Connection: close` answer
        self._transport.close()


class PipelineFlow(FlowControl):
    """uvicorn's FlowControl that keeps reading paused while `pipeline` holds `limit` requests or more.

    NOTE: uvicorn pauses reading when a request arrives behind an unanswered one, but resumes it whenever a
    request starts (its receive(), its on_response_complete), and each read parses a whole chunk (~1,000 small
    requests): a client that pipelined without reading answers had everything it sent queued as request objects,
    server RSS +500 MB in 30 s over 4 connections and growing. Past `limit`, what the client sends waits in its
    own socket (TCP pushes back). No deadlock: a request waiting for its body is the last one parsed, so the
    pipeline behind it is empty.
    """

    def __init__(self, transport: asyncio.Transport, *, pipeline: Sized, limit: int) -> None:
        super().__init__(transport)
        self._pipeline = pipeline
        self._limit = limit

    def resume_reading(self) -> None:
        if len(self._pipeline) < self._limit:
            super().resume_reading()

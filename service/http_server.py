"""uvicorn, adapted to our lifecycle: a header timeout per connection and a bounded, lossless drain.

`Server` (service/server.py) owns the signals; this module only knows how to serve HTTP and how to stop:
stop listening, let every request already received finish (answered with `Connection: close`), wait until no
connection has received anything for a moment (a request on its way is received and answered, not cut), then
close what is left — at the latest at the deadline the server gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Iterator, Sequence

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from service.errors import HeadersTooLarge, InvalidInput, NotImplementedByServer, RequestTimeout, ServingError
from service.grpc_drain import QUIET_SECS
from service.hosts import host_error
from service.http_flow import CorkableTransport, PipelineFlow
from service.http_refusals import VERSION_REASONS, framing_error, version_error

log = logging.getLogger("modelserve.http")

_VERSIONS = ("1.0", "1.1")  # the HTTP versions this port speaks; any other request line gets 505
_ACCEPT_WAIT_SECS = 2.0  # at most this long to take what waits in the accept queues before closing them


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request already refused (version, head size; see _feed)."""


@contextlib.contextmanager
def corked(receive: Callable | None) -> Iterator[None]:
    """Writes made inside the block go out as one, when `receive` is a uvicorn cycle's on a CorkableTransport
    (under another ASGI server: as that server writes them)."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if not isinstance(transport, CorkableTransport):
        yield
        return
    transport.cork()
    try:
        yield
    finally:
        transport.uncork()


def respond_at_once(receive: Callable | None, *, status: int, head: bytes, parts: Sequence[bytes | memoryview]) -> bool:
    """Write a whole response (status line, uvicorn's default headers, `head`, the body `parts`) in one
    transport write and complete the uvicorn cycle as its `send` would; False (nothing written) where the
    caller must use the ASGI `send`: another ASGI server, a started response, a gone client, a paused writer.

    NOTE: uvicorn's `send`, awaited twice per response, re-validates every header with two regexes, builds the
    status line and headers, and the body is joined once more by CorkableTransport: ~20 us of the event loop
    per response at concurrency 32 (py-spy, zoo `cnn`). `head` is our own fixed, lower-case header lines
    ("name: value\\r\\n" each, content-length among them), so none of those checks can fail for it. The
    bytes on the wire are the same as through `send`: same header order, `connection: close` when the
    connection will not be kept alive (draining, or the client asked), then the close.
    """
    cycle = getattr(receive, "__self__", None)
    if (type(cycle) is not RequestResponseCycle or cycle.response_started or cycle.disconnected
            or cycle.flow.write_paused or not isinstance(cycle.transport, CorkableTransport)):
        return False
    write_answer(cycle, status=status, head=head, parts=parts)
    return True


def write_answer(cycle: RequestResponseCycle, *, status: int, head: bytes, parts: Sequence[bytes | memoryview]) -> None:
    """respond_at_once's write, on a cycle known to be unanswered, connected and writable."""
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    lines: list[bytes | memoryview] = [STATUS_LINE[status]]
    for name, value in cycle.default_headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(head)
    if not cycle.keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    lines.extend(parts)
    cycle.transport.write(b"".join(lines))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


def arrived(receive: Callable) -> bool:
    """Whether `receive` will return at once: the body (or its next chunk, or the disconnect) is already here.

    NOTE: uvicorn's cycle sets `message_event` when body bytes, the end of the body or a disconnect arrived;
    its receive() then returns without waiting, so the caller needs no stall timer for it (a timer armed and
    cancelled per request on the hot path). False under another ASGI server: the caller keeps its timer.
    """
    event = getattr(getattr(receive, "__self__", None), "message_event", None)
    return isinstance(event, asyncio.Event) and event.is_set()


def body_complete(receive: Callable) -> bool:
    """Whether uvicorn has the request's whole body already (False under another ASGI server: not known)."""
    cycle = getattr(receive, "__self__", None)
    return getattr(cycle, "more_body", True) is False


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection whose request headers do not arrive in time.

    NOTE: uvicorn has a keep-alive timeout (idle between requests) but no header timeout, so a client that
    connects and sends its headers a byte at a time holds the connection forever (slowloris). A timer armed
    when the connection opens (and when the next request's first byte arrives) and cancelled when the
    headers are complete closes it with 408. Subclassing is the narrowest place: the parser callbacks are
    only visible here.
    """

    header_timeout: float = 10.0  # set by protocol_class()
    max_pipelined = 128  # requests received and queued behind an unanswered one before reading pauses
    max_header_bytes: int = 65536  # set by protocol_class()
    grpc_port: int | None = None  # set by protocol_class(): named in the 505 to an HTTP/2 client

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkableTransport(transport))  # type: ignore[arg-type]
        self.flow = PipelineFlow(self.transport, pipeline=self.pipeline, limit=self.max_pipelined)
        self._draining = False
        self._closes: RequestResponseCycle | None = None  # the request the drain chose to close the connection after
        self.last_received = 0.0  # loop time of the last bytes received while draining
        # NOTE: one timer per connection that re-arms itself, not one armed and cancelled per request (two
        # timer operations per request on the hot path): it checks when the pending headers began.
        self._headers_since: float | None = self.loop.time()
        self._head_bytes = 0  # bytes received while the current request's line and headers are incomplete
        self._chunk = 0  # size of the chunk being parsed
        self._replaying = False
        self._heads_completed = 0
        self._refusal: bytes | None = None  # a 431/408 answer owed after the answers to earlier requests
        self._framing = 0  # bytes received in a row inside a body without adding to it (chunk lines, trailer)
        self._lingering = False
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout,
                                                                              self._check_headers)
        if getattr(self.server_state, "draining", False):
            self.shutdown()  # accepted from the queue while the server stops listening (DrainingServer)

    def data_received(self, data: bytes) -> None:
        # NOTE: httptools buffers a header until it is complete and uvicorn sets no bound, so 300 MiB of header
        # (1.4 s on loopback) was held in memory. Counted per received chunk, after parsing it: at most one
        # chunk past the bound is ever held. A head that began after another completed in this chunk holds at
        # most this chunk: counted from the next one (counting the whole chunk refused 4,000 pipelined GETs).
        # A head that completes is measured exactly in on_headers_complete (a chunk can hold all of it).
        if self._refusal is not None or self._lingering:
            return  # refused, or answered before its body came: nothing more is read
        if self._draining:
            self.last_received = self.loop.time()
        completed = self._heads_completed
        self._chunk = len(data)
        cycle = self.cycle
        in_body = -1 if cycle is None or self._headers_since is not None else len(cycle.body)
        self._feed(data)
        if self._refusal is not None or self._lingering:
            return  # refused (version, head, framing): answered or owed, nothing more counted
        if self._headers_since is None:
            self._head_bytes = 0
            if in_body >= 0 and self.cycle is cycle and cycle.more_body and len(cycle.body) == in_body:
                self._count_framing(len(data))
            else:
                self._framing = 0
            return
        self._head_bytes = 0 if self._heads_completed != completed else self._head_bytes + len(data)
        if self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse_head()

    def _count_framing(self, size: int) -> None:
        """NOTE: llhttp reads chunk extensions and trailer fields without bound and httptools reports neither
        (a 100 kB extension was read and ignored; uvicorn appended trailers to the request's headers), so bytes
        that arrive inside a body without adding to it are counted, in a row, against the head bound: a
        constant-time check per read, never met by real chunk lines (a few bytes each)."""
        self._framing += size
        if self._framing > self.max_header_bytes:
            self._refuse_in_body(InvalidInput(
                f"chunk extensions or trailer fields exceed {self.max_header_bytes} bytes; send chunks without "
                "extensions and a short trailer (setting http_max_header_bytes)"))

    def _head_size(self) -> int:
        """Bytes of the current request's target and header lines (as parsed; the method and version aside)."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _refuse_head(self) -> None:
        self._refuse(HeadersTooLarge(f"request line and headers exceed {self.max_header_bytes} bytes; send shorter "
                                     "headers (setting http_max_header_bytes)"))

    def _feed(self, data: bytes) -> None:
        """uvicorn's data_received, except that an Upgrade (h2c, websocket, ...) is declined as RFC 9110 §7.8
        allows: the request is served as HTTP/1.1 with its body, and the connection goes on.

        NOTE: httptools skips the body of a request with `Connection: upgrade` + `Upgrade` and stops parsing
        (HttpParserUpgrade); uvicorn then runs the request with an empty body and drops every byte after it,
        so `curl --http2 -d @req.json` got 400 "not valid JSON" and later requests on the connection were never
        answered (uvicorn#2722, httptools#124, open). A loop, not recursion: one chunk may hold many such requests.
        """
        self._unset_keepalive_if_required()
        while data:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserError as exc:
                if self._refusal is not None or self._lingering:
                    return  # on_headers_complete refused the request (version, head size) and stopped the parser
                self._refuse_unreadable(str(exc))
                return
            except httptools.HttpParserUpgrade as upgrade:
                data = self._decline_upgrade(data[upgrade.args[0]:])

    def _decline_upgrade(self, rest: bytes) -> bytes:
        """What to feed a fresh parser after a request whose Upgrade is declined: its body's framing, replayed
        as a head that on_headers_complete skips (the request's cycle exists), then the bytes that followed."""
        self.parser = httptools.HttpRequestParser(self)
        cycle = self.cycle  # (CONNECT never comes here: on_headers_complete refuses it)
        framing = [b"%s: %s\r\n" % (name, value) for name, value in self.scope["headers"]
                   if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")]
        if not framing:
            return rest
        cycle.more_body = True
        cycle.message_event.clear()
        self._replaying = True
        return b"".join([b"POST / HTTP/1.1\r\n", *framing, b"\r\n", rest])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_since is None:
            self._headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        version = self.parser.get_http_version()
        if version not in _VERSIONS:
            self._refuse_version()
            raise _Refused  # httptools stops and raises HttpParserCallbackError from it (see _feed)
        self._headers_since = None
        self._heads_completed += 1
        if self._replaying:  # the replayed head of a request whose Upgrade was declined (see _feed)
            self._replaying = False
            return
        # NOTE: the per-chunk count in data_received misses a head that arrives whole in one read (loopback reads
        # are up to 256 KiB), or that began in a chunk where an earlier request ended: it bounds memory, not the
        # head. Measured exactly only when the chunks it could span exceed the bound (not on the hot path).
        if self._head_bytes + self._chunk > self.max_header_bytes and self._head_size() > self.max_header_bytes:
            self._refuse_head()
            raise _Refused  # stops the parser before the request's cycle exists (see _feed)
        # NOTE: uvicorn served HTTP/1.1 without Host, and any Host value, with any allow-list (RFC 9112 §3.2:
        # 400). A list comprehension over the few headers, and a verdict cached per Host value.
        refused: ServingError | None = host_error([v for k, v in self.headers if k == b"host"],
                                                  http11=version == "1.1")
        if refused is None and not self.url.startswith(b"/"):
            refused = self._target_error()
        if refused is not None:
            self._refuse(refused)
            raise _Refused
        super().on_headers_complete()
        # NOTE: httptools reports trailer fields as headers: uvicorn appended them to the running request's
        # headers (a trailer `Host` or `Content-Length` was then proxied as a header by the front ends). They
        # go to a list nobody reads (RFC 9110 §6.5.1 lets a recipient drop them).
        self.headers = []
        if self._draining:
            self._close_after_last()

    def _target_error(self) -> ServingError | None:
        """A request target other than origin-form (`/path`): absolute-form is served with its authority as the
        Host, which it replaces (RFC 9112 §3.2.2; the allow-list then judges it); CONNECT's authority-form gets
        501 (not a proxy); `OPTIONS *` is served."""
        method = self.parser.get_method()
        if method == b"CONNECT":
            return NotImplementedByServer("CONNECT is not supported: this server is not a proxy; send requests "
                                          "for its own routes ('GET /v2/health/live HTTP/1.1')")
        if self.url == b"*" and method == b"OPTIONS":
            return None
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            url = None
        if url is None or (url.schema or b"").lower() not in (b"http", b"https") or not url.host:
            return InvalidInput(f"the request target {self.url[:100].decode('latin-1')!r} is neither '/path' nor "
                                "'http://host/path' (RFC 9112 section 3.2); send '/path' with a Host header")
        authority = url.host if url.port is None else b"%s:%d" % (url.host, url.port)
        if b":" in url.host:
            authority = b"[%s]" % authority if url.port is None else b"[%s]:%d" % (url.host, url.port)
        self.headers[:] = [(k, v) for k, v in self.headers if k != b"host"] + [(b"host", authority)]
        return None

    def _refuse_version(self, *, preface: bool = False) -> None:
        """505 (RFC 9110 §15.6.6) for a request line of another version, then close: nothing after it is read.

        NOTE: llhttp accepts `HTTP/2.0`, `HTTP/0.9` and a line without a version (0.9) and uvicorn then served
        them as HTTP/1.x; it refuses 1.2, 3.0, `HTTP/3` and the HTTP/2 preface itself, which uvicorn answered
        with a plain-text 400. All get this answer: what the port speaks, and where HTTP/2 is served."""
        self._refuse(version_error(self.parser.get_http_version(), preface=preface, grpc_port=self.grpc_port))

    def _refuse_unreadable(self, reason: str) -> None:
        """The answer to a request llhttp stopped reading: 505 for a version, else framing_error's 400/501; in
        the head, after the answers owed to earlier requests; in a body, see _refuse_in_body."""
        if any(words in reason for words in VERSION_REASONS):
            self._refuse_version(preface="PRI" in reason)
        elif self._headers_since is None and self.cycle is not None and not self.cycle.response_complete:
            self._refuse_in_body(framing_error(reason))
        else:
            self._refuse(framing_error(reason))

    def _refuse_in_body(self, error: ServingError) -> None:
        """Refuse the latest request, whose head was read and whose body cannot be, then close.

        NOTE: uvicorn wrote its 400 at once and closed, before the answers still owed to earlier pipelined
        requests (lost). Not started yet: the request is answered in its turn by a tiny app; started: its app
        sees a disconnect (its answer, if any, is dropped) and the refusal goes out now."""
        cycle = self.cycle
        self._lingering = True  # nothing more is read
        cycle.keep_alive = False
        if self.pipeline and self.pipeline[0][0] is cycle:
            cycle.more_body = False
            self.pipeline[0] = (cycle, _Answer(error))  # type: ignore[assignment]
            return
        if cycle.response_started:
            self.transport.close()
            return
        cycle.response_complete = cycle.disconnected = True
        cycle.message_event.set()
        self._lingering = False
        self._refuse(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _check_headers(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        since = self._headers_since
        wait = self.header_timeout if since is None else since + self.header_timeout - self.loop.time()
        if wait <= 0:
            self._headers_timed_out()
            return
        self._header_timer = self.loop.call_later(wait, self._check_headers)

    def _headers_timed_out(self) -> None:
        self._refuse(RequestTimeout(f"request headers not received within {self.header_timeout:g} s"))

    def _refuse(self, error: ServingError) -> None:
        """Answer before any route runs (the request's headers never completed), then close; after the answers
        still owed to earlier (pipelined) requests, which were written after it before and then lost. The
        status line is uvicorn's (Python's http.HTTPStatus phrases), as on every other answer."""
        self._cancel_header_timer()
        body = orjson.dumps({"error": error.message})
        head = b"%scontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % (
            STATUS_LINE[error.status_code], len(body))
        self._refusal = head + body
        if not self.busy and not self.pipeline:
            self._send_refusal(self._refusal)

    def _linger(self) -> None:
        """Half-close after an answer sent before its request's body arrived (a 413 for a 2 GB Content-Length,
        a 401, an unknown model): the client reads the answer and the end of the stream, and stops sending.

        NOTE: uvicorn kept the connection and read (and dropped) the rest of the declared body, up to 2 GB; a
        plain close() with unread bytes makes the kernel send a reset, which can destroy the answer before the
        client reads it, so it is a lingering close: what arrives is dropped until the client closes its side
        (eof_received then closes the transport) or header_timeout passes."""
        self._lingering = True
        if isinstance(self.transport, CorkableTransport):
            self.transport.uncork()  # the answer may still be held back (corked)
        self.transport.write_eof()
        self.loop.call_later(self.header_timeout, self.transport.close)

    def _send_refusal(self, answer: bytes) -> None:
        self.transport.write(answer)
        self._linger()  # not close(): with the rest of a long head unread, the reset could destroy the answer

    def on_response_complete(self) -> None:
        cycle = self.cycle
        if cycle.more_body and cycle.response_complete and not self.transport.is_closing():
            self._linger()
            return
        super().on_response_complete()
        if self._refusal is not None and not self.busy and not self.pipeline and not self.transport.is_closing():
            self._send_refusal(self._refusal)

    @property
    def busy(self) -> bool:
        """A request on this connection has not been answered yet."""
        return self.cycle is not None and not self.cycle.response_complete

    def shutdown(self) -> None:
        """Start draining: a request in progress is answered with `Connection: close`; an idle connection
        stays open until the drain ends, so a request already on the wire is still answered."""
        self._draining = True
        if self.busy:
            self._close_after_last()

    def _close_after_last(self) -> None:
        """Close the connection after the last request received (`self.cycle`), answering those before it.

        NOTE: marking every request that arrives while draining closed the connection after the first of a
        pipelined batch, leaving the rest unanswered (HTTP lets the client retry them, but they had reached us).
        A request whose answer has started is not marked: its head went out without `Connection: close`, so the
        client sends its next request on this connection, which was then closed under it (the front end's proxy
        writes the head, then the body when the model process's comes). That next request closes it instead.
        """
        earlier, last = self._closes, self.cycle
        if earlier is not None and earlier is not last and not earlier.response_started:
            earlier.keep_alive = True  # a later request came: it closes the connection instead
        if last is not None and last.keep_alive and not last.response_started:
            last.keep_alive = False
            self._closes = last


class _Answer:
    """An ASGI app that answers `error` and closes: a pipelined request refused before its turn came."""

    def __init__(self, error: ServingError) -> None:
        self.error = error

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        body = orjson.dumps({"error": self.error.message})
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": self.error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class InFlight:
    """Requests a protocol answers without an ASGI task (service/http_protocol_infer.py): what a drain waits for
    besides uvicorn's tasks. One per server; a request is added when taken and discarded once answered or given up."""

    __slots__ = ("_cycles", "_idle")

    def __init__(self) -> None:
        self._cycles: set[RequestResponseCycle] = set()
        self._idle: asyncio.Future | None = None  # only while a drain waits

    def __len__(self) -> int:
        return len(self._cycles)

    def add(self, cycle: RequestResponseCycle) -> None:
        self._cycles.add(cycle)

    def discard(self, cycle: RequestResponseCycle) -> None:
        self._cycles.discard(cycle)
        if self._idle is not None and not self._cycles and not self._idle.done():
            self._idle.set_result(None)

    def idle(self) -> asyncio.Future:
        """Done once no request is in flight."""
        self._idle = asyncio.get_running_loop().create_future()
        if not self._cycles:
            self._idle.set_result(None)
        return self._idle


def protocol_class(*, header_timeout: float, max_header_bytes: int = 65536, grpc_port: int | None = None,
                   base: type[TimedHttpToolsProtocol] = TimedHttpToolsProtocol) -> type[TimedHttpToolsProtocol]:
    """`base` with this server's limits and its own InFlight (`base`: the protocol answering infer itself)."""
    return type("HttpProtocol", (base,), {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes,
                                          "grpc_port": grpc_port, "in_flight": InFlight()})


def accept_queue(sock: socket.socket) -> int | None:
    """Connections waiting in a listening TCP socket's accept queue; None where that is not known (not Linux,
    not a listening TCP socket).

    NOTE: Linux reports it in TCP_INFO's `tcpi_unacked` for a listener (`ss -lnt` shows it as Recv-Q); no library
    reads it, and the field's offset (after 8 one-byte fields and 4 u32s) is fixed by the kernel's ABI.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    if len(info) < 28 or info[0] != 10:  # 10: TCP_LISTEN
        return None
    return int(struct.unpack_from("I", info, 24)[0])


class DrainState(ServerState):
    """uvicorn's ServerState, plus whether the server is draining: a connection accepted meanwhile drains too."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains up to `deadline` (loop time) and installs no signal handlers."""

    deadline: float = 0.0

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.server_state = self._state = DrainState()
        self._cut_short = asyncio.Event()

    def stop_now(self) -> None:
        """End the drain at once (a second signal)."""
        self.force_exit = True
        self._cut_short.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # service.server.Server owns SIGTERM/SIGINT: one signal drives HTTP, gRPC and the models

    def begin_drain(self) -> None:
        """Mark what is in progress to close after its answer, now (at the signal), not at uvicorn's next tick.

        NOTE: uvicorn checks `should_exit` every 0.1 s; answers written meanwhile went out keep-alive, and at 1-2
        batches per tick a loaded machine answered every queued request before the drain had marked one. Each
        connection's `shutdown` is idempotent and leaves idle connections open, so `shutdown()` repeats it."""
        self._state.draining = True
        for conn in list(self.server_state.connections):
            conn.shutdown()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.begin_drain()
        await self._stop_listening(sockets or [])
        await self._wait_for_requests()
        await self._wait_until_quiet()
        left = [c for c in self.server_state.connections if getattr(c, "busy", False)]
        if left or self.server_state.tasks or self._in_flight:
            log.warning("exit timeout: closing %d connection(s) with requests still in progress", len(left))
        for task in list(self.server_state.tasks):
            task.cancel()
        for conn in list(self.server_state.connections):
            conn.transport.close()
        for server in self.servers:
            await server.wait_closed()

    async def _stop_listening(self, sockets: list[socket.socket]) -> None:
        """Refuse new connections without resetting those the kernel has already queued: take them, then close.

        NOTE: closing a listening socket resets every connection waiting in its accept queue; their clients had
        connected and sent a request ("Connection reset by peer", aiohttp's "Can not write request body"). With
        --http-workers the front ends' SO_REUSEPORT sockets close some ms apart and clients told `Connection:
        close` by one reconnect to the other: one close was seen with 2 queued (TCP_INFO). Linux >= 5.14 can move
        them to a sibling socket (net.ipv4.tcp_migrate_req), a sysctl a container may not set. So the backlog
        shrinks to 0 (a SYN past it is dropped; the client resends it a second later and is refused at connect),
        the loop accepts what waits (drained like the rest), and each socket closes in the step that saw its
        queue empty.
        """
        listening = [sock for sock in sockets if accept_queue(sock) is not None]
        for sock in listening:
            sock.listen(0)
        loop = asyncio.get_running_loop()
        give_up = min(self.deadline, loop.time() + _ACCEPT_WAIT_SECS)
        # A kernel counter, polled: there is no event to wait on.
        while any(accept_queue(sock) for sock in listening) and loop.time() < give_up:
            if self._cut_short.is_set():
                break
            await asyncio.sleep(0.001)
        for server in self.servers:
            server.close()

    @property
    def _in_flight(self) -> InFlight:
        """Requests answered by the protocol itself (no task): empty unless the protocol is one that does."""
        found = getattr(self.config.http_protocol_class, "in_flight", None)
        return found if isinstance(found, InFlight) else InFlight()

    async def _wait_until_quiet(self) -> None:
        """Until no connection has received anything for QUIET_SECS (since the drain began), answering what
        comes meanwhile, or the deadline.

        NOTE: a client whose keep-alive answer came just before the drain sends its next request at once; if
        the drain found nothing to wait for and closed the connection, that request was cut unanswered
        (aiohttp: ServerDisconnectedError; a pipelined batch: no answer at all) and its client cannot tell
        whether it ran. Waiting a moment lets it arrive: it is answered with `Connection: close`. A client
        that sends on an idle connection just as it is closed can still be cut (HTTP/1.1 has no GOAWAY).
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        while not self._cut_short.is_set():
            last = max([began, *(getattr(c, "last_received", 0.0) for c in self.server_state.connections)])
            wait = min(last + QUIET_SECS, self.deadline) - loop.time()
            if wait <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._cut_short.wait(), timeout=wait)
            await self._wait_for_requests()

    async def _wait_for_requests(self) -> None:
        """Until every request received has been answered (uvicorn's tasks and the protocol's own), or the
        deadline."""
        loop = asyncio.get_running_loop()
        cut = loop.create_task(self._cut_short.wait())
        in_flight = self._in_flight
        try:
            while (self.server_state.tasks or in_flight) and not cut.done():
                remaining = self.deadline - loop.time()
                if remaining <= 0:
                    return
                # New requests may start meanwhile (on an idle keep-alive connection): loop until none.
                waiting: set[asyncio.Future] = {cut, *self.server_state.tasks}
                if in_flight:
                    waiting.add(in_flight.idle())
                await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()

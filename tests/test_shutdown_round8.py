"""Shutdown with front ends, round 8: the drain cuts no HTTP request (docs/RELIABILITY.md).

Before, with `--http-workers 2`, 1-2 requests per stop were cut without an answer, for two reasons found with
a packet capture on lo and the front ends' logs: closing a listening socket reset the connections queued in
its accept queue (clients told `Connection: close` by one front end had reconnected to the other, which closed
its socket some ms later), and a keep-alive connection whose answer's head had gone out before the drain began
was closed after that answer, under the client's next request.

These tests drive the real DrainingServer, our uvicorn protocol and the real app on a loopback socket in the
test's own event loop (asyncio's, whose order makes the first race exact: see the first test).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn

from service.http_server import DrainingServer, accept_queue, protocol_class
from service.ports import PortSpec, bind_tcp
from service.server import Server, uvicorn_config
from service.settings import ServerSettings
from tests.conftest import wait_until
from tests.onnx_builders import scale_model
from tests.test_batcher import until
from tests.test_shutdown_round6 import _read_answer


@asynccontextmanager
async def listening(config: uvicorn.Config) -> AsyncIterator[tuple[DrainingServer, socket.socket]]:
    """A DrainingServer listening on a loopback port (as `Server` starts it), with a long exit timeout."""
    config.load()
    http = DrainingServer(config)
    http.lifespan = config.lifespan_class(config)
    sock = bind_tcp(PortSpec("HTTP", "127.0.0.1", 0, "--http-port"), listen=True)
    await http.startup(sockets=[sock])
    http.deadline = asyncio.get_running_loop().time() + 600
    try:
        yield http, sock
    finally:
        sock.close()


def _infer(i: int) -> bytes:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [i] * 4}]}).encode()
    return b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _answer_then_end(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bytes]:
    """One answer, then whatever comes until the connection ends (b"" when it ends cleanly)."""
    sock.settimeout(60)
    with sock.makefile("rb") as f:
        status, headers, body = _read_answer(f)
        return status, headers, body, f.read()


async def test_connections_waiting_in_the_accept_queue_when_the_drain_begins_are_answered(tmp_path: Path) -> None:
    # Before: the drain's first step closed the listening socket, and the kernel reset the 8 connections that
    # waited in its accept queue, each with its request sent ("Connection reset by peer").
    root = tmp_path / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    settings = ServerSettings(model_repository=root, http_host="127.0.0.1", http_port=0)
    server = Server(settings)
    await server.start()
    clients: list[socket.socket] = []
    try:
        async with listening(uvicorn_config(settings, server.app)) as (http, sock):
            port = sock.getsockname()[1]
            # The loop does not run until the next await: the kernel completes these connections and keeps them
            # (and their requests) in the accept queue.
            clients += [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(8)]
            for i, client in enumerate(clients):
                client.sendall(_infer(i))
            # (waited on without awaiting: the loop must not run and accept them)
            wait_until(lambda: accept_queue(sock) == 8, timeout=60, what="8 connections in the accept queue")
            # asyncio runs this task's first step before the accept callback of the next poll: the drain begins
            # with all 8 still queued.
            drain = asyncio.ensure_future(http.shutdown(sockets=[sock]))
            answers = await asyncio.gather(*(asyncio.to_thread(_answer_then_end, c) for c in clients))
            await asyncio.wait_for(drain, 120)
            assert _refused(port)  # and the port is closed once they are taken
    finally:
        for client in clients:
            client.close()
        await server.stop()
    for i, (status, headers, body, rest) in enumerate(answers):
        assert status == 200, body
        assert json.loads(body)["outputs"][0]["data"] == [2.0 * i] * 4
        assert headers.get("connection") == "close" and rest == b""


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


class _HeadThenBody:
    """Answers in two writes as the front end's proxy does (the head, then the body when the model process's
    comes); the first answer's body waits for `release`."""

    def __init__(self) -> None:
        self.head_sent = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, scope: dict, receive, send) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
        if self.calls == 1:
            self.head_sent.set()
            await self.release.wait()
        await send({"type": "http.response.body", "body": b"%d\n" % self.calls})


async def test_keep_alive_answer_whose_head_left_before_the_drain_does_not_close_under_the_next_request() -> None:
    # Before: the drain marked the request `Connection: close` after its head had gone out without it; the
    # connection closed after the body, and the client's next request (sent at once: it had been told nothing)
    # was cut ("Connection reset by peer" / "Server disconnected").
    app = _HeadThenBody()
    config = uvicorn.Config(app, loop="none", lifespan="off", ws="none", access_log=False, log_level="warning",
                            proxy_headers=False,
                            http=protocol_class(header_timeout=60))
    async with listening(config) as (http, sock):
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        get = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n"
        writer.write(get)
        await asyncio.wait_for(app.head_sent.wait(), 60)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        assert b"connection: close" not in head.lower()

        drain = asyncio.ensure_future(http.shutdown(sockets=[sock]))
        await until(lambda: all(c._draining for c in http.server_state.connections), "the drain to begin")
        app.release.set()
        assert await asyncio.wait_for(reader.readexactly(2), 60) == b"1\n"

        writer.write(get)  # a keep-alive client's next request
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
        assert await asyncio.wait_for(reader.read(), 60) == b"2\n"  # its answer, then the end
        await asyncio.wait_for(drain, 120)
        writer.close()
    assert app.calls == 2

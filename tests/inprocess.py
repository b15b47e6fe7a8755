"""In-process servers: the real `Server` (repository, core, HTTP app, optional gRPC) without a subprocess.

HTTP is driven through httpx's ASGI transport (no socket); gRPC, where a test needs it, listens on a
loopback port inside the test's own event loop. Only what needs a real process (signals, disconnects,
tritonclient end to end) starts `modelserve serve` in a subprocess (tests.conftest.run_server).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from service.server import Server
from service.settings import ServerSettings


@asynccontextmanager
async def inprocess_server(repo: Path, **settings: Any) -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    """A started Server on `repo` and an httpx client bound to its ASGI app; stopped on exit."""
    server = Server(ServerSettings(**{"model_repository": repo, "http_host": "127.0.0.1", **settings}))
    async with server:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as client:
            yield server, client

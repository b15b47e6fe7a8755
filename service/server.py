"""The server's lifecycle: the repository, the HTTP (uvicorn) and gRPC transports and the metrics port.

`Server` owns them all (not FastAPI's lifespan), so tests can start the same core in-process and talk to
`server.app` through httpx's ASGI transport, and `modelserve serve` runs the very same object on sockets.
"""

from __future__ import annotations

import logging

import grpc
import uvicorn
import uvloop

from service.core import InferenceCore
from service.grpc_app import start_grpc_server
from service.http_app import create_app
from service.http_infer import InferFastPath
from service.metrics import Metrics, MetricsPortServer
from service.repository import ModelRepository
from service.settings import ServerSettings

log = logging.getLogger("modelserve.server")

# How long gRPC calls in flight may take to finish once the server is stopping.
GRPC_GRACE_S = 5.0


class Server:
    """One modelserve process: a repository and the transports in front of one InferenceCore."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.repository = ModelRepository(settings)
        self.metrics = Metrics(lambda: [mv.stats for mv in self.repository.ready_versions()])
        self.core = InferenceCore(self.repository, self.metrics)
        self.app = create_app(self.core, settings)
        self._grpc: grpc.aio.Server | None = None
        self._metrics_port: MetricsPortServer | None = None

    async def start(self) -> None:
        """Load the repository, then open gRPC (HTTP is opened by `serve`)."""
        await self.repository.start()
        if self.settings.grpc_port is not None:
            self._grpc = await start_grpc_server(self.core, host=self.settings.http_host, port=self.settings.grpc_port,
                                                 max_message_bytes=self.settings.max_request_bytes)

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace=GRPC_GRACE_S)
            self._grpc = None
        await self.repository.close()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(self) -> None:
        """Run until SIGINT/SIGTERM: uvicorn drains HTTP, then gRPC and the models are stopped."""
        if self.settings.metrics_port is not None:
            self._metrics_port = MetricsPortServer(self.metrics.registry, host=self.settings.http_host,
                                                   port=self.settings.metrics_port)
            log.info("metrics also on port %d", self.settings.metrics_port)
        http = uvicorn.Server(uvicorn_config(self.settings, self.app))
        try:
            async with self:
                await http.serve()
        finally:
            if self._metrics_port is not None:
                self._metrics_port.close()


def uvicorn_config(settings: ServerSettings, app: InferFastPath) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        loop="none",  # the loop is ours (run_server), shared with gRPC
        http="httptools",
        lifespan="off",  # Server owns the lifecycle
        log_level=settings.log_level,
        access_log=False,  # one log line per inference costs more than the inference on small models
        timeout_keep_alive=30,
    )


def run_server(settings: ServerSettings) -> None:


    uvloop.run(Server(settings).serve())

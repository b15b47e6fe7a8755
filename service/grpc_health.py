"""The standard gRPC health service (`grpc.health.v1.Health`) on the KServe V2 gRPC port, as Triton serves it.

Kubernetes' `grpc:` probes and `grpc_health_probe` call Check. Triton answers it from the server's readiness
(`TRITONSERVER_ServerIsReady`) for whatever service name is asked: SERVING when ready, NOT_SERVING otherwise
(models loading or failed under strict readiness, or draining). The service itself is grpcio-health-checking's
servicer; this module only keeps its status equal to the core's readiness and makes every name mean the server.
Watch streams end (after NOT_SERVING) when the server drains, so they never hold the exit timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from grpc_health.v1 import health as reference
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "grpc.health.v1.Health"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How often a Watch stream looks at the readiness again.
REFRESH_SECS = 0.5


class ReadinessHealth(reference.aio.HealthServicer):
    """grpcio-health-checking's servicer with one status, the server's readiness, under every service name."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        super().__init__()
        self._ready = ready
        self._draining = asyncio.Event()

    async def refresh(self) -> int:
        """Set the overall status ("") from the readiness now; watchers hear of a change."""
        status = SERVING if self._ready() else NOT_SERVING
        if self._server_status.get("") != status:
            await self.set("", status)
        return status

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        # NOTE: Triton ignores the service name (any name reports the server), where the reference servicer
        # answers NOT_FOUND for names it was not told about; a Triton user's probe may name its service.
        return health_pb2.HealthCheckResponse(status=await self.refresh())

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        await self.refresh()
        watching = asyncio.ensure_future(super().Watch(health_pb2.HealthCheckRequest(service=""), context))
        others = [asyncio.ensure_future(self._draining.wait()), asyncio.ensure_future(self._refresh_forever())]
        try:
            await asyncio.wait({watching, *others}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*others, watching):
                task.cancel()
            await asyncio.gather(watching, *others, return_exceptions=True)
        if self._draining.is_set():  # the last word before the stream ends: this server is going away
            await context.write(health_pb2.HealthCheckResponse(status=NOT_SERVING))

    async def _refresh_forever(self) -> None:
        """Readiness changes no Check observed (a model finishing its load) reach the Watch streams."""
        while True:
            await asyncio.sleep(REFRESH_SECS)
            await self.refresh()

    async def drain(self) -> None:
        """NOT_SERVING from now on; Watch streams end, so a draining server is not held open by them."""
        await self.enter_graceful_shutdown()
        self._draining.set()


def add_health_service(server: grpc.aio.Server, health: ReadinessHealth) -> None:
    """Serve grpc.health.v1.Health on `server`."""
    health_pb2_grpc.add_HealthServicer_to_server(health, server)


"""The standard gRPC health service (`grpc.health.v1.Health`) on the KServe V2 gRPC port, as Triton serves it.

Kubernetes' `grpc:` probes and `grpc_health_probe` call Check. Triton answers it from the server's readiness
(`TRITONSERVER_ServerIsReady`) for whatever service name is asked: SERVING when ready, NOT_SERVING otherwise
(models loading or failed under strict readiness, or draining). Messages, stubs and registration are
grpcio-health-checking's; Watch streams end (after NOT_SERVING) when the server drains.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How often a Watch stream looks at the readiness again.
REFRESH_SECS = 0.5


class ReadinessHealth(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health with one status, the server's readiness, under every service name.

    NOTE: the reference servicer (grpc_health.v1.health.aio.HealthServicer) keeps a status per registered name
    and answers NOT_FOUND for any other name, where Triton answers every name with the server's readiness; and
    its Watch never ends, so a draining grpc.aio server would wait out the whole exit timeout for each open
    stream (cancelling it mid-write fails the call: GRPC_CALL_ERROR_TOO_MANY_OPERATIONS). So Check and Watch
    are these few lines on the package's messages and service registration.
    """

    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready
        self._draining = asyncio.Event()

    def status(self) -> int:
        return SERVING if self._ready() and not self._draining.is_set() else NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        return health_pb2.HealthCheckResponse(status=self.status())

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        """The status now, then each change (looked at every REFRESH_SECS); ends once the server drains."""
        last = None
        while True:
            # NOTE: read before the status and the write: a drain that begins while the previous status is
            # being written takes one more turn, so its NOT_SERVING is sent (it was lost in 1 of ~10 runs).
            draining = self._draining.is_set()
            status = self.status()
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if draining:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._draining.wait(), timeout=REFRESH_SECS)

    def drain(self) -> None:
        """NOT_SERVING from now on; Watch streams send it and end, so they do not hold a draining server."""
        self._draining.set()


def health_handler(health: ReadinessHealth) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health's methods on `health`, as a generic handler.

    NOTE: not the package's add_HealthServicer_to_server: it also registers the methods as registered
    methods, which grpc.aio resolves before (and without) the generic handlers, so the calls would bypass the
    server's DrainGate (service/grpc_drain.py).
    """
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(
            health.Check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
        "Watch": grpc.unary_stream_rpc_method_handler(
            health.Watch, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
    })

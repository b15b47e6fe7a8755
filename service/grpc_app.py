"""KServe V2 over gRPC, with the service definition tritonclient ships, so `tritonclient.grpc` works unchanged.

Like the HTTP transport, the servicer only parses (service/protocol_grpc.py), calls the InferenceCore, and
serializes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.core import InferenceCore
from service.errors import ServingError
from service.grpc_extensions import ExtensionServicer
from service.grpc_stream import infer_one
from service.protocol_grpc import grpc_status

log = logging.getLogger("modelserve.grpc")

def _serving_errors_to_status(method: Callable) -> Callable:
    """Answer a ServingError with its gRPC status code and message (the HTTP transport maps it to JSON)."""

    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ServingError as exc:
            await context.abort(grpc_status(exc), exc.message)

    return wrapper


class InferenceServicer(ExtensionServicer, pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService on the InferenceCore; method names are fixed by the service definition."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.core.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.core.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.core.server_metadata(), pb.ServerMetadataResponse())

    @_serving_errors_to_status
    async def ModelMetadata(self, request, context):
        meta = self.core.model_metadata(request.name, request.version or None)
        return json_format.ParseDict(meta, pb.ModelMetadataResponse())

    @_serving_errors_to_status
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.core.model_config(request.name, request.version or None))

    @_serving_errors_to_status
    async def ModelStatistics(self, request, context):
        stats = self.core.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        rows = self.core.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    @_serving_errors_to_status
    async def RepositoryModelLoad(self, request, context):
        await self.core.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_serving_errors_to_status
    async def RepositoryModelUnload(self, request, context):
        await self.core.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @_serving_errors_to_status
    async def ModelInfer(self, request, context):
        return await infer_one(self.core, request)


async def start_grpc_server(core: InferenceCore, *, host: str, port: int, max_message_bytes: int,
                            interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """Start the gRPC server on the running event loop (it shares the core, batchers and models with HTTP).
    `interceptors`: access control (service/access.grpc_interceptors), none when nothing is enforced."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options, interceptors=list(interceptors) or None)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind the gRPC port {host}:{port}")
    await server.start()
    log.info("KServe V2 gRPC on %s:%d", host, bound)
    return server

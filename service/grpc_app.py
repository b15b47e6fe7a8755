"""KServe V2 over gRPC, with the service definition tritonclient ships, so `tritonclient.grpc` works unchanged.

Like the HTTP transport, the servicer only parses (service/protocol_grpc.py), calls the InferenceCore, and
serializes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.core import InferenceCore
from service.errors import ServingError, unexpected
from service.grpc_drain import DrainGate
from service.grpc_extensions import ExtensionServicer
from service.grpc_health import ReadinessHealth, health_handler
from service.grpc_stream import infer_one
from service.grpc_tls import GrpcTls, add_port
from service.ports import StartupError
from service.protocol_grpc import (
    Unparsable,
    encode_infer_wire,
    grpc_status,
    lenient,
    load_overrides,
    unload_dependents,
)

log = logging.getLogger("modelserve.grpc")

_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def _guarded(method: Callable, name: str) -> Callable:
    """Every exception as a gRPC status: ServingError by its status, anything else INTERNAL (logged); never
    UNKNOWN. An unparsable request is INVALID_ARGUMENT."""

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{name}: the request is not a valid {request.message_type} protobuf "
                                f"({request.reason})")
        try:
            return await method(request, context)
        except grpc.aio.AbortError:
            raise  # context.abort() already chose the status
        except ServingError as exc:
            await context.abort(grpc_status(exc), exc.message)
        except Exception as exc:
            log.exception("gRPC %s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{name}: {unexpected(exc).message}")

    return handler


async def _unimplemented(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this method is not supported by modelserve")


def _serializer(message_class: Any) -> Callable[[Any], bytes]:
    """The message's SerializeToString, passing bytes through (ModelInfer answers already serialized)."""
    serialize = message_class.SerializeToString

    def to_bytes(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return to_bytes


def generic_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """GRPCInferenceService's method table, built from the service descriptor tritonclient ships, with
    lenient deserializers and every handler guarded (the generated add_..._to_server allows neither)."""
    handlers = {}
    for method in _SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        serialize = _serializer(getattr(pb, method.output_type.name))
        if method.client_streaming and method.server_streaming:  # ModelStreamInfer: errors go on the stream
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                getattr(servicer, method.name), request_deserializer=lenient(request_class),
                response_serializer=serialize)
            continue
        own = getattr(type(servicer), method.name) is not getattr(pb_grpc.GRPCInferenceServiceServicer, method.name)
        behaviour = _guarded(getattr(servicer, method.name), method.name) if own else _unimplemented
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=lenient(request_class), response_serializer=serialize)
    return grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers)


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

    async def ModelMetadata(self, request, context):
        meta = self.core.model_metadata(request.name, request.version or None)
        return json_format.ParseDict(meta, pb.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.core.served_config(request.name, request.version or None))

    async def ModelStatistics(self, request, context):
        stats = self.core.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        rows = self.core.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    async def RepositoryModelLoad(self, request, context):
        config, files = load_overrides(request)
        await self.core.load_model(request.model_name, config=config, files=files)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self.core.unload_model(request.model_name, unload_dependents=unload_dependents(request))
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request, context):
        return await infer_one(self.core, request, encode=encode_infer_wire)


async def start_grpc_server(core: InferenceCore, *, host: str, port: int, max_message_bytes: int,
                            interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                            start: bool = True, address: str | None = None,
                            health: ReadinessHealth | None = None, tls: GrpcTls | None = None,
                            gate: DrainGate | None = None) -> grpc.aio.Server:
    """Start the gRPC server on the running event loop (it shares the core, batchers and models with HTTP).
    `interceptors`: access control (service/access.grpc_interceptors), none when nothing is enforced.
    `start=False` only binds the port (the caller starts it once the models are loaded). `address`: bind this
    instead of host:port (`--http-workers`: a Unix socket only the front ends reach). `health`: the
    grpc.health.v1 service beside it (the caller drains it; default: one on the core's readiness). `tls`: serve
    host:port over TLS (never the front ends' Unix socket). `gate`: every call passes it, so that the caller can
    drain the server without a call ending CANCELLED (gate.stop(server)) rather than server.stop()."""
    # NOTE: gRPC turns SO_REUSEPORT on by default, which let a second server bind the same port and
    # silently take half the connections; a clash must be an error instead.
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options, interceptors=list(interceptors) or None)
    gate = gate or DrainGate()
    gate.add([generic_handler(InferenceServicer(core)), health_handler(health or ReadinessHealth(core.ready))])
    server.add_generic_rpc_handlers((gate,))
    try:
        bound = server.add_insecure_port(address) if address else add_port(server, f"{host}:{port}", tls)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise StartupError(f"cannot bind gRPC port {port} on {host}: address in use or not available; "
                           "stop the other server or pass --grpc-port")
    if start:
        await server.start()
    log.info("KServe V2 gRPC on %s%s", address or f"{host}:{bound}", " (TLS)" if tls and not address else "")
    return server

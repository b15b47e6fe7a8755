"""gRPC in a front-end process of `--http-workers N` (experimental; see service/frontends.py).

Each front end serves the public gRPC port beside its siblings (grpc.so_reuseport=1). ModelInfer is decoded
here and run by the model process over the front end's link (service/frontend_link.py); every other RPC, and a
ModelInfer this process does not decode (shared-memory tensors, an unparsable message), is forwarded as raw
bytes to the model process's own gRPC server on a Unix socket, so every RPC answers as the single process does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2 as pb

from service.errors import ServingError, unexpected
from service.frontend_link import FrontEndLink, ModelProcessDecodes, NoShm
from service.grpc_drain import DrainGate
from service.grpc_tls import GrpcTls, add_port
from service.protocol_grpc import decode_infer, encode_infer_wire, grpc_status

log = logging.getLogger("modelserve.frontend")

SERVICE = "inference.GRPCInferenceService"
INFER = f"/{SERVICE}/ModelInfer"
STREAM = f"/{SERVICE}/ModelStreamInfer"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"  # server-streaming: the one RPC the unary forwarder cannot carry
# grpc.aio client's status when one of its own batches failed (e.g. a write after the server ended the call).
_CORE_LOST_STATUS = "Internal error from Core"
STREAM_SHUT = ("the server is shutting down: this stream takes no more requests, and a request it did not answer "
               "was not run; send the rest to another server")
NOT_SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING).SerializeToString()


def _to_bytes(response: Any) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


class ForwardingHandler(grpc.GenericRpcHandler):
    """ModelInfer decoded here; everything else forwarded byte for byte to the model process."""

    def __init__(self, *, link: FrontEndLink, upstream: grpc.aio.Channel, max_request_bytes: int,
                 fast: bool, draining: asyncio.Event | None = None) -> None:
        self.draining = draining or asyncio.Event()  # this front end drains: forwarded Watch streams end
        self.link = link
        self.upstream = upstream
        self.limit = max_request_bytes
        self.fast = fast

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method  # type: ignore[attr-defined]
        if method == STREAM:
            return grpc.stream_stream_rpc_method_handler(self._stream)
        if method == HEALTH_WATCH:
            return grpc.unary_stream_rpc_method_handler(self._watch)
        if method == INFER and self.fast:
            return grpc.unary_unary_rpc_method_handler(self._infer, response_serializer=_to_bytes)
        return grpc.unary_unary_rpc_method_handler(self._forwarder(method))

    async def _infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = pb.ModelInferRequest.FromString(raw)
        except Exception:  # protobuf's DecodeError: the model process answers INVALID_ARGUMENT as it always does
            return await self._forward(INFER, raw, context)
        try:
            req = decode_infer(request, shm=NoShm(), max_tensor_bytes=self.limit)  # type: ignore[arg-type]
            return encode_infer_wire(await self.link.infer(req))
        except ModelProcessDecodes:  # shared-memory tensors: the regions are the model process's
            return await self._forward(INFER, raw, context)
        except ServingError as exc:
            await context.abort(grpc_status(exc), exc.message)
        except Exception as exc:  # never UNKNOWN: INTERNAL, logged, as service/grpc_app.py does
            log.exception("gRPC ModelInfer failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"ModelInfer: {unexpected(exc).message}")

    def _forwarder(self, method: str) -> Any:
        async def forward(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._forward(method, raw, context)

        return forward

    async def _forward(self, method: str, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        call = self.upstream.unary_unary(method)
        try:
            return await call(raw, metadata=context.invocation_metadata(), timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
            raise  # not reached: abort raises

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = self.upstream.stream_stream(STREAM)(requests, metadata=context.invocation_metadata())
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INTERNAL and exc.details() == _CORE_LOST_STATUS and self.draining.is_set():
                # NOTE: the model process ended the stream (UNAVAILABLE, every request it took answered) while
                # this side was still writing requests to it; grpc.aio's client then reports its failed write,
                # not the status. The answers it sent have been passed on; the rest were not taken.
                await context.abort(grpc.StatusCode.UNAVAILABLE, STREAM_SHUT)
            await context.abort(exc.code(), exc.details() or "")


    async def _watch(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """The model process's Watch stream, until this front end drains: then NOT_SERVING and the end (the
        model process's own Watch ends only after the front ends are gone)."""
        call = self.upstream.unary_stream(HEALTH_WATCH)(raw, metadata=context.invocation_metadata())
        replies = aiter(call)
        draining = asyncio.ensure_future(self.draining.wait())
        try:
            while True:
                reply = asyncio.ensure_future(anext(replies))
                await asyncio.wait({reply, draining}, return_when=asyncio.FIRST_COMPLETED)
                if not reply.done():
                    reply.cancel()
                    yield NOT_SERVING
                    return
                yield reply.result()
        except StopAsyncIteration:
            return
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            draining.cancel()
            call.cancel()


async def start_grpc_frontend(*, link: FrontEndLink, host: str, port: int, upstream: str, max_request_bytes: int,
                              fast: bool, tls: GrpcTls | None = None
                              ) -> tuple[grpc.aio.Server, grpc.aio.Channel, DrainGate]:
    """The front end's gRPC server on the shared public port, its channel to the model process, and the gate
    every call passes (its stop() drains the server: service/grpc_drain.py)."""
    limits = [("grpc.max_receive_message_length", max_request_bytes),
              ("grpc.max_send_message_length", max_request_bytes)]
    channel = grpc.aio.insecure_channel(upstream, options=limits)
    server = grpc.aio.server(options=[*limits, ("grpc.so_reuseport", 1)])
    gate = DrainGate()
    gate.add([ForwardingHandler(link=link, upstream=channel, max_request_bytes=max_request_bytes, fast=fast,
                                draining=gate.draining)])
    server.add_generic_rpc_handlers((gate,))
    add_port(server, f"{host}:{port}", tls)
    await server.start()
    return server, channel, gate

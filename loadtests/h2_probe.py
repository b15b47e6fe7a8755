"""A measurement probe, not a server engine: unary ModelInfer over HTTP/2 with the `h2` library on the server's
own event loop, to price what grpcio's aio machinery costs per request (docs/BENCHMARKS.md, "gRPC cost,
round 3").

    python -m loadtests.h2_probe serve --model-repository DIR --http-port 8000 --grpc-port 8001

runs `modelserve serve` unchanged except that the gRPC port is this probe. It answers ModelInfer only (the
request handling is the servicer's own `infer_one` + `encode_infer_wire`, as grpcio's path runs it); every
other method gets UNIMPLEMENTED. Missing on purpose, because a probe needs none of it: outbound flow control
(responses must fit the client's window), deadlines, compression, metadata, access control, streaming,
cancellation, graceful drain. `python -m loadtests.cpu_per_request --h2-probe` runs it beside the real server.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from tritonclient.grpc import service_pb2 as pb

from service import cli, server
from service.core import InferenceCore
from service.errors import ServingError
from service.grpc_stream import infer_one
from service.protocol_grpc import encode_infer_wire, grpc_status

MODEL_INFER = b"/inference.GRPCInferenceService/ModelInfer"
# Header validation off: the probe prices the transport, and grpc-go/C-core clients send valid headers.
_CONFIG = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                                    validate_outbound_headers=False, normalize_inbound_headers=False,
                                    normalize_outbound_headers=False)
_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_WINDOW = 1 << 24  # per-stream receive window we advertise
_CONNECTION_WINDOW = 1 << 30  # connection receive window; replenished in one WINDOW_UPDATE when half is used


class _Connection(asyncio.Protocol):
    def __init__(self, core: InferenceCore) -> None:
        self.core = core
        self.h2 = h2.connection.H2Connection(config=_CONFIG)
        self.bodies: dict[int, list[bytes]] = {}
        self.paths: dict[int, bytes] = {}
        self.tasks: set[asyncio.Task] = set()
        self.flush_scheduled = False
        self.unacknowledged = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW})
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if type(event) is h2.events.DataReceived:
                self.bodies[event.stream_id].append(event.data)
                self.unacknowledged += event.flow_controlled_length
            elif type(event) is h2.events.RequestReceived:
                self.bodies[event.stream_id] = []
                self.paths[event.stream_id] = dict(event.headers).get(b":path", b"")
            elif type(event) is h2.events.StreamEnded:
                self._dispatch(event.stream_id)
            elif type(event) is h2.events.ConnectionTerminated:
                self.transport.close()
        # Streams end after one request, so only the connection window needs replenishing, and in bulk.
        if self.unacknowledged > _CONNECTION_WINDOW // 2:
            self.h2.increment_flow_control_window(self.unacknowledged)
            self.unacknowledged = 0
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def _dispatch(self, stream_id: int) -> None:
        body = b"".join(self.bodies.pop(stream_id))
        task = asyncio.ensure_future(self._answer(stream_id, self.paths.pop(stream_id), body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, stream_id: int, path: bytes, body: bytes) -> None:
        message = None
        trailers = [(b"grpc-status", b"0")]
        try:
            if path != MODEL_INFER:
                trailers = [(b"grpc-status", b"12"), (b"grpc-message", b"the h2 probe serves ModelInfer only")]
            elif len(body) < 5 or body[0] != 0:
                trailers = [(b"grpc-status", b"3"), (b"grpc-message", b"expected one uncompressed gRPC message")]
            else:
                request = pb.ModelInferRequest.FromString(body[5:])
                message = await infer_one(self.core, request, encode=encode_infer_wire)
        except ServingError as exc:
            code = grpc_status(exc).value[0]
            trailers = [(b"grpc-status", str(code).encode()), (b"grpc-message", exc.message.encode())]
        if self.transport.is_closing():
            return
        if isinstance(message, pb.ModelInferResponse):
            message = message.SerializeToString()
        self.h2.send_headers(stream_id, _RESPONSE_HEADERS)
        if message is not None:
            self.h2.send_data(stream_id, struct.pack(">BI", 0, len(message)) + message)
        self.h2.send_headers(stream_id, trailers, end_stream=True)
        if not self.flush_scheduled:  # one write for every answer finished in this loop iteration
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        out = self.h2.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        for task in list(self.tasks):
            task.cancel()


class ProbeServer:
    """The two calls Server makes on a grpc.aio.Server: start() and stop(grace)."""

    def __init__(self, core: InferenceCore, *, host: str, port: int) -> None:
        self.core, self.host, self.port = core, host, port
        self.listener: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(lambda: _Connection(self.core), self.host, self.port)

    async def stop(self, grace: float | None) -> None:
        if self.listener is not None:
            self.listener.close()


async def start_probe(core: InferenceCore, *, host: str, port: int, start: bool = True, **_: Any) -> ProbeServer:
    probe = ProbeServer(core, host=host, port=port)
    if start:
        await probe.start()
    return probe


def main(argv: list[str] | None = None) -> int:
    server.start_grpc_server = start_probe  # type: ignore[assignment]  # the one swap this probe makes
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())

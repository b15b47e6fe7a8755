"""One HTTP front-end process of `modelserve serve --http-workers N` (experimental; service/frontends.py starts it).

It listens on the public HTTP port beside its siblings (SO_REUSEPORT: the kernel spreads connections), parses
HTTP, reads and decodes V2 infer requests (JSON and JSON + binary), hands the decoded request to the model
process (service/frontend_link.py) and encodes the answer. Every other request, and infer requests it does not
decode itself (Triton's raw binary body, shared-memory tensors), is proxied as-is to the model process's own
HTTP server on a loopback port, so every route answers exactly as the single process does.

    python -m service.frontend --host H --port P --worker-socket PATH --internal-url URL [--proxy-only]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import uvicorn
import uvloop

from service.errors import ModelNotReady, ServingError, unexpected
from service.frontend_link import FrontEndLink, ModelProcessDecodes, NoShm
from service.grpc_drain import DrainGate
from service.grpc_frontend import start_grpc_frontend
from service.grpc_tls import grpc_tls
from service.hosts import HostRule, host_rule
from service.http_infer import (
    INFER_PATH,
    decompress,
    header_length,
    read_body,
    send_error,
    send_infer_response,
    transfer_coding_refusal,
)
from service.http_server import DrainingServer, protocol_class
from service.protocol_v2 import encode_response_parts
from service.v2_plans import RequestPlans

log = logging.getLogger("modelserve.frontend")

_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"proxy-connection", b"te",
               b"trailer", b"host"}


class FrontEndApp:
    """ASGI app of a front end: V2 infer decoded here and run by the model process; all else proxied there."""

    def __init__(self, *, link: FrontEndLink, proxy: httpx.AsyncClient, max_request_bytes: int,
                 fast: bool = True, hosts: HostRule | None = None) -> None:
        self.hosts = hosts  # the model process's rule: the proxy sends its own Host, so it is checked here
        self.link = link
        self.proxy = proxy
        self.limit = max_request_bytes
        self.fast = fast
        self.plans = RequestPlans()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        refused = self.hosts.denial(scope["headers"]) if self.hosts is not None else None
        refused = refused or transfer_coding_refusal(scope["headers"])  # as the model process's (the proxy drops TE)
        if refused is not None:
            await send_error(send, refused, path=scope["path"])
            return
        if self.fast and scope["method"] == "POST":
            match = INFER_PATH.match(scope["path"])
            if match is not None:
                await self._infer(scope, receive, send, match["model"], match["version"])
                return
        await self._proxy(scope, receive, send, body=None)

    async def _infer(self, scope: dict, receive: Callable, send: Callable, model: str, version: str | None) -> None:
        try:
            headers = dict(scope["headers"])
            raw = await read_body(receive, declared=headers.get(b"content-length"), limit=self.limit)
            if raw is None:
                return
            body = decompress(raw, encoding=headers.get(b"content-encoding", b"").decode().lower(), limit=self.limit)
            length = header_length(headers)
            if length == 0:
                await self._proxy(scope, receive, send, body=raw)  # Triton's raw binary body: needs the model spec
                return
            try:
                req, encoding = self._decode(body, header_length=length, model=model, version=version)
            except ModelProcessDecodes:
                await self._proxy(scope, receive, send, body=raw)
                return
            payload, header_len = encode_response_parts(await self.link.infer(req), encoding)
        except ServingError as exc:
            await send_error(send, exc)
            return
        except Exception as exc:  # never a bare 500 in plain text
            log.exception("unhandled error in infer")
            await send_error(send, unexpected(exc))
            return
        await send_infer_response(send, payload, header_len, receive=receive)

    def _decode(self, body: bytes, *, header_length: int | None, model: str, version: str | None) -> tuple:
        """As InferFastPath.decode, with shared-memory tensors left to the model process."""
        return self.plans.decode(body, header_length=header_length, model_name=model, model_version=version,
                                 max_tensor_bytes=self.limit, shm=NoShm())  # type: ignore[arg-type]

    async def _proxy(self, scope: dict, receive: Callable, send: Callable, *, body: bytes | None) -> None:
        """Forward the request to the model process's HTTP server and stream its answer back unchanged."""
        if body is None:
            body = await read_body(receive, declared=dict(scope["headers"]).get(b"content-length"),
                                   limit=self.limit)
            if body is None:
                return
        path = scope["raw_path"].decode() + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        try:
            request = self.proxy.build_request(scope["method"], path, headers=headers, content=body)
            upstream = await self.proxy.send(request, stream=True)
        except httpx.HTTPError as exc:
            gone = ModelNotReady(f"the model process did not answer ({type(exc).__name__}); the server may be "
                                 "shutting down; retry later")
            await send_error(send, gone, path=scope["path"])
            return
        try:
            out = [(k, v) for k, v in upstream.headers.raw if k.lower() not in _HOP_BY_HOP]
            await send({"type": "http.response.start", "status": upstream.status_code, "headers": out})
            async for chunk in upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await upstream.aclose()


async def _serve_grpc(server: grpc.aio.Server, channel: grpc.aio.Channel, gate: DrainGate, *,
                      stopping: asyncio.Event, grace_s: float) -> None:
    """Until SIGTERM: then let the RPCs in flight finish (up to `grace_s`), refusing new ones with UNAVAILABLE."""
    await stopping.wait()
    await gate.stop(server, deadline=asyncio.get_running_loop().time() + grace_s)
    await channel.close()


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the model process dies, so a killed server leaves no orphans."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent still stops its front ends on every normal exit


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    _, link = await loop.create_unix_connection(FrontEndLink, args.worker_socket)
    sock = _listen(args.host, args.port)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=args.internal_url, limits=limits, timeout=None) as proxy:
        allowed = None if args.allowed_hosts is None else args.allowed_hosts.split(",")
        app = FrontEndApp(link=link, proxy=proxy, max_request_bytes=args.max_request_bytes, fast=not args.proxy_only,
                          hosts=host_rule(allowed=allowed, bind_host=args.host))
        config = uvicorn.Config(app, loop="none", lifespan="off", ws="none", access_log=False, proxy_headers=False,
                                log_level=args.log_level, timeout_keep_alive=30,
                                http=protocol_class(header_timeout=args.header_timeout,
                                                  max_header_bytes=args.max_header_bytes,
                                                  grpc_port=args.grpc_port))
        server = DrainingServer(config)
        grpc_server = None
        if args.grpc_port is not None:
            grpc_server, channel, gate = await start_grpc_frontend(
                link=link, host=args.grpc_host or args.host, port=args.grpc_port, upstream=args.grpc_upstream,
                max_request_bytes=args.max_request_bytes, fast=not args.proxy_only,
                tls=grpc_tls(use_ssl=args.grpc_server_cert is not None, mutual=args.grpc_use_ssl_mutual,
                             server_cert=args.grpc_server_cert, server_key=args.grpc_server_key,
                             root_cert=args.grpc_root_cert))

        stopping = asyncio.Event()

        def stop() -> None:
            server.deadline = loop.time() + args.exit_timeout
            server.should_exit = True
            if grpc_server is not None:
                gate.begin_drain()
            stopping.set()

        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the model process decides (Ctrl-C reaches all)
        watch = loop.create_task(link.closed.wait())
        watch.add_done_callback(lambda _: stop())  # model process gone: stop too
        serving = [server.serve(sockets=[sock])]
        if grpc_server is not None:
            serving.append(_serve_grpc(grpc_server, channel, gate, stopping=stopping, grace_s=args.exit_timeout))
        await asyncio.gather(*serving)
        watch.cancel()
    sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.frontend", description=__doc__)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--worker-socket", required=True)
    p.add_argument("--internal-url", required=True)
    p.add_argument("--max-request-bytes", type=int, required=True)
    p.add_argument("--header-timeout", type=float, default=30.0)
    p.add_argument("--max-header-bytes", type=int, default=65536)
    p.add_argument("--exit-timeout", type=float, default=30.0)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--grpc-port", type=int, help="also serve gRPC on this port, forwarding to --grpc-upstream")
    p.add_argument("--grpc-host")
    p.add_argument("--grpc-upstream", help="the model process's gRPC address (unix:PATH)")
    p.add_argument("--allowed-hosts", help="Host names answered, comma-separated (default: as the server's)")
    p.add_argument("--proxy-only", action="store_true", help="decode nothing here (access control, tracing)")
    p.add_argument("--grpc-server-cert", type=Path, help="TLS on the gRPC port: the server's PEM certificate")
    p.add_argument("--grpc-server-key", type=Path)
    p.add_argument("--grpc-root-cert", type=Path)
    p.add_argument("--grpc-use-ssl-mutual", action="store_true")
    args = p.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s frontend: %(message)s")
    uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

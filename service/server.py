"""The server's lifecycle: the repository, the HTTP (uvicorn) and gRPC transports and the metrics port.

`Server` owns them all (not FastAPI's lifespan), so tests can start the same core in-process and talk to
`server.app` through httpx's ASGI transport, and `modelserve serve` runs the very same object on sockets.

Start: bind every port (fail fast, one line naming the port), load the models, then serve.
Stop (SIGTERM/SIGINT, Triton's --exit-timeout-secs): readiness turns false at once, both transports stop
accepting, every request already received (running or queued) is answered, then the models close. At the
exit timeout whatever is left is closed, whatever clients do. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import grpc
import uvicorn
import uvloop

from service.access import ASGIApp, grpc_interceptors, warn_if_exposed
from service.core import InferenceCore
from service.frontends import FrontEnds, reserve_port
from service.grpc_app import start_grpc_server
from service.grpc_drain import DrainGate
from service.grpc_health import ReadinessHealth
from service.hosts import host_rule
from service.http_app import create_app
from service.http_protocol_infer import InferHttpProtocol
from service.http_server import DrainingServer, TimedHttpToolsProtocol, protocol_class
from service.metrics import Metrics
from service.ports import MetricsServer, PortSpec, StartupError, bind_tcp, check_free
from service.repository import ModelRepository
from service.settings import ServerSettings

log = logging.getLogger("modelserve.server")


class Server:
    """One modelserve process: a repository and the transports in front of one InferenceCore."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.repository = ModelRepository(settings)
        self.metrics = Metrics(lambda: [mv.stats for mv in self.repository.ready_versions()])
        self.core = InferenceCore(self.repository, self.metrics)
        self.app = create_app(self.core, settings)
        self._grpc: grpc.aio.Server | None = None
        self._health = ReadinessHealth(self.core.ready)  # grpc.health.v1 on the gRPC port
        self._gate = DrainGate()  # every gRPC call passes it: the drain refuses, never cancels (grpc_drain.py)
        self._stop = asyncio.Event()
        self._http: DrainingServer | None = None
        self._forced = False
        self._kill: asyncio.Future | None = None
        self._fronts = FrontEnds(settings, self.core) if settings.http_workers > 1 else None

    async def start(self) -> None:
        """Bind gRPC, load the repository, then serve gRPC (HTTP is opened by `serve`)."""
        s = self.settings
        if s.grpc_port is not None:
            host = s.grpc_host or s.http_host
            check_free(PortSpec("gRPC", host, s.grpc_port, "--grpc-port"))
            # With front ends they serve the public port; this process's gRPC is theirs alone, on a Unix socket.
            inner = None if self._fronts is None else f"unix:{self._fronts.grpc_socket}"
            self._grpc = await start_grpc_server(self.core, host=host, port=s.grpc_port,
                                                 max_message_bytes=s.max_request_bytes,
                                                 interceptors=grpc_interceptors(s), start=False, address=inner,
                                                 health=self._health, tls=s.grpc_tls(), gate=self._gate)
        await self.repository.start()
        if self._grpc is not None:
            await self._grpc.start()

    async def stop(self) -> None:
        """Drain both transports (up to the exit timeout), then close the models."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.exit_timeout_secs
        self.core.begin_shutdown()
        await self._stop_grpc(deadline)
        await self._close(grace_s=max(0.0, deadline - loop.time()))

    async def _close(self, *, grace_s: float) -> None:
        """Close the models (within `grace_s`), then shared memory and tracing."""
        await self.repository.close(grace_s=grace_s)
        self.core.shm.close()
        self.core.tracing.shutdown()

    async def _stop_grpc(self, deadline: float) -> None:
        if self._grpc is not None:
            self._health.drain()  # NOT_SERVING, and Watch streams end rather than hold the exit timeout
            # Calls in flight finish; new ones get UNAVAILABLE "shutting down"; then grpc.aio stops.
            await self._gate.stop(self._grpc, deadline=deadline)
            self._grpc = None

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(self) -> None:
        """Run until SIGINT/SIGTERM, then drain HTTP and gRPC together and close the models."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        s = self.settings
        warn_if_exposed(s)
        http_sock = self._bind_http() if s.allow_http else None
        metrics = None
        try:
            if s.metrics_port is not None:
                metrics_host = s.metrics_host or s.http_host
                metrics = MetricsServer(PortSpec("metrics", metrics_host, s.metrics_port, "--metrics-port"),
                                        self.metrics.registry,
                                        hosts=host_rule(allowed=s.http_allowed_hosts, bind_host=metrics_host))
            if not await self._started_unless_stopped():
                await self.stop()
            elif http_sock is not None:
                await self._serve_http(http_sock)
            else:  # --allow-http=false: gRPC (and metrics) only, until a signal
                await self._stop.wait()
                await self.stop()
        finally:
            if http_sock is not None:
                http_sock.close()
            if metrics is not None:
                metrics.close()
            if self._fronts is not None:
                self._fronts.remove_sockets()

    def _bind_http(self) -> socket.socket:
        s = self.settings
        public = PortSpec("HTTP", s.http_host, s.http_port, "--http-port")
        if s.http_workers > 1:
            check_free(public)  # SO_REUSEPORT would bind beside a server of ours already listening there
        return bind_tcp(public) if s.http_workers == 1 else reserve_port(public)

    async def _started_unless_stopped(self) -> bool:
        """Start (bind gRPC, load models) unless a signal comes first; False if it did."""
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if starting.done():
            starting.result()  # a StartupError (e.g. gRPC port taken) propagates
            return not self._stop.is_set()
        starting.cancel()
        return False

    async def _serve_http(self, sock: socket.socket) -> None:
        self._http = http = DrainingServer(uvicorn_config(self.settings, self.app))
        host, port = sock.getsockname()[:2]
        if self._fronts is not None:  # front ends take the public port; this process serves them privately
            sock = bind_tcp(PortSpec("internal HTTP", "127.0.0.1", 0, "--http-workers"), listen=True)
            await self._fronts.start(port=port, internal_url=f"http://127.0.0.1:{sock.getsockname()[1]}",
                                     on_lost=self._lost_front_end)
        else:
            log.info("KServe V2 HTTP on %s:%d", host, port)
        serving = asyncio.ensure_future(http.serve(sockets=[sock]))
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.exit_timeout_secs
        if self._fronts is not None:  # their requests in flight still need this process: they drain first
            await self._fronts.stop(deadline)
        http.begin_drain()
        http.deadline, http.should_exit = deadline, True
        await asyncio.gather(serving, self._stop_grpc(deadline))
        if self._fronts is not None:
            sock.close()
        stopping.cancel()
        grace = 0.0 if self._forced else max(0.0, deadline - loop.time())
        await self._close(grace_s=grace)
        log.info("stopped")
        if self._fronts is not None and self._fronts.lost is not None:
            raise StartupError(f"{self._fronts.lost}; the server stopped")  # a non-zero exit, for supervisors

    def _lost_front_end(self) -> None:
        self.core.begin_shutdown()
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("%s again: stopping now", sig.name)
            self._forced = True
            if self._http is not None:
                self._http.stop_now()
            if self._fronts is not None:
                self._fronts.kill()
            self._gate.stop_now()
            if self._grpc is not None:
                self._kill = asyncio.ensure_future(self._grpc.stop(None))  # cancels the RPCs still running
            return
        log.warning("%s: not ready; finishing the requests in progress (up to %g s, --exit-timeout-secs); "
                    "send it again to stop at once", sig.name, self.settings.exit_timeout_secs)
        self.core.begin_shutdown()
        self._health.drain()
        if self._fronts is None:  # else the front ends drain first, and what they take still needs this gRPC
            self._gate.begin_drain()
        self._stop.set()


def uvicorn_config(settings: ServerSettings, app: ASGIApp) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        loop="none",  # the loop is ours (run_server), shared with gRPC
        http=protocol_class(header_timeout=settings.http_header_timeout_secs,
                            max_header_bytes=settings.http_max_header_bytes, grpc_port=settings.grpc_port,
                            base=InferHttpProtocol if settings.http_protocol_infer else TimedHttpToolsProtocol),
        lifespan="off",  # Server owns the lifecycle
        ws="none",  # no WebSocket route: an Upgrade is declined and the request served as HTTP/1.1
        log_level=settings.log_level,
        access_log=False,  # one log line per inference costs more than the inference on small models
        # Nothing reads the client address (no access log), so uvicorn's X-Forwarded-For middleware would only
        # add a layer to every request (py-spy: ~2 % of the event loop at concurrency 32).
        proxy_headers=False,
        timeout_keep_alive=30,
    )


def run_server(settings: ServerSettings) -> None:
    uvloop.run(Server(settings).serve())

"""`--http-workers N` (experimental): N HTTP front-end processes in front of this one model process.

The model process (service/server.py) keeps the repository, the batcher, ONNX Runtime and gRPC. It serves its
full HTTP app on a private loopback port (what front ends proxy to) and a Unix socket for decoded infer
requests (service/frontend_link.py). Each front end (service/frontend.py) binds the public HTTP port with
SO_REUSEPORT, so HTTP parsing, decoding, encoding and response writes run beside the model process instead of
sharing its GIL. Stop: the front ends get SIGTERM and drain first (their requests still need the model
process), then the model process drains and closes as it does alone.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from service.core import InferenceCore
from service.frontend_link import WorkerProtocol
from service.ports import PortSpec
from service.settings import ServerSettings

log = logging.getLogger("modelserve.frontends")


class FrontEnds:
    """Start, watch and stop the front-end processes and the model process's end of their links."""

    def __init__(self, settings: ServerSettings, core: InferenceCore) -> None:
        self.settings = settings
        self.core = core
        self._dir = Path(tempfile.mkdtemp(prefix="modelserve-fe-"))
        self.grpc_socket = self._dir / "grpc.sock"  # the model process's gRPC, for what front ends forward
        self._unix: asyncio.AbstractServer | None = None
        self.procs: list[asyncio.subprocess.Process] = []
        self.lost: str | None = None  # why a front end exited on its own, if one did
        self._stopping = False
        self._watches: list[asyncio.Task] = []

    def _fast(self) -> bool:
        """Decode in the front ends unless something they would skip is on (access control, tracing)."""
        enforced = bool(self.settings.api_keys or self.settings.http_restricted_api)
        return not enforced and not self.core.tracing.enabled

    async def start(self, *, port: int, internal_url: str, on_lost: Callable[[], None]) -> None:
        """Open the model process's end of the links, then start the front ends on the public `port`.
        `on_lost` is called if one exits on its own (could not bind, crashed, was killed): the server stops."""
        loop = asyncio.get_running_loop()
        path = str(self._dir / "worker.sock")
        self._unix = await loop.create_unix_server(lambda: WorkerProtocol(self.core), path)
        s = self.settings
        cmd = [sys.executable, "-m", "service.frontend", "--host", s.http_host, "--port", str(port),
               "--worker-socket", path, "--internal-url", internal_url,
               "--max-request-bytes", str(s.max_request_bytes), "--header-timeout", str(s.http_header_timeout_secs),
               "--max-header-bytes", str(s.http_max_header_bytes),
               "--exit-timeout", str(s.exit_timeout_secs), "--log-level", s.log_level,
               *([] if self._fast() else ["--proxy-only"]),
               *([] if s.http_allowed_hosts is None else ["--allowed-hosts", ",".join(s.http_allowed_hosts)])]
        if s.grpc_port is not None:
            cmd += ["--grpc-port", str(s.grpc_port), "--grpc-host", s.grpc_host or s.http_host,
                    "--grpc-upstream", f"unix:{self.grpc_socket}"]
            if (tls := s.grpc_tls()) is not None:
                cmd += tls.flags()
        for _ in range(s.http_workers):
            proc = await asyncio.create_subprocess_exec(*cmd)
            self.procs.append(proc)
            self._watches.append(asyncio.ensure_future(self._watch(proc, on_lost)))
        log.info("KServe V2 HTTP on %s:%d: %d front-end processes (experimental), pids %s", s.http_host,
                 port, len(self.procs), [p.pid for p in self.procs])

    async def _watch(self, proc: asyncio.subprocess.Process, on_lost: Callable[[], None]) -> None:
        code = await proc.wait()
        if not self._stopping and self.lost is None:
            self.lost = f"front-end process {proc.pid} exited on its own (exit code {code}); see the log above"
            log.error("%s: stopping the server", self.lost)
            on_lost()

    async def stop(self, deadline: float) -> None:
        """SIGTERM every front end, wait for them up to `deadline` (loop time), kill what is left."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in self.procs]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=max(0.1, deadline - loop.time()))
            if pending:
                log.warning("exit timeout: killing %d front-end process(es)", len(pending))
                self.kill()
                await asyncio.gather(*pending)
        for watch in self._watches:
            watch.cancel()
        if self._unix is not None:
            self._unix.close()
        self.remove_sockets()

    def remove_sockets(self) -> None:
        """Remove the folder of the Unix sockets (also when the server stops before the front ends start)."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()


def reserve_port(spec: PortSpec) -> socket.socket:
    """The public HTTP port bound (not listening) with SO_REUSEPORT: a taken port fails at start, before the
    models load, and the front ends can bind it beside this socket. StartupError on failure."""
    sock = socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((spec.host, spec.port))
    except OSError as exc:
        sock.close()
        raise spec.error(exc) from None
    return sock

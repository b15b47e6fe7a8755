"""Binding the server's ports before anything slow happens, with one-line errors that name the port.

Every port (HTTP, gRPC, metrics) is bound before the models load, so a second `modelserve serve` on the same
ports fails at once instead of loading every model first, and never shares a port with the first one.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from service.hosts import HostRule
from service.metrics import MetricsPortServer


class StartupError(Exception):
    """The server cannot start; the message is the one line `modelserve` prints."""


@dataclass(frozen=True)
class PortSpec:
    """A port the server binds, as the operator knows it."""

    what: str  # "HTTP", "gRPC", "metrics"
    host: str
    port: int
    flag: str  # the command-line flag that changes it

    def error(self, exc: OSError | None = None) -> StartupError:
        if exc is None or exc.errno == errno.EADDRINUSE:
            reason = "address already in use; stop the other server or pass"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied (ports below 1024 need privileges); pass"
        else:
            reason = f"{exc.strerror or exc}; check --http-address or pass"
        return StartupError(f"cannot bind {self.what} port {self.port} on {self.host}: {reason} {self.flag}")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_tcp(spec: PortSpec, *, listen: bool = False) -> socket.socket:
    """A bound (not yet listening, unless `listen`) TCP socket without port sharing; StartupError on failure.

    SO_REUSEADDR only lets a restart bind over TIME_WAIT leftovers; on Linux it never lets two servers
    listen on one port (SO_REUSEPORT would, and is left off).
    """
    sock = socket.socket(_family(spec.host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.host, spec.port))
        if listen:
            sock.listen()
    except OSError as exc:
        sock.close()
        raise spec.error(exc) from None
    return sock


def check_free(spec: PortSpec) -> None:
    """Fail with StartupError if another process listens on the port.

    NOTE: gRPC's own bind failure says only "Failed to bind" (and logs a line of its own), so we probe the
    port first to give the one-line reason; gRPC's bind stays the real check (see grpc_app).
    """
    if spec.port:
        bind_tcp(spec).close()


class MetricsServer:
    """Prometheus on its own port (Triton's 8002), with a one-line error when the port is taken."""

    def __init__(self, spec: PortSpec, registry: CollectorRegistry, *, hosts: HostRule | None = None) -> None:
        try:
            self._server = MetricsPortServer(registry, host=spec.host, port=spec.port, hosts=hosts)
        except OSError as exc:
            raise spec.error(exc) from None

    def close(self) -> None:
        self._server.close()

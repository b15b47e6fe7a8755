"""TLS on the gRPC port, with Triton's flags: --grpc-use-ssl, --grpc-use-ssl-mutual, --grpc-server-cert,
--grpc-server-key, --grpc-root-cert (tritonclient.grpc's `ssl=True`, `root_certificates`, `private_key`,
`certificate_chain` then work unchanged). grpcio's own SSL credentials do the work; this module only reads the
PEM files and says clearly what is missing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class GrpcTls:
    """What the gRPC port needs for TLS: PEM files, and whether clients must show a certificate too."""

    server_cert: Path
    server_key: Path
    root_cert: Path | None = None
    mutual: bool = False

    def credentials(self) -> grpc.ServerCredentials:
        """grpcio's server credentials from the files (read now: a renewed certificate is read at the next start,
        as Triton reads it)."""
        root = self.root_cert.read_bytes() if self.root_cert is not None else None
        # NOTE: as Triton's grpc_server.cc: mutual TLS requires and verifies a client certificate against the
        # root certificate; plain TLS asks for none.
        return grpc.ssl_server_credentials([(self.server_key.read_bytes(), self.server_cert.read_bytes())],
                                           root_certificates=root, require_client_auth=self.mutual)

    def flags(self) -> list[str]:
        """The same settings as Triton's flags (for a front-end process)."""
        out = ["--grpc-server-cert", str(self.server_cert), "--grpc-server-key", str(self.server_key)]
        if self.root_cert is not None:
            out += ["--grpc-root-cert", str(self.root_cert)]
        return out + (["--grpc-use-ssl-mutual"] if self.mutual else [])


def grpc_tls(*, use_ssl: bool, mutual: bool, server_cert: Path | None, server_key: Path | None,
             root_cert: Path | None) -> GrpcTls | None:
    """The TLS settings Triton's flags ask for, checked (ValueError saying what is missing); None: plaintext.
    --grpc-use-ssl-mutual implies --grpc-use-ssl, as in Triton."""
    if not (use_ssl or mutual):
        return None
    flag = "--grpc-use-ssl-mutual" if mutual else "--grpc-use-ssl"
    wanted = {"--grpc-server-cert": server_cert, "--grpc-server-key": server_key}
    if mutual:
        wanted["--grpc-root-cert"] = root_cert  # the CA client certificates are verified against
    for name, path in wanted.items():
        if path is None:
            raise ValueError(f"{flag} needs {name} (a PEM file); got none")
    for name, path in {**wanted, "--grpc-root-cert": root_cert}.items():
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {str(path)!r} is not a readable file; expected a PEM file")
    assert server_cert is not None and server_key is not None
    return GrpcTls(server_cert=Path(server_cert), server_key=Path(server_key),
                   root_cert=Path(root_cert) if root_cert is not None else None, mutual=mutual)


def add_port(server: grpc.aio.Server, address: str, tls: GrpcTls | None) -> int:
    """Bind `address` with TLS when configured; the bound port (0 when the bind failed)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.credentials())

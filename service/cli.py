"""`modelserve` command line: serve, build (the model zoo) and friends."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from service.log_settings import ModelserveFormatter
from service.ports import StartupError
from service.server import run_server
from service.settings import ServerSettings


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over KServe V2 HTTP")
    # Triton's flag names; each also reads from the environment as MODELSERVE_<NAME>.
    p.add_argument("--model-repository", dest="model_repository", action="append",
                   help="model repository: a directory, or s3://bucket/prefix (gs://, az://) mirrored locally")
    p.add_argument("--http-port", dest="http_port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--http-address", dest="http_host", help="address to bind (default 0.0.0.0)")
    p.add_argument("--grpc-port", dest="grpc_port", type=int, help="KServe V2 gRPC port (off unless given)")
    p.add_argument("--metrics-port", dest="metrics_port", type=int, help="also serve /metrics on this port")
    p.add_argument("--model-control-mode", dest="model_control_mode", choices=["none", "poll", "explicit"])
    p.add_argument("--repository-poll-secs", dest="repository_poll_secs", type=float)
    p.add_argument("--load-model", dest="load_model", action="append", help="model to load at start (explicit mode)")
    p.add_argument("--log-level", dest="log_level", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--grpc-address", dest="grpc_host", help="address gRPC binds (default: --http-address)")
    p.add_argument("--metrics-address", dest="metrics_host",
                   help="address the metrics port binds (default: --http-address)")
    p.add_argument("--http-restricted-api", dest="http_restricted_api", action="append",
                   metavar="API[,API...]:KEY=VALUE", help="those HTTP APIs need header KEY: VALUE (repeatable)")
    p.add_argument("--http-allowed-hosts", dest="http_allowed_hosts", metavar="HOST[,HOST...]",
                   help="Host names HTTP answers ('*' any, '*.example.com', names, addresses); default: loopback "
                        "names when bound to loopback, else any; others get 421 (DNS rebinding)")
    p.add_argument("--grpc-restricted-protocol", dest="grpc_restricted_protocol", action="append",
                   metavar="PROTOCOL[,PROTOCOL...]:KEY=VALUE",
                   help="those gRPC protocols need metadata triton-grpc-protocol-KEY: VALUE (repeatable)")
    p.add_argument("--allow-client-shm", dest="allow_client_shm", type=_flag, metavar="BOOL",
                   help="let clients register system shared memory regions (default false)")
    p.add_argument("--trace-level", dest="trace_level", action="append", choices=["OFF", "TIMESTAMPS", "TENSORS"])
    p.add_argument("--trace-rate", dest="trace_rate", type=int, help="trace one request in N")
    p.add_argument("--trace-count", dest="trace_count", type=int, help="traces to take; -1 for no limit")
    p.add_argument("--trace-log-frequency", dest="trace_log_frequency", type=int)
    p.add_argument("--trace-file", dest="trace_file", help="append spans to this file as JSON lines")
    p.add_argument("--trace-mode", dest="trace_mode", choices=["triton", "opentelemetry"])
    p.add_argument("--trace-otlp-endpoint", dest="trace_otlp_endpoint", help="OTLP/HTTP traces endpoint")
    p.add_argument("--log-verbose", dest="log_verbose", type=int, help="> 0 logs at DEBUG")
    p.add_argument("--log-format", dest="log_format", choices=["default", "ISO8601"])
    p.add_argument("--exit-timeout-secs", dest="exit_timeout_secs", type=float,
                   help="on SIGTERM/SIGINT, finish requests in progress for at most this long (default 30)")
    p.add_argument("--strict-readiness", dest="strict_readiness", metavar="BOOL",
                   help="ready only when every model is READY (default true); false: ready while serving")
    p.add_argument("--repository-cache-dir", dest="repository_cache_dir",
                   help="local folder an s3:// (gs://, az://) model repository is mirrored into (default: a temp dir)")
    p.add_argument("--adaptive-batching", dest="adaptive_batching", type=_flag, metavar="BOOL",
                   help="wait for batch-mates only while it pays, by observed load (default false: Triton's delay)")
    p.add_argument("--http-workers", dest="http_workers", type=int,
                   help="experimental: N HTTP front-end processes before the one model process (default 1)")
    _triton_switches(p)


def _triton_switches(p: argparse.ArgumentParser) -> None:
    """Triton's switches users bring along when they change servers (same names, same meanings)."""
    p.add_argument("--disable-auto-complete-config", dest="disable_auto_complete_config", action="store_const",
                   const=True, help="each model needs a config.pbtxt with its inputs and outputs")
    p.add_argument("--strict-model-config", dest="disable_auto_complete_config", type=_flag, metavar="BOOL",
                   help="Triton's older name for --disable-auto-complete-config (true: no auto-complete)")
    p.add_argument("--exit-on-error", dest="exit_on_error", type=_flag, metavar="BOOL",
                   help="exit at start-up when a model fails to load (default false; Triton's is true)")
    for proto in ("http", "grpc", "metrics"):
        p.add_argument(f"--allow-{proto}", dest=f"allow_{proto}", type=_flag, metavar="BOOL",
                       help=f"serve {proto} (false: off)")
    p.add_argument("--model-store", dest="model_repository", action="append",
                   help="Triton's older name for --model-repository")
    p.add_argument("--id", dest="server_id", help="server name reported by server metadata (default modelserve)")
    p.add_argument("--backend-config", dest="backend_config", action="append", metavar="[onnxruntime,]KEY=VALUE",
                   help="only default-max-batch-size=N is taken (this server runs ONNX Runtime only)")
    p.add_argument("--grpc-use-ssl", dest="grpc_use_ssl", type=_flag, nargs="?", const=True, metavar="BOOL",
                   help="TLS on the gRPC port (needs --grpc-server-cert and --grpc-server-key)")
    p.add_argument("--grpc-use-ssl-mutual", dest="grpc_use_ssl_mutual", type=_flag, nargs="?", const=True,
                   metavar="BOOL", help="TLS, and clients must show a certificate signed by --grpc-root-cert")
    p.add_argument("--grpc-server-cert", dest="grpc_server_cert", help="PEM file: the gRPC server's certificate")
    p.add_argument("--grpc-server-key", dest="grpc_server_key", help="PEM file: the gRPC server's private key")
    p.add_argument("--grpc-root-cert", dest="grpc_root_cert", help="PEM file: the CA client certificates must chain to")


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# Settings whose values hold secrets: never echoed in an error.
SECRET_SETTINGS = {"api_keys", "http_restricted_api", "grpc_restricted_protocol"}


def _settings(args: argparse.Namespace) -> ServerSettings:
    given = {k: v for k, v in vars(args).items() if k not in ("command", "func") and v is not None}
    repositories = given.pop("model_repository", None) or []
    if len(repositories) > 1:
        sys.exit(f"modelserve: one model repository is served, got {len(repositories)} --model-repository "
                 f"({', '.join(repositories)}); put the models under one folder (Triton's several repositories "
                 "are not supported)")
    if repositories:
        given["model_repository"] = repositories[0]
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             + ("" if e["loc"][:1] and e["loc"][0] in SECRET_SETTINGS
                                else f" (got {e.get('input')!r})")
                             for e in exc.errors())
        sys.exit(f"modelserve: invalid settings: {problems}")


def serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if isinstance(settings.model_repository, Path) and not settings.model_repository.is_dir():
        sys.exit(f"modelserve: model repository {settings.model_repository} is not a directory; "
                 "build one with `modelserve build` or pass --model-repository DIR")
    try:
        run_server(settings)
    except StartupError as exc:
        sys.exit(f"modelserve: {exc}")
    return 0


# Subcommands owned by other packages: name -> (module with `main(argv) -> int`, help).
DELEGATED = {
    "build": ("models.build", "build the model zoo into a repository"),
    "optimize": ("export.optimize", "quantize / convert / distill the zoo and report size, latency, accuracy"),
    "edge-bundle": ("export.edge", "write a self-contained edge bundle for one model"),
    "predict": ("service.offline.cli", "batch offline inference over files and datasets (local or Ray)"),
}


def main(argv: list[str] | None = None) -> int:
    """`modelserve`: Ctrl-C before the server installs its own handlers prints one line, not a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("modelserve: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="modelserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=f"{help_text} (see `modelserve {name} --help`)")
    args = parser.parse_args(argv)
    level = (getattr(args, "log_level", None) or "info").upper()
    handler = logging.StreamHandler()
    handler.setFormatter(ModelserveFormatter())  # v2/logging switches its format live
    logging.basicConfig(level=level, handlers=[handler])
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())

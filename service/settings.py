"""Server settings: environment (MODELSERVE_*), then command-line flags (Triton's names) on top."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.access import GRPC_KEY_PREFIX, check_api_keys, parse_restricted_specs
from service.cpuquota import usable_cpus
from service.grpc_tls import GrpcTls, grpc_tls
from service.hosts import check_patterns
from service.modelrepo.config import DEFAULT_MAX_BATCH_SIZE
from service.modelrepo.remote import check_url, is_remote
from service.processing.base import Limits

TRITON_GRPC_PORT = 8001
_BACKEND_SETTINGS = ("default-max-batch-size",)


def backend_max_batch_size(specs: list[str]) -> int | None:
    """Triton's --backend-config values: '[onnxruntime,]default-max-batch-size=N' (the last one given wins);
    any other backend or setting is refused, saying what is accepted (ValueError)."""
    size = None
    for spec in specs:
        backend, _, setting = spec.rpartition(",")
        key, sep, value = setting.partition("=")
        if backend not in ("", "onnxruntime") or not sep:
            raise ValueError(f"backend config {spec!r}: expected '[onnxruntime,]<setting>=<value>' (this server runs "
                             "ONNX Runtime only)")
        if key.strip() not in _BACKEND_SETTINGS:
            raise ValueError(f"backend config {spec!r}: setting {key.strip()!r} is not supported; supported: "
                             f"{list(_BACKEND_SETTINGS)}")
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"backend config {spec!r}: default-max-batch-size must be a positive integer")
        size = int(value)
    return size


def default_cpu_threads() -> int:
    """The cores this process may use: taskset / cgroup cpusets and the cgroup CPU quota (a container's
    CPU limit) respected, unlike os.cpu_count().

    NOTE: on 2 cores we tried leaving one core to the event loop (1 intra-op thread): on a quiet machine
    `make bench` gave 44% of the in-process ceiling at concurrency 32 (binary, batching on) against 56% with
    2 threads, so ONNX Runtime gets every core and the loop takes its turns.
    """
    return usable_cpus()


class ServerSettings(BaseSettings):
    """Everything the server reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_", extra="forbid")

    model_repository: Path | str = Path("model_repository")
    """Triton-layout model repository: a local folder <repo>/<model>/<version>/model.onnx, or s3://, gs://, az://."""
    http_host: str = "0.0.0.0"
    """Address the HTTP server binds."""
    http_port: int = Field(8000, ge=0, le=65535)
    """HTTP port (KServe V2, metrics on /metrics). 0 picks a free port."""
    grpc_port: int | None = Field(None, ge=1, le=65535)
    """KServe V2 gRPC port (Triton's 8001); off when unset."""
    metrics_port: int | None = Field(None, ge=1, le=65535)
    """Also serve Prometheus metrics on this separate port, as Triton's 8002."""
    model_control_mode: Literal["none", "poll", "explicit"] = "none"
    """none: load everything at start; poll: also pick up changes; explicit: load/unload API only."""
    repository_poll_secs: PositiveFloat = 5.0
    """How often poll mode rescans the repository."""
    load_model: list[str] = Field(default_factory=list)
    """Models loaded at start in explicit mode ('*' for all)."""
    max_request_bytes: PositiveInt = 64 * 1024 * 1024
    """Largest request body accepted; larger ones get 413."""
    execution_providers: list[str] | None = None
    """ONNX Runtime providers in order of preference; default CUDA then CPU (TensorRT when a config asks)."""
    cpu_threads: PositiveInt = Field(default_factory=default_cpu_threads)
    """Cores shared among a model's instances for intra-op threads (default: the usable cores)."""
    default_max_batch_size: PositiveInt = DEFAULT_MAX_BATCH_SIZE
    """max_batch_size given to a model whose config does not set one and whose graph batches."""
    warmup: bool = True
    """Run each model once before it reports ready."""
    allow_spinning: bool = False
    """Let ONNX Runtime threads spin while idle: lower latency, but it steals CPU from the HTTP loop."""
    unload_grace_secs: PositiveFloat = 30.0
    """How long an unloaded or replaced version may take to finish the requests it holds."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Log level of the server and uvicorn."""
    http_restricted_api: list[str] = Field(default_factory=list)
    """Triton's specs '<api>[,<api>...]:<key>=<value>': those HTTP APIs need header '<key>: <value>'."""
    grpc_restricted_protocol: list[str] = Field(default_factory=list)
    """As http_restricted_api for gRPC; the metadata key is 'triton-grpc-protocol-<key>' as in Triton."""
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Inference needs 'Authorization: Bearer <one of these>' (env: comma-separated); none: inference is open."""
    http_allowed_hosts: Annotated[list[str] | None, NoDecode] = None
    """Host names the HTTP port answers ('*' any, '*.example.com', names, addresses; env: comma-separated);
    default: loopback names only when bound to loopback, else any. Others get 421 (DNS rebinding)."""
    grpc_host: str | None = Field(None, min_length=1)
    """Address the gRPC server binds (default: http_host)."""
    grpc_use_ssl: bool = False
    """Triton's --grpc-use-ssl: TLS on the gRPC port (needs grpc_server_cert and grpc_server_key)."""
    grpc_use_ssl_mutual: bool = False
    """Triton's --grpc-use-ssl-mutual: TLS, and clients must show a certificate signed by grpc_root_cert."""
    grpc_server_cert: Path | None = None
    """Triton's --grpc-server-cert: PEM file of the gRPC server's certificate (chain)."""
    grpc_server_key: Path | None = None
    """Triton's --grpc-server-key: PEM file of the gRPC server's private key."""
    grpc_root_cert: Path | None = None
    """Triton's --grpc-root-cert: PEM file of the CA that client certificates are verified against."""
    metrics_host: str | None = Field(None, min_length=1)
    """Address the separate metrics port binds (default: http_host)."""
    allow_client_shm: bool = False
    """Let clients register /dev/shm regions (system shared memory extension); off by default, as in Triton."""
    trace_level: list[Literal["OFF", "TIMESTAMPS", "TENSORS"]] = ["OFF"]
    """Triton's trace level at start: OFF, or TIMESTAMPS and/or TENSORS (v2/trace/setting changes it live)."""
    trace_rate: PositiveInt = 1000
    """Trace one request in this many."""
    trace_count: int = Field(-1, ge=-1)
    """How many traces to take before tracing stops; -1: no limit."""
    trace_log_frequency: int = Field(0, ge=0)
    """Triton's log_frequency, reported to clients; spans are written as each trace ends."""
    trace_file: Path | None = None
    """Append finished spans to this file as OpenTelemetry JSON lines."""
    trace_mode: Literal["triton", "opentelemetry"] = "triton"
    """opentelemetry: also export spans over OTLP/HTTP to trace_otlp_endpoint."""
    trace_otlp_endpoint: str | None = Field(None, min_length=1)
    """OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces (trace_mode opentelemetry)."""
    log_verbose: int = Field(0, ge=0)
    """Triton's --log-verbose: > 0 logs at DEBUG."""
    log_format: Literal["default", "ISO8601"] = "default"
    """Log line format (Triton's --log-format)."""

    exit_timeout_secs: NonNegativeFloat = 30.0
    """On SIGTERM/SIGINT, how long in-flight and queued requests may take before the process exits anyway."""
    strict_readiness: bool = True
    """Ready only when every model that should be loaded is READY (false: ready while live and accepting)."""
    http_header_timeout_secs: PositiveFloat = 10.0
    """A client must send a request's complete headers within this long, or the connection is closed (408)."""
    http_body_timeout_secs: PositiveFloat = 30.0
    """Longest pause allowed between two chunks of a request body before the request ends with 408."""
    max_task_items: PositiveInt = 1024
    """Items (images, texts, clips, user ids) in one task request; more get 413."""
    max_text_bytes: PositiveInt = Limits.max_text_bytes
    """UTF-8 bytes of one text sent to a text model; longer texts get 413 (the model truncates far sooner)."""
    max_image_pixels: PositiveInt = Limits.max_image_pixels
    """Decoded pixels of one image, read from its header before decoding; larger images get 413."""
    max_request_pixels: PositiveInt = Limits.max_request_pixels
    """Decoded pixels of all images in one task request together; more get 413."""
    min_sample_rate: PositiveInt = Limits.min_sample_rate
    """Lowest sample rate a WAV may declare (Hz); checked from the RIFF header before decoding."""
    max_sample_rate: PositiveInt = Limits.max_sample_rate
    """Highest sample rate a WAV may declare (Hz); checked from the RIFF header before decoding."""
    max_audio_seconds: PositiveFloat = Limits.max_audio_seconds
    """Longest clip accepted, from the WAV header before decoding; longer ones get 413."""
    max_request_audio_seconds: PositiveFloat = Limits.max_request_audio_seconds
    """Seconds of audio in one task request together; more get 413."""
    max_batch_tokens: PositiveInt = Limits.max_batch_tokens
    """Tokens (rows x padded length) a text task request runs at once; its texts go in runs of this size."""
    repository_cache_dir: Path | None = None
    """Local folder an object-storage model repository is mirrored into (default: a new temporary folder)."""
    adaptive_batching: bool = False
    """Decide each batch's wait from observed load (max_queue_delay the bound) and shed late requests early."""
    io_binding: Literal["auto", "on", "off"] = "auto"
    """ORT I/O binding into per-instance preallocated buffers (pinned on CUDA): auto = on GPU instances only."""
    gpu_fp16_variants: bool = True
    """On GPU instances, serve a model's published FP16 variant (<model>-fp16, same version) in its place."""
    http_workers: int = Field(1, ge=1, le=64)
    """Experimental: HTTP front-end processes sharing the port before one model process (1: a single process)."""
    http_max_header_bytes: int = Field(65536, ge=4096, le=2**24)
    """Bytes of a request's line and headers together; more get 431 and the connection closes."""
    http_protocol_infer: bool = True
    """Answer complete V2 infer requests inside the HTTP protocol, without an ASGI task (false: the ASGI route)."""
    disable_auto_complete_config: bool = False
    """Triton's --disable-auto-complete-config: each model needs a config.pbtxt listing its inputs and outputs."""
    exit_on_error: bool = False
    """Triton's --exit-on-error: exit at start-up when a model asked for fails to load (Triton's default: true)."""
    allow_http: bool = True
    """Triton's --allow-http: false serves no HTTP port (gRPC must then be on)."""
    allow_grpc: bool | None = None
    """Triton's --allow-grpc: true turns gRPC on (at Triton's 8001 unless grpc_port says); false turns it off."""
    allow_metrics: bool = True
    """Triton's --allow-metrics: false serves no /metrics (neither on the HTTP port nor on metrics_port)."""
    server_id: str = Field("modelserve", min_length=1, max_length=256)
    """Triton's --id: the name server metadata reports."""
    backend_config: list[str] = Field(default_factory=list)
    """Triton's --backend-config '[onnxruntime,]<setting>=<value>'; only default-max-batch-size is taken."""

    @field_validator("model_repository", mode="before")
    @classmethod
    def _local_or_url(cls, value: object) -> object:
        if isinstance(value, str) and is_remote(value):
            return check_url(value)  # ValueError naming the supported schemes
        return Path(value) if isinstance(value, str) else value

    @field_validator("http_restricted_api", "grpc_restricted_protocol")
    @classmethod
    def _check_restrictions(cls, specs: list[str]) -> list[str]:
        parse_restricted_specs(specs, key_prefix=GRPC_KEY_PREFIX)  # ValueError naming the bad spec
        return specs

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: object) -> object:
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value

    @field_validator("http_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        return [h.strip() for h in value.split(",") if h.strip()] if isinstance(value, str) else value

    @field_validator("http_allowed_hosts")
    @classmethod
    def _check_hosts(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is not None and not hosts:
            raise ValueError("http_allowed_hosts is empty: list the Host names to answer, or '*' for any")
        return None if hosts is None else check_patterns(hosts)  # ValueError naming the bad entry

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        check_api_keys([k.get_secret_value() for k in keys])
        return keys

    @field_validator("backend_config")
    @classmethod
    def _check_backend_config(cls, specs: list[str]) -> list[str]:
        backend_max_batch_size(specs)  # ValueError naming the spec and what is accepted
        return specs

    @model_validator(mode="after")
    def _triton_switches(self) -> ServerSettings:
        """Triton's --allow-* and --backend-config resolved onto the settings the server reads."""
        if self.allow_grpc is False:
            self.grpc_port = None
        elif self.allow_grpc and self.grpc_port is None:
            self.grpc_port = TRITON_GRPC_PORT
        if not self.allow_metrics:
            self.metrics_port = None
        if not self.allow_http and self.http_workers > 1:
            raise ValueError(f"http_workers={self.http_workers} needs HTTP: allow_http=false serves none")
        if not self.allow_http and self.grpc_port is None:
            raise ValueError("allow_http=false leaves nothing to serve: turn gRPC on (--allow-grpc=true or "
                             "--grpc-port) or keep HTTP")
        size = backend_max_batch_size(self.backend_config)
        if size is not None:
            self.default_max_batch_size = size
        self.grpc_tls()  # ValueError saying which PEM file is missing
        return self

    def grpc_tls(self) -> GrpcTls | None:
        """TLS for the public gRPC port (Triton's --grpc-use-ssl* flags), or None for plaintext."""
        return grpc_tls(use_ssl=self.grpc_use_ssl, mutual=self.grpc_use_ssl_mutual, server_cert=self.grpc_server_cert,
                        server_key=self.grpc_server_key, root_cert=self.grpc_root_cert)

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        taken = [p for p in ports.values() if p]
        if len(taken) != len(set(taken)):
            raise ValueError(f"ports must differ, got {ports}; choose distinct ports or leave grpc/metrics unset")
        if "*" in self.load_model and len(self.load_model) > 1:
            raise ValueError(f"load_model={self.load_model}: '*' (every model) must be the only load_model, as in "
                             "Triton; drop the other names or the '*'")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError(
                f"load_model={self.load_model} needs model_control_mode='explicit' "
                f"(got {self.model_control_mode!r}); the other modes load every model"
            )
        if self.min_sample_rate > self.max_sample_rate:
            raise ValueError(f"min_sample_rate {self.min_sample_rate} exceeds max_sample_rate {self.max_sample_rate}; "
                             "the accepted WAV rate range would be empty")
        return self

"""Server settings: environment (MODELSERVE_*), then command-line flags (Triton's names) on top."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.modelrepo.config import DEFAULT_MAX_BATCH_SIZE


def default_cpu_threads() -> int:
    """The cores this process may use (taskset / cgroup cpusets respected, unlike os.cpu_count()).

    NOTE: on 2 cores we tried leaving one core to the event loop (1 intra-op thread): on a quiet machine
    `make bench` gave 44% of the in-process ceiling at concurrency 32 (binary, batching on) against 56% with
    2 threads, so ONNX Runtime gets every core and the loop takes its turns.
    """
    return len(os.sched_getaffinity(0))


class ServerSettings(BaseSettings):
    """Everything the server reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_", extra="forbid")

    model_repository: Path = Path("model_repository")
    """Triton-layout model repository: <repo>/<model>/<version>/model.onnx."""
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
    """ONNX Runtime providers in order of preference; default TensorRT, CUDA, CPU as available."""
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
    max_task_items: PositiveInt = 1024
    """Items (images, texts, clips, user ids) in one task request; more get 413."""
    max_text_bytes: PositiveInt = 64 * 1024
    """UTF-8 bytes of one text sent to a text model; longer texts get 413 (the model truncates far sooner)."""
    max_image_pixels: PositiveInt = 4_000_000
    """Decoded pixels of one image, read from its header before decoding; larger images get 413."""
    max_request_pixels: PositiveInt = 64_000_000
    """Decoded pixels of all images in one task request together; more get 413."""
    min_sample_rate: PositiveInt = 8_000
    """Lowest sample rate a WAV may declare (Hz); checked from the RIFF header before decoding."""
    max_sample_rate: PositiveInt = 192_000
    """Highest sample rate a WAV may declare (Hz); checked from the RIFF header before decoding."""
    max_audio_seconds: PositiveFloat = 60.0
    """Longest clip accepted, from the WAV header before decoding; longer ones get 413."""
    max_request_audio_seconds: PositiveFloat = 600.0
    """Seconds of audio in one task request together; more get 413."""
    max_batch_tokens: PositiveInt = 4096
    """Tokens (rows x padded length) a text task request runs at once; its texts go in runs of this size."""

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        taken = [p for p in ports.values() if p]
        if len(taken) != len(set(taken)):
            raise ValueError(f"ports must differ, got {ports}; choose distinct ports or leave grpc/metrics unset")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError(
                f"load_model={self.load_model} needs model_control_mode='explicit' "
                f"(got {self.model_control_mode!r}); the other modes load every model"
            )
        if self.min_sample_rate > self.max_sample_rate:
            raise ValueError(f"min_sample_rate {self.min_sample_rate} exceeds max_sample_rate {self.max_sample_rate}; "
                             "the accepted WAV rate range would be empty")
        return self

"""Typed serving errors. Each carries the HTTP status and gRPC code it maps to.

Handlers turn them into the KServe V2 error shape `{"error": "..."}`; nothing else reaches a client as a
bare 500.
"""

from __future__ import annotations

from typing import ClassVar

import grpc


class ServingError(Exception):
    """Base of every error a client may see."""

    status_code: int = 500
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # Triton's `reason` label on nv_inference_request_failure.
    failure_reason: str = "OTHER"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    status_code = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServingError):
    status_code = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(ServingError):
    status_code = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class QueueFull(ServingError):
    status_code = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    failure_reason = "REJECTED"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}  # type: ignore[misc]


class DeadlineExceeded(ServingError):
    status_code = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    failure_reason = "REJECTED"


class RequestCancelled(ServingError):
    # 499 is nginx's "client closed request": nobody reads it, it only labels the failure.
    status_code = 499
    grpc_code = grpc.StatusCode.CANCELLED
    failure_reason = "CANCELED"


class PayloadTooLarge(ServingError):
    status_code = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnsupportedMediaType(ServingError):
    status_code = 415
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelLoadError(ServingError):
    status_code = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class BackendError(ServingError):
    status_code = 500
    grpc_code = grpc.StatusCode.INTERNAL
    failure_reason = "BACKEND"

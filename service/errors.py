"""Typed serving errors. Each carries the HTTP status it maps to; the gRPC transport maps that status to a
gRPC code (service/protocol_grpc.py), so this lowest layer imports no transport library.

Handlers turn them into the KServe V2 error shape `{"error": "..."}`; nothing else reaches a client as a
bare 500.
"""

from __future__ import annotations

from typing import ClassVar


class ServingError(Exception):
    """Base of every error a client may see."""

    status_code: int = 500
    # Triton's `reason` label on nv_inference_request_failure.
    failure_reason: str = "OTHER"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def unexpected(exc: BaseException) -> ServingError:
    """What a client is told about a failure that is not its fault: the exception's type, never its text (which
    may carry paths or internals); the server log has the traceback."""
    return ServingError(f"internal error ({type(exc).__name__}); see the server log")


class InvalidInput(ServingError):
    status_code = 400
    failure_reason = "REJECTED"  # Triton counts a malformed request (wrong shape, dtype, name) as rejected


class ModelNotFound(ServingError):
    status_code = 404


class ModelNotReady(ServingError):
    status_code = 503


class ModelControlUnavailable(ServingError):
    """Load/unload on a server whose model control mode is not explicit: a well-formed request this server's
    configuration does not serve; 503 / UNAVAILABLE as Triton answers (its clients and QA tests expect it)."""

    status_code = 503


class QueueFull(ServingError):
    status_code = 503
    failure_reason = "REJECTED"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}  # type: ignore[misc]


class DeadlineExceeded(ServingError):
    """A request its queue policy's timeout rejects. Triton answers UNAVAILABLE "Request timeout expired" (HTTP
    503); DEADLINE_EXCEEDED / 504 would read, to a gRPC client, as its own deadline having passed."""

    status_code = 503
    failure_reason = "REJECTED"
    # Triton's words (its QA test of queue-policy timeouts compares them); messages start with them.
    TRITON_TEXT: ClassVar[str] = "Request timeout expired"


class RequestCancelled(ServingError):
    # 499 is nginx's "client closed request": nobody reads it, it only labels the failure.
    status_code = 499
    failure_reason = "CANCELED"


class PayloadTooLarge(ServingError):
    status_code = 413
    failure_reason = "REJECTED"


class UnsupportedMediaType(ServingError):
    status_code = 415
    failure_reason = "REJECTED"


class ModelLoadError(ServingError):
    status_code = 400


class BackendError(ServingError):
    status_code = 500
    failure_reason = "BACKEND"


class Unauthenticated(ServingError):
    """No valid API key (service/access.py); `invalid=True` when a key was sent but is wrong (RFC 6750)."""

    status_code = 401

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        challenge = 'Bearer error="invalid_token"' if invalid else "Bearer"
        self.headers = {"WWW-Authenticate": challenge}  # type: ignore[misc]


class PermissionDenied(ServingError):
    """A restricted API called without its header (Triton's --http-restricted-api)."""

    status_code = 403


class MisdirectedRequest(ServingError):
    """The request's Host is not one this server answers (setting http_allowed_hosts; RFC 9110 §15.5.20)."""

    status_code = 421
    failure_reason = "REJECTED"


class RequestTimeout(ServingError):
    """The client stopped sending its request body; the connection is closed after the answer."""

    status_code = 408
    failure_reason = "REJECTED"
    headers: ClassVar[dict[str, str]] = {"Connection": "close"}


class HeadersTooLarge(ServingError):
    """A request line and headers over the bound (setting http_max_header_bytes)."""

    status_code = 431
    failure_reason = "REJECTED"


class NotImplementedByServer(ServingError):
    """A method or transfer coding this server does not implement for any resource (RFC 9110 §15.6.2)."""

    status_code = 501
    failure_reason = "REJECTED"


class VersionNotSupported(ServingError):
    """A request of an HTTP version the port does not speak (RFC 9110 §15.6.6)."""

    status_code = 505
    failure_reason = "REJECTED"


# OpenAI's error `type` per status (https://platform.openai.com/docs/guides/error-codes): a client error is an
# invalid request, anything else a server error.
_OPENAI_TYPES = {504: "timeout"}


def openai_route(path: str) -> bool:
    """Whether errors on `path` take OpenAI's shape: every /v1/ route the `openai` client calls (embeddings,
    models, and the ones this server lacks: chat, completions, ...), not the task routes (`.../predict`,
    KServe V1's `...:predict`), whose clients read KServe's {"error": "..."}."""
    return path.startswith("/v1/") and not path.endswith(("/predict", ":predict"))


def openai_error(exc: ServingError) -> dict:
    """`exc` in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    code = "model_not_found" if isinstance(exc, ModelNotFound) else \
        "invalid_api_key" if isinstance(exc, Unauthenticated) else None
    kind = _OPENAI_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
    return {"error": {"message": exc.message, "type": kind, "param": getattr(exc, "param", None), "code": code}}


def error_document(exc: ServingError, *, path: str) -> dict:
    """The body of an error answer on `path`: OpenAI's shape on its routes, KServe V2's {"error": "..."} else."""
    return openai_error(exc) if openai_route(path) else {"error": exc.message}

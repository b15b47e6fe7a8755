"""Access control with Triton's interface: restricted API groups, bearer API keys for inference, JSON-only
control routes, and a warning when the model-repository API is exposed without a restriction.

`--http-restricted-api=<api>[,<api>...]:<key>=<value>` / `--grpc-restricted-protocol=...` (Triton's flags and
meanings): a request to a restricted API must carry header `<key>: <value>` (gRPC: metadata
`triton-grpc-protocol-<key>`, lowercased, as Triton) or gets 403 / PERMISSION_DENIED. `MODELSERVE_API_KEYS`:
inference requires `Authorization: Bearer <key>` or gets 401 / UNAUTHENTICATED. `--http-allowed-hosts`
(service/hosts.py): an HTTP request whose Host names another server gets 421, whatever its route.

Transports stay unaware: HTTP is wrapped by `AccessMiddleware` (pure ASGI, in front of the infer fast path too)
and gRPC gets `AccessInterceptor`; neither is installed when there is nothing to enforce, so the hot path
costs nothing then.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import orjson

# NOTE: only errors, content_encoding and libraries here: settings.py imports this module to validate the specs at start-up, and
# the transports (http_infer, protocol_grpc) import the core, which imports settings.
from service.content_encoding import decompress
from service.errors import (
    InvalidInput,
    PayloadTooLarge,
    PermissionDenied,
    ServingError,
    Unauthenticated,
    UnsupportedMediaType,
    error_document,
)
from service.hosts import HostRule, host_rule, is_loopback  # is_loopback: also for warn_if_exposed's importers

if TYPE_CHECKING:
    from service.settings import ServerSettings

log = logging.getLogger("modelserve.access")

# Triton's API groups (`tritonserver --help`), in its order.
APIS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics",
        "trace", "logging")
# Triton prefixes the key on gRPC, whose metadata keys are lowercase (HTTP/2).
GRPC_KEY_PREFIX = "triton-grpc-protocol-"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
_VISIBLE = re.compile(r"^[\x21-\x7e]+$")  # a header value without spaces or control characters


@dataclass(frozen=True)
class Restriction:
    """One restricted API: the header (lowercased) that must carry `value`."""

    header: str
    value: bytes


def _redacted(spec: str) -> str:
    return spec.split("=", 1)[0] + ("=<value>" if "=" in spec else "")


def parse_restricted_specs(specs: Iterable[str], *, key_prefix: str = "") -> dict[str, Restriction]:
    """`["<api>[,<api>...]:<key>=<value>", ...]` -> {api: Restriction}; ValueError naming the bad part.

    Messages echo the spec with its value replaced (it is a shared secret)."""
    out: dict[str, Restriction] = {}
    for spec in specs:
        apis_part, sep, kv = spec.partition(":")
        key, eq, value = kv.partition("=")
        shown = _redacted(spec)
        if not sep or not eq or not apis_part.strip():
            raise ValueError(f"restriction {shown!r} is malformed: expected <api>[,<api>...]:<key>=<value> "
                             f"with APIs from {', '.join(APIS)}")
        if not _TOKEN.match(key):
            raise ValueError(f"restriction {shown!r}: header name {key!r} is not a valid header name")
        if not _VISIBLE.match(value):
            raise ValueError(f"restriction {shown!r}: the value must be non-empty visible ASCII without spaces")
        for api in (a.strip() for a in apis_part.split(",")):
            if api not in APIS:
                raise ValueError(f"restriction {shown!r}: unknown API {api!r}; valid APIs: {', '.join(APIS)}")
            if api in out:
                raise ValueError(f"restriction {shown!r}: API {api!r} is already restricted by an earlier "
                                 "spec; an API may appear in at most one spec")
            out[api] = Restriction(header=(key_prefix + key).lower(), value=value.encode())
    return out


def check_api_keys(keys: Sequence[str]) -> None:
    """Raise ValueError (without echoing any key) when a key could not be sent in a header."""
    for i, key in enumerate(keys):
        if not _VISIBLE.match(key):
            raise ValueError(f"API key #{i + 1} must be non-empty visible ASCII without spaces or commas")


class AccessPolicy:
    """What one transport enforces: restricted APIs and the inference API keys."""

    def __init__(self, *, restrictions: dict[str, Restriction], api_keys: Sequence[str], noun: str,
                 hosts: HostRule | None = None) -> None:
        self.restrictions = restrictions
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.noun = noun  # "header" (HTTP) or "metadata" (gRPC), for messages
        self.hosts = hosts  # HTTP only: the Host names answered (service/hosts.py); None: any

    @property
    def enforces(self) -> bool:
        return bool(self.restrictions or self.api_keys or self.hosts is not None)

    def check(self, api: str | None, values: Callable[[str], list[bytes]]) -> ServingError | None:
        """The error for a request to `api` whose header `name` has `values(name)`; None when allowed."""
        if api is None:
            return None
        if api == "inference" and self.api_keys:
            error = self._check_bearer(values("authorization"))
            if error is not None:
                return error
        restriction = self.restrictions.get(api)
        if restriction is not None and not _any_equal(values(restriction.header), (restriction.value,)):
            # NOTE: Triton's words first (its QA tests match them), then what to send.
            lead = "This protocol is restricted" if self.noun == "metadata" else "This API is restricted"
            return PermissionDenied(f"{lead}, expecting header '{restriction.header}': the {api} API is restricted "
                                    f"on this server; send {self.noun} '{restriction.header}' with the value it was "
                                    "configured with")
        return None

    def _check_bearer(self, given: list[bytes]) -> ServingError | None:
        expected = f"send {self.noun} 'authorization: Bearer <key>' with one of the server's API keys"
        if not given:
            return Unauthenticated(f"inference requires an API key: {expected}")
        scheme, _, token = given[0].strip().partition(b" ")
        if scheme.lower() != b"bearer" or not _any_equal([token.strip()], self.api_keys):
            return Unauthenticated(f"the API key is missing or not valid: {expected}", invalid=True)
        return None


def _any_equal(given: list[bytes], expected: Sequence[bytes]) -> bool:
    """Constant-time comparison of every given value against every expected one (no early exit)."""
    ok = False
    for g in given:
        for e in expected:
            ok |= hmac.compare_digest(g, e)
    return ok


# ---------------------------------------------------------------------------------------------- HTTP

_MODEL_PATH = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?(?P<rest>/.*)?$")
_MODEL_SUFFIX_API = {None: "metadata", "/ready": "health", "/config": "model-config", "/stats": "statistics",
                     "/trace/setting": "trace"}
_PREFIX_API = (("/v2/repository", "model-repository"), ("/v2/health", "health"), ("/v2/trace", "trace"),
               ("/v2/logging", "logging"), ("/v2/systemsharedmemory", "shared-memory"),
               ("/v2/cudasharedmemory", "shared-memory"))


def classify_http(method: str, path: str) -> str | None:
    """The Triton API group of an HTTP route; None for routes no group covers (/docs, /openapi.json).

    Unknown POSTs under /v2/models and /v1 count as inference, so a later inference route is covered."""
    for prefix, api in _PREFIX_API:
        if path.startswith(prefix):
            return api
    if path in ("/v2", "/v2/"):
        return "metadata"
    if path == "/":  # KServe V1 liveness
        return "health"
    if path.rstrip("/") == "/metrics":  # per-model counts and latencies: the statistics API in Prometheus form
        return "statistics"
    if path.startswith("/v2/models"):
        if path.rstrip("/") == "/v2/models/stats":
            return "statistics"
        match = _MODEL_PATH.match(path)
        rest = match["rest"] if match else None
        if rest in _MODEL_SUFFIX_API:
            return _MODEL_SUFFIX_API[rest]
        return "inference" if method == "POST" else "metadata"
    if path.startswith("/v1/"):
        return "inference" if method == "POST" else "metadata"
    return None


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class AccessMiddleware:
    """Pure ASGI: answers 401/403 before the wrapped app (infer fast path included) sees the request."""

    def __init__(self, app: ASGIApp, *, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # `.state`, `.openapi`, ... of the wrapped app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            error = http_denial(self.policy, scope)
            if error is not None:
                await _send_error(send, error, path=scope["path"])
                return
        await self.app(scope, receive, send)


def http_denial(policy: AccessPolicy, scope: Mapping[str, Any]) -> ServingError | None:
    """The error for an HTTP request (ASGI scope) that `policy` refuses; None when it is allowed. Used by
    AccessMiddleware and by the protocol that answers infer itself (service/http_protocol_infer.py)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    if policy.hosts is not None:  # every route, before its group: a rebound page must reach none of them
        refused = policy.hosts.denial(headers)
        if refused is not None:
            return refused
    if not (policy.restrictions or policy.api_keys):
        return None  # only Host names are checked here (a loopback-bound server's default)

    def values(name: str) -> list[bytes]:
        key = name.encode()
        return [v for k, v in headers if k == key]

    return policy.check(classify_http(scope["method"], scope["path"]), values)


async def _send_error(send: Callable, error: ServingError, *, path: str = "") -> None:
    body = orjson.dumps(error_document(error, path=path))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def wrap_http_app(app: ASGIApp, settings: ServerSettings) -> ASGIApp:
    """`app` behind AccessMiddleware, or `app` itself when nothing is enforced on HTTP."""
    policy = AccessPolicy(restrictions=parse_restricted_specs(settings.http_restricted_api),
                          api_keys=[k.get_secret_value() for k in settings.api_keys], noun="header",
                          hosts=host_rule(allowed=settings.http_allowed_hosts, bind_host=settings.http_host))
    return AccessMiddleware(app, policy=policy) if policy.enforces else app


_JSON_TYPES = ("application/json",)
# NOTE: tritonclient.http sends no Content-Type on load/unload/index (geventhttpclient), and its aio variant
# sends application/octet-stream (aiohttp's default for bytes). Neither is a CORS-simple type that an HTML form
# can send cross-origin (octet-stream needs a preflight we never answer), so both are accepted when the body is
# empty or JSON; the form types (x-www-form-urlencoded, multipart/form-data, text/plain) and all others get 415.
# A body-less cross-origin fetch without Content-Type remains possible: restrict model-repository against that.
_UNLABELLED_TYPES = ("", "application/octet-stream")
# NOTE: Triton's C++ HTTP client (libcurl: perf_analyzer, tritonclient C++) labels its JSON bodies
# application/x-www-form-urlencoded, curl's default. A browser sends that type cross-origin without a preflight,
# but always with an Origin header; so the type counts as unlabelled (JSON, or 415) only when no Origin came.
_CURL_TYPE = "application/x-www-form-urlencoded"


def control_body(content_type: str | None, body: bytes, *, from_browser: bool = True) -> dict:
    """The JSON object of a control-route (repository) request body, enforcing the JSON-only rule above.
    `from_browser`: the request carried an Origin header."""
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    expected = "control routes take a JSON body: send Content-Type: application/json"
    if ctype == _CURL_TYPE and not from_browser:
        ctype = ""
    if ctype not in _JSON_TYPES + _UNLABELLED_TYPES:
        raise UnsupportedMediaType(f"{expected} (got Content-Type {ctype!r})")
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if ctype in _JSON_TYPES:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        raise UnsupportedMediaType(f"{expected} (the body is not JSON)") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"control request body must be a JSON object, got {type(doc).__name__}")
    return doc


async def _bounded_body(request: Any, *, limit: int) -> bytes:
    """A control route's body, refusing more than `limit` bytes before holding them (Triton's wording)."""
    declared = request.headers.get("content-length", "")
    size, chunks = int(declared) if declared.isdigit() else 0, []
    if size <= limit:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
    if size > limit:
        raise PayloadTooLarge(f"request JSON size of {size} bytes exceeds the maximum allowed input size. "
                              f"Send at most {limit} bytes (--max-request-bytes / MODELSERVE_MAX_REQUEST_BYTES)")
    return b"".join(chunks)


async def read_control_body(request: Any, *, limit: int) -> dict:
    """A control route's JSON object (index, load, unload, shared memory, trace, logging): at most `limit`
    bytes, JSON only (see control_body)."""
    body = decompress(await _bounded_body(request, limit=limit),
                      encoding=request.headers.get("content-encoding", "").lower(), limit=limit)
    return control_body(request.headers.get("content-type"), body, from_browser="origin" in request.headers)


# ---------------------------------------------------------------------------------------------- gRPC

_GRPC_API = {
    "ServerLive": "health", "ServerReady": "health", "ModelReady": "health",
    "ServerMetadata": "metadata", "ModelMetadata": "metadata", "ModelConfig": "model-config",
    "ModelInfer": "inference", "ModelStreamInfer": "inference", "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository", "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository", "TraceSetting": "trace", "LogSettings": "logging",
    "SystemSharedMemoryStatus": "shared-memory", "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory", "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory", "CudaSharedMemoryUnregister": "shared-memory",
}


def classify_grpc(method: str) -> str | None:
    """The Triton protocol group of a gRPC method ("/inference.GRPCInferenceService/ModelInfer")."""
    service, _, name = method.lstrip("/").partition("/")
    if service == "grpc.health.v1.Health":
        return "health"
    return _GRPC_API.get(name) if service == "inference.GRPCInferenceService" else None


def _denying(handler: grpc.RpcMethodHandler, error: ServingError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with `error`'s status."""

    code = grpc.StatusCode.UNAUTHENTICATED if error.status_code == 401 else grpc.StatusCode.PERMISSION_DENIED

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, error.message)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    factory = kind[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(deny, request_deserializer=handler.request_deserializer,  # type: ignore[operator]
                   response_serializer=handler.response_serializer)


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Answers PERMISSION_DENIED / UNAUTHENTICATED before the servicer runs."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        metadata = handler_call_details.invocation_metadata or ()  # type: ignore[attr-defined]

        def values(name: str) -> list[bytes]:
            return [v.encode() if isinstance(v, str) else v for k, v in metadata if k == name]

        error = self.policy.check(classify_grpc(handler_call_details.method), values)  # type: ignore[attr-defined]
        handler = await continuation(handler_call_details)
        return handler if error is None or handler is None else _denying(handler, error)


def grpc_interceptors(settings: ServerSettings) -> list[grpc.aio.ServerInterceptor]:
    """[AccessInterceptor] when gRPC has something to enforce, else [] (no per-call cost)."""
    policy = AccessPolicy(restrictions=parse_restricted_specs(settings.grpc_restricted_protocol,
                                                              key_prefix=GRPC_KEY_PREFIX),
                          api_keys=[k.get_secret_value() for k in settings.api_keys], noun="metadata")
    return [AccessInterceptor(policy)] if policy.enforces else []


# ---------------------------------------------------------------------------------------------- start-up

def warn_if_exposed(settings: ServerSettings) -> list[str]:
    """Log a WARNING for each transport serving the model-repository API unrestricted beyond loopback."""
    exposed = []
    if not is_loopback(settings.http_host) and not _restricts_repository(settings.http_restricted_api):
        exposed.append(f"HTTP on {settings.http_host}:{settings.http_port} "
                       "(restrict it with --http-restricted-api=model-repository:<key>=<value>)")
    grpc_host = settings.grpc_host or settings.http_host
    if (settings.grpc_port is not None and not is_loopback(grpc_host)
            and not _restricts_repository(settings.grpc_restricted_protocol)):
        exposed.append(f"gRPC on {grpc_host}:{settings.grpc_port} "
                       "(restrict it with --grpc-restricted-protocol=model-repository:<key>=<value>)")
    for where in exposed:
        log.warning("the model-repository API (load/unload) is reachable without restriction on a "
                    "non-loopback address: %s", where)
    return exposed


def _restricts_repository(specs: list[str]) -> bool:
    return "model-repository" in parse_restricted_specs(specs)

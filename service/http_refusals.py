"""What the HTTP port answers a request it cannot read as HTTP/1.1: llhttp's reason for stopping, turned into a
status and a message that says what was expected (RFC 9112), instead of uvicorn's plain-text 400 "Invalid HTTP
request received." for every case. One table, read in order: the first entry whose words appear in llhttp's
reason wins."""

from __future__ import annotations

from service.errors import InvalidInput, NotImplementedByServer, ServingError, VersionNotSupported

_REQUEST_LINE = "the request line must be 'METHOD /path HTTP/1.1' followed by CRLF (RFC 9112 section 3)"

# (words in llhttp's reason, status, what was wrong and what to send instead)
_REASONS: tuple[tuple[str, int, str], ...] = (
    ("can't be present with", 400, "the request has both Content-Length and Transfer-Encoding, so its body's "
     "length is ambiguous; send one of them (RFC 9112 section 6.3)"),
    ("Duplicate Content-Length", 400, "the request has more than one Content-Length; send exactly one"),
    ("Content-Length", 400, "Content-Length must be a plain decimal number of bytes (digits only, e.g. "
     "'Content-Length: 42'; no sign, hex, list or inner space)"),
    ("Transfer-Encoding", 400, "Transfer-Encoding must end with 'chunked', or the body's length cannot be known "
     "(RFC 9112 section 6.3); send 'Transfer-Encoding: chunked' or a Content-Length"),
    ("whitespace after header value", 400, "a header line starts with a space or tab (obsolete line folding, "
     "RFC 9112 section 5.2); send each header on one line"),
    ("header token", 400, "a header name holds a character a token cannot (a space before the colon, for one); "
     "send 'Name: value' with nothing between the name and the colon (RFC 9112 section 5)"),
    ("header field char", 400, "a header name holds a character a token cannot; send 'Name: value' (RFC 9112 "
     "section 5)"),
    ("header value char", 400, "a header value holds a control character (NUL, 0x01-0x1F other than tab, or DEL); "
     "send visible characters, spaces and tabs only (RFC 9110 section 5.5)"),
    ("after header", 400, "header lines must end with CRLF (RFC 9112 section 2.2)"),
    ("Expected LF after CR", 400, "header lines must end with CRLF (RFC 9112 section 2.2)"),
    ("url", 400, "the request target holds a control character, a space or a character a URL cannot; "
     "percent-encode it (RFC 3986), e.g. '/v2/models/my%20model'"),
    ("chunk extension", 400, "a chunk extension is malformed; send each chunk as its size in hex, CRLF, its "
     "bytes, CRLF (RFC 9112 section 7.1), without extensions"),
    ("chunk size", 400, "a chunk size is not a hexadecimal number ending in CRLF (or is too large); send each "
     "chunk as its size in hex, CRLF, its bytes, CRLF (RFC 9112 section 7.1)"),
    ("after chunk data", 400, "a chunk's bytes are not followed by CRLF: it holds more bytes than its size says; "
     "send exactly the bytes its size says, then CRLF (RFC 9112 section 7.1)"),
    ("Invalid method", 501, "the request method is not one this server knows; it serves GET, HEAD and POST "
     "(and DELETE, PUT, OPTIONS where a route says so)"),
    ("Expected HTTP/", 400, _REQUEST_LINE),
    ("Expected space", 400, _REQUEST_LINE),
    ("start line", 400, _REQUEST_LINE),
    ("after version", 400, _REQUEST_LINE),
    ("Invalid word", 400, _REQUEST_LINE),
)
# llhttp's reasons for a version it does not read (HTTP/3, HTTP/1.2, an HTTP/2 preface): 505, not 400.
VERSION_REASONS = ("Invalid HTTP version", "Expected dot", "major version", "minor version", "PRI/Upgrade")


def framing_error(reason: str) -> ServingError:
    """The answer to a request llhttp stopped reading for `reason` (a version problem excepted: see
    VERSION_REASONS)."""
    for words, status, message in _REASONS:
        if words in reason:
            error: type[ServingError] = NotImplementedByServer if status == 501 else InvalidInput
            return error(message)
    return InvalidInput(f"the request is not valid HTTP/1.1 ({reason}); see RFC 9112")


def version_error(version: str, *, preface: bool, grpc_port: int | None) -> VersionNotSupported:
    """505 (RFC 9110 §15.6.6) for a request of another HTTP version: what this port speaks and where HTTP/2 is."""
    if preface:
        shown = "HTTP/2 (the prior-knowledge preface 'PRI * HTTP/2.0')"
    elif version in ("0.0", "0.9"):
        shown = "HTTP/0.9 (or a request line without a version)"
    else:
        shown = f"HTTP/{version}"
    where = f"on the gRPC port, {grpc_port} here (--grpc-port)" if grpc_port else \
        "on the gRPC port (--grpc-port; not enabled on this server)"
    return VersionNotSupported(f"{shown} is not supported: this port speaks HTTP/1.1 and HTTP/1.0; gRPC (HTTP/2) "
                               f"is served {where}")

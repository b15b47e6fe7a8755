"""Request bodies sent with Content-Encoding gzip or deflate, undone with a bound on what they expand to.

One function for every route that reads a body (V2 infer, task routes, OpenAI embeddings, control routes),
so a compressed body means the same everywhere.
"""

from __future__ import annotations

import zlib

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType


def decompress(body: bytes, *, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding gzip/deflate, refusing output over `limit` bytes (so a bomb cannot blow up)."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or identity")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    if not d.eof:  # the stream's end (and gzip's CRC and length check) never came: a cut-off body
        raise InvalidInput(f"request body is truncated {encoding} data: the compressed stream does not end; "
                           "send the whole compressed body")
    if d.unused_data:
        raise InvalidInput(f"request body has {len(d.unused_data)} bytes after the end of its {encoding} data; "
                           "expected one compressed stream")
    return out

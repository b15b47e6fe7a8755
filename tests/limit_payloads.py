"""Hostile task payloads built by hand: headers that declare far more than the bytes carry."""

from __future__ import annotations

import base64
import struct
import zlib


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (8-bit gray) followed by a small IDAT: a decompression bomb
    when the size is large, since nothing but the header is needed to claim it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def wav(*, rate: int, frames: int, channels: int = 1, sample_bytes: int = 2) -> bytes:
    """A PCM WAV declaring `rate` Hz with `frames` frames of silence (the data really present)."""
    block = channels * sample_bytes
    data = b"\0" * (frames * block)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, sample_bytes * 8)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

"""8-bit gray levels of plain PNGs decoded by libspng (pyspng) instead of Pillow: the same pixels, ~40% less CPU.

Only PNGs whose pixels Pillow's grayscale would take as they are: 8-bit gray or RGB, no chunk that could matter
to anyone's pixels (palette, transparency, gamma, colour profile), every chunk's CRC intact. Anything else,
anything larger than the caller allows, and any PNG libspng refuses, returns None: the caller decodes it with
Pillow as before, errors and messages included. RGB goes to gray through Pillow's own `convert("L")`.

pyspng is optional (the `serve` extra); without it (edge bundles ship only numpy and Pillow) every image goes
through Pillow.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

try:  # NOTE: optional: edge bundles and minimal installs decode with Pillow alone
    import pyspng
except ImportError:  # pragma: no cover - depends on the installed extras
    pyspng = None

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that may come before the image data without changing what Pillow makes of the pixels.
_HARMLESS = {b"pHYs", b"tEXt", b"zTXt", b"iTXt", b"tIME"}
_GRAY, _RGB = 0, 2


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, or None when `data` does not start like a PNG."""
    if len(data) < 24 or not data.startswith(_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _plain(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, colour type) of an 8-bit gray or RGB PNG made only of IHDR, image data, IEND and harmless
    chunks, every chunk's CRC intact.

    NOTE: pyspng decodes without checking CRCs or zlib's Adler-32, where Pillow refuses a corrupt data stream;
    a CRC over each chunk (C, ~1 µs for a small PNG) catches the corruption, and Pillow then decides as before.
    """
    if len(data) < 33 or not data.startswith(_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or colour not in (_GRAY, _RGB):
        return None
    at, seen_data = 8, False
    while at + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        end = at + 8 + length
        if end + 4 > len(data) or zlib.crc32(data[at + 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
            return None
        if kind == b"IEND":
            return (width, height, colour) if seen_data else None
        seen_data |= kind == b"IDAT"
        if kind not in _HARMLESS and kind != b"IDAT" and not (kind == b"IHDR" and at == 8):
            return None
        at = end + 4
    return None


def png_levels(data: bytes, *, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """([H, W] uint8 gray levels, (width, height)) of a plain PNG of at most `max_pixels`, exactly as
    `np.asarray(Image.open(data).convert("L"))`; None for anything to leave to Pillow."""
    plain = _plain(data) if pyspng is not None else None
    if plain is None:
        return None
    width, height, colour = plain
    if not 0 < width * height <= min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
        return None  # Pillow's size checks and their messages
    try:
        pixels = pyspng.load(data)
    except Exception:  # libspng refused it: Pillow decodes it (or says what is wrong)
        return None
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width):
        return None
    if colour == _RGB:
        pixels = np.asarray(Image.frombuffer("RGB", (width, height), np.ascontiguousarray(pixels), "raw", "RGB", 0, 1)
                            .convert("L"))
    return pixels, (width, height)

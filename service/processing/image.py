"""Image classification (cnn family): PNG/JPEG of any size or mode -> the 28x28 layout the model was trained on.

Training images (models/cnn_data.py) are scikit-learn digits upsampled to 20x20 and centred in a 28x28
black frame, 1.0 = white ink. So an upload is converted to grayscale, inverted when its border is light (a
dark digit on white paper), fitted into 20x20 keeping its aspect ratio, centred in 28x28 and scaled to [0, 1].
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.processing.base import Limits, parse_k, setting, top_k

SIDE, BOX = 28, 20
ACCEPTED_FORMATS = ("PNG", "JPEG")
ACCEPTS = "a PNG or JPEG image (any size or colour mode)"


@dataclass
class PreparedImage:
    pixels: np.ndarray  # [1, 28, 28] float32 in [0, 1]
    original_size: tuple[int, int]
    inverted: bool


def _header(data: bytes, *, index: int) -> Image.Image:
    """The image with only its header read (Pillow decodes lazily): format and size, no pixels yet."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedMediaType(f"item {index}: not an image; expected {ACCEPTS}") from None
    except Image.DecompressionBombError:
        # Pillow refuses past 2x its own MAX_IMAGE_PIXELS before we can look at the size.
        raise PayloadTooLarge(f"item {index}: the image declares more pixels than Pillow will decode; "
                              f"expected {ACCEPTS}") from None
    if img.format not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(f"item {index}: {img.format} images are not accepted; expected {ACCEPTS}")
    return img


def _open(data: bytes, *, index: int, max_pixels: int) -> Image.Image:
    img = _header(data, index=index)
    if img.width * img.height > max_pixels:
        raise PayloadTooLarge(f"item {index}: image of {img.width}x{img.height} pixels exceeds the limit of "
                              f"{max_pixels} pixels per image ({setting('max_image_pixels')})")
    try:
        img.load()
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"item {index}: the image declares more pixels than Pillow will decode; "
                              f"expected {ACCEPTS}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for truncated/corrupt data
        raise InvalidInput(f"item {index}: the {img.format} data is truncated or corrupt ({exc}); "
                           f"expected {ACCEPTS}") from None
    return img


def to_gray(img: Image.Image) -> np.ndarray:
    """Grayscale in [0, 1]; transparent pixels count as background (black after compositing)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), np.float32) / 255.0
        return np.asarray(rgba.convert("L"), np.float32) / 255.0 * alpha
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, np.float32)
        return arr / max(float(arr.max()), 1.0)
    return np.asarray(img.convert("L"), np.float32) / 255.0


def layout(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """Invert dark-on-light images, fit into 20x20 (aspect kept, bilinear) and centre in 28x28."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    inverted = bool(border.mean() > 0.5)
    if inverted:
        gray = 1.0 - gray
    h, w = gray.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = Image.fromarray(gray.astype(np.float32), mode="F").resize((nw, nh), Image.Resampling.BILINEAR)
    out = np.zeros((SIDE, SIDE), np.float32)
    top, left = (SIDE - nh) // 2, (SIDE - nw) // 2
    out[top:top + nh, left:left + nw] = np.clip(np.asarray(small, np.float32), 0.0, 1.0)
    return out[None], inverted


class ImageProcessor:
    task = "image-classification"

    def __init__(self, *, input_name: str, output_name: str, labels: list[str] | None,
                 limits: Limits | None = None) -> None:
        self.input_name, self.output_name, self.labels = input_name, output_name, labels
        self.limits = limits or Limits()

    def describe(self) -> dict:
        return {"accepts": ACCEPTS + ": multipart field 'file' (repeatable) or JSON {\"images\": [base64, ...]}",
                "preprocessing": "grayscale; inverted when the border is light (model expects white ink on "
                                 "black); fitted into a 20x20 box (aspect kept, bilinear) centred in 28x28 as "
                                 "the training digits; scaled to [0, 1]",
                "params": {"k": "number of labels returned (default 3)"}}

    def admit(self, payloads: Sequence[Any]) -> None:
        """Refuse a request whose images together declare more than max_request_pixels, before decoding any."""
        total, limit = 0, self.limits.max_request_pixels
        for index, payload in enumerate(payloads):
            if isinstance(payload, bytes):
                img = _header(payload, index=index)
                total += img.width * img.height
            elif isinstance(payload, np.ndarray):
                total += payload.size
            if total > limit:
                raise PayloadTooLarge(f"the request's images declare more than {limit} pixels together (at item "
                                      f"{index}); send fewer or smaller images ({setting('max_request_pixels')})")

    def prepare(self, payload: Any, *, index: int) -> PreparedImage:
        if isinstance(payload, np.ndarray):  # batch .npy rows: a [H, W] or [1, H, W] image, uint8 or [0, 1]
            arr = np.squeeze(np.asarray(payload, np.float32))
            if arr.ndim != 2:
                raise InvalidInput(f"item {index}: expected a 2-D image array, got shape {list(payload.shape)}")
            gray = arr / 255.0 if payload.dtype == np.uint8 else arr
            size = (arr.shape[1], arr.shape[0])
        else:
            img = _open(payload, index=index, max_pixels=self.limits.max_image_pixels)
            gray, size = to_gray(img), img.size
        pixels, inverted = layout(gray)
        return PreparedImage(pixels, size, inverted)

    def rows_per_run(self, prepared: Sequence[Any]) -> int | None:
        return None

    def collate(self, prepared: list[PreparedImage]) -> dict[str, np.ndarray]:
        return {self.input_name: np.stack([p.pixels for p in prepared]).astype(np.float32)}

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: list[PreparedImage], *,
                    params: dict) -> list[dict]:
        k = parse_k(params.get("k"), default=3, limit=len(self.labels or []) or 1000)
        probs = outputs[self.output_name]
        return [{"predictions": top_k(probs[i], labels=self.labels, k=k),
                 "preprocessing": {"original_size": list(p.original_size), "inverted": p.inverted}}
                for i, p in enumerate(prepared)]

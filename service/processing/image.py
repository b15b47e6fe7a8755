"""Image classification (cnn family): PNG/JPEG of any size or mode -> the 28x28 layout the model was trained on.

Training images (models/cnn_data.py) are digits in a 20x20 box inside a 28x28 black frame, 1.0 = white ink,
as MNIST lays them out. A photo of a digit on paper is brought to that layout the way MNIST was made:
grayscale; inverted when the paper (the border) is lighter than the ink; the paper's level and noise removed
(Otsu's threshold on the stretched image, a 3x3 median filter so specks don't widen the box); cropped to the
ink's bounding box; padded to a square; resized to 20x20; placed in 28x28 with its centre of mass at the
centre.

This module is also shipped verbatim inside edge bundles (export/edge.py), so it needs only numpy and Pillow
besides ``service.errors`` and ``service.processing.base``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.processing.base import Limits, parse_k, setting, top_k_rows

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


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance.

    NOTE: a few lines of numpy rather than scikit-image (not a dependency, and the edge bundle ships this file).
    """
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(np.float64)
    mass = np.cumsum(hist * centres)
    total, total_mass = weight[-1], mass[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * weight - total * mass) ** 2 / (weight * (total - weight))
    between = np.nan_to_num(between[:-1], nan=0.0, posinf=0.0)
    return float(edges[int(np.argmax(between)) + 1]) if between.max() > 0 else 0.5


def clean_ink(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """White ink on black in [0, 1]: inverted if the border (paper) is lighter than the rest, paper set to 0."""
    # Polarity: the pixels furthest from the paper (the border's level) are the ink; darker ones -> invert.
    deviation = gray - float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))
    far = np.abs(deviation) >= np.quantile(np.abs(deviation), 0.95)
    inverted = bool(deviation[far].mean() < 0)
    ink = 1.0 - gray if inverted else gray
    paper, top = float(np.median(np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]]))), float(ink.max())
    if top - paper < 1e-3:  # a blank image: nothing to find
        return np.zeros_like(ink), inverted
    stretched = np.clip((ink - paper) / (top - paper), 0.0, 1.0)
    cut = otsu_threshold(stretched)
    # Below the threshold is paper (grain, shadows, JPEG ringing); above it the stroke keeps its soft edge.
    return np.where(stretched >= cut, stretched, 0.0).astype(np.float32), inverted


def ink_box(ink: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the ink after a 3x3 median filter (isolated specks don't count)."""
    mask = Image.fromarray(((ink > 0) * 255).astype(np.uint8)).filter(ImageFilter.MedianFilter(3))
    box = mask.getbbox()
    if box is None:
        box = Image.fromarray(((ink > 0) * 255).astype(np.uint8)).getbbox()  # thin strokes only: keep them
    if box is None:
        return None
    left, top, right, bottom = box
    return top, bottom, left, right


def layout(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """MNIST layout: clean, crop to the ink, pad square, resize to 20x20, centre of mass at the 28x28 centre."""
    ink, inverted = clean_ink(gray)
    box = ink_box(ink)
    out = np.zeros((SIDE, SIDE), np.float32)
    if box is None:
        return out[None], inverted
    top, bottom, left, right = box
    crop = ink[top:bottom, left:right]
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = crop
    small = Image.fromarray(square, mode="F").resize((BOX, BOX), Image.Resampling.BILINEAR)
    digit = np.clip(np.asarray(small, np.float32), 0.0, 1.0)
    digit /= max(float(digit.max()), 1e-6)  # full contrast, as the training digits
    rows, cols = np.indices(digit.shape)
    total = float(digit.sum())
    cy, cx = float((rows * digit).sum()) / total, float((cols * digit).sum()) / total
    # Shift so the centre of mass lands on the frame's centre, keeping the 20x20 box inside the frame.
    y0 = int(np.clip(round(SIDE / 2 - 0.5 - cy), 0, SIDE - BOX))
    x0 = int(np.clip(round(SIDE / 2 - 0.5 - cx), 0, SIDE - BOX))
    out[y0:y0 + BOX, x0:x0 + BOX] = digit
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
                                 "black); paper removed (Otsu threshold); cropped to the ink, padded square, "
                                 "resized to 20x20 and centred by centre of mass in 28x28 (as MNIST); [0, 1]",
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
        best = top_k_rows(probs[:len(prepared)], labels=self.labels, k=k)
        return [{"predictions": best[i],
                 "preprocessing": {"original_size": list(p.original_size), "inverted": p.inverted}}
                for i, p in enumerate(prepared)]

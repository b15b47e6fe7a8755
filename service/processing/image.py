"""Image classification (cnn family): PNG/JPEG of any size or mode -> the 28x28 layout the model was trained on.

Training images (models/cnn_data.py) are digits in a 20x20 box inside a 28x28 black frame, 1.0 = white ink,
as MNIST lays them out. A photo of a digit on paper is brought to that layout the way MNIST was made:
grayscale; inverted when the paper (the border) is lighter than the ink; the paper's level and noise removed
(Otsu's threshold on the stretched image, a 3x3 median filter so specks don't widen the box); cropped to the
ink's bounding box; padded to a square; resized to 20x20; placed in 28x28 with its centre of mass at the
centre.

This module and the layout itself (``service.processing.image_layout``) are also shipped verbatim inside edge
bundles (export/edge.py), so they need only numpy and Pillow besides ``service.errors`` and
``service.processing.base``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from PIL import Image

from service.errors import InvalidInput, PayloadTooLarge
from service.processing.base import Limits, TopKColumns, class_names, parse_k, predictions_arrow, setting, top_k_columns
from service.processing.image_layout import (
    LEVELS,
    clean_ink,
    clean_ink_levels,
    finite_rows,
    layout,
    layout_batch,
    layout_levels,
    quantile_of_levels,
)
from service.processing.photo import ACCEPTS, REDUCE_ABOVE, check_pixels, draft_large_jpeg, header, open_image
from service.processing.png_levels import declared_size, png_levels

# The layout's names, for callers that knew them here before it had its own module.
__all__ = ["LEVELS", "ImageColumns", "ImageProcessor", "PreparedImage", "clean_ink", "clean_ink_levels", "finite_rows", "gray_levels",
           "layout", "layout_batch", "layout_levels", "non_finite", "quantile_of_levels", "to_gray"]


@dataclass
class PreparedImage:
    pixels: np.ndarray  # [1, 28, 28] float32 in [0, 1]
    original_size: tuple[int, int]
    inverted: bool


def _transparent(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def _wide(img: Image.Image) -> bool:
    """16/32-bit integer or float pixels (16-bit PNG/TIFF, float TIFF): scaled by their own maximum."""
    return img.mode.startswith("I") or img.mode == "F"


def gray_levels(img: Image.Image) -> np.ndarray | None:
    """The image's 8-bit gray levels [H, W] (uint8), whose `LEVELS` are `to_gray(img)` exactly; None where
    to_gray does more (transparency, 16/32-bit or float pixels)."""
    if _transparent(img) or _wide(img):
        return None
    return np.asarray(img if img.mode == "L" else img.convert("L"))


# A drawing whose pixels are mostly (by alpha) transparent is ink on a transparent canvas: shown over a page it
# is seen against that page, whatever colour the file stores under alpha 0.
DRAWING_BELOW = 0.5


def to_gray(img: Image.Image) -> np.ndarray:
    """Grayscale in [0, 1]. Transparent pixels are composited over a backdrop the ink stands out against.

    A digit drawn on a transparent canvas (mostly transparent) goes over white when its ink is dark and black
    when light, as a page shows it (black ink on black would be a blank image); a picture with a few transparent
    pixels (rounded corners) goes over its own mean level, so they read as paper. Opaque pixels keep their exact
    levels (the backdrop's weight is 1 - alpha = 0).
    """
    if _transparent(img):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), np.float32) / 255.0
        gray = np.asarray(rgba.convert("L"), np.float32) / 255.0
        coverage = float(alpha.mean(dtype=np.float64))
        seen = float((gray * alpha).sum(dtype=np.float64)) / max(float(alpha.sum(dtype=np.float64)), 1e-6)
        backdrop = (1.0 if seen < 0.5 else 0.0) if coverage < DRAWING_BELOW else seen
        return gray * alpha + np.float32(backdrop) * (1.0 - alpha)
    if _wide(img):
        arr = np.asarray(img, np.float32)
        if not np.isfinite(arr).all():
            return arr  # refused by the caller (`non_finite`)
        return np.clip(arr / max(float(arr.max()), 1.0), 0.0, 1.0)
    return np.asarray(img.convert("L"), np.float32) / 255.0


def non_finite(index: int) -> InvalidInput:
    return InvalidInput(f"item {index}: the image holds NaN or infinite values; expected finite pixel values "
                        f"(8-bit levels, or gray in [0, 1])")


def _small_png(data: bytes, *, max_pixels: int) -> tuple[int, int] | None:
    """A PNG's declared (width, height) where it decodes at full size (no reduction, photo.py) within
    `max_pixels`; None for anything else (other formats, large photos), which goes through Pillow."""
    declared = declared_size(data)
    if declared is None or min(declared) > REDUCE_ABOVE or declared[0] * declared[1] > max_pixels:
        return None
    return declared


# The smallest digits the family is trained on are 8x8 (scikit-learn's); a smaller image (a 1-pixel upload, a
# 13x1 sliver) holds no digit, and answering it would be a guess with a probability attached.
MIN_SIDE = 8


def _layout_any(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return layout_levels(pixels) if pixels.dtype == np.uint8 else layout_batch(pixels)


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
        """Refuse a request whose images together would decode to more than max_request_pixels (large JPEGs
        decode at a reduced scale, photo.py), before decoding any."""
        total, limit = 0, self.limits.max_request_pixels
        for index, payload in enumerate(payloads):
            if isinstance(payload, bytes):
                total += self._decoded_pixels(payload, index=index)
            elif isinstance(payload, np.ndarray):
                total += payload.size
            if total > limit:
                raise PayloadTooLarge(f"the request's images decode to more than {limit} pixels together (at item "
                                      f"{index}); send fewer or smaller images ({setting('max_request_pixels')})")

    def _decoded_pixels(self, payload: bytes, *, index: int) -> int:
        """How many pixels the item decodes to; read from a PNG's header where it is decoded at full size."""
        declared = _small_png(payload, max_pixels=self.limits.max_image_pixels)
        if declared is not None:
            return declared[0] * declared[1]
        img = header(payload, index=index)
        check_pixels(img, index=index, max_pixels=self.limits.max_image_pixels)
        draft_large_jpeg(img)
        return img.width * img.height

    def _pixels(self, payload: Any, *, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The item as [H, W] 8-bit gray levels (uint8, most files) or grayscale in [0, 1] (float32), and its
        original (width, height); 400 for an image too small to hold a digit."""
        pixels, size = self._decode(payload, index=index)
        if min(size) < MIN_SIDE:
            raise InvalidInput(f"item {index}: an image of {size[0]}x{size[1]} pixels is too small to hold a digit; "
                               f"expected at least {MIN_SIDE}x{MIN_SIDE} pixels")
        return pixels, size

    def _decode(self, payload: Any, *, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        if isinstance(payload, np.ndarray):  # batch .npy rows: a [H, W] or [1, H, W] image, uint8 or [0, 1]
            arr = np.squeeze(np.asarray(payload, np.float32))
            if arr.ndim != 2:
                raise InvalidInput(f"item {index}: expected a 2-D image array, got shape {list(payload.shape)}")
            if not finite_rows(arr[None])[0]:
                raise non_finite(index)
            return (arr / 255.0 if payload.dtype == np.uint8 else arr), (arr.shape[1], arr.shape[0])
        if _small_png(payload, max_pixels=self.limits.max_image_pixels) is not None:
            fast = png_levels(payload, max_pixels=self.limits.max_image_pixels)  # plain PNGs, without Pillow
            if fast is not None:
                return fast
        img, size = open_image(payload, index=index, max_pixels=self.limits.max_image_pixels)
        levels = gray_levels(img)
        if levels is not None:
            return levels, size
        gray = to_gray(img)
        if not finite_rows(gray[None])[0]:  # a float TIFF may hold NaN or infinity
            raise non_finite(index)
        return gray, size

    def prepare(self, payload: Any, *, index: int) -> PreparedImage:
        pixels, size = self._pixels(payload, index=index)
        out, inverted = _layout_any(pixels[None])
        return PreparedImage(out[0], size, bool(inverted[0]))

    def prepare_batch(self, payloads: Sequence[Any], *, indices: Sequence[int]) -> list[PreparedImage | Exception]:
        """`prepare` of many items, laid out together (one array op per group of equally sized images); an item
        that cannot be decoded is its own exception in the list, never its batch-mates'."""
        out: list[PreparedImage | Exception | None] = [None] * len(payloads)
        groups: dict[tuple, list[tuple[int, np.ndarray, tuple[int, int]]]] = {}
        for pos, (payload, index) in enumerate(zip(payloads, indices)):
            try:
                pixels, size = self._pixels(payload, index=index)
            except Exception as exc:  # a bad row's own error (InvalidInput, or anything odd in its data)
                out[pos] = exc
                continue
            groups.setdefault((pixels.dtype.str, pixels.shape), []).append((pos, pixels, size))
        for members in groups.values():
            laid, inverted = _layout_any(np.stack([pixels for _, pixels, _ in members]))
            for (pos, _, size), px, inv in zip(members, laid, inverted.tolist()):
                out[pos] = PreparedImage(px, size, inv)
        return cast(list[PreparedImage | Exception], out)  # every position was filled above

    def rows_per_run(self, prepared: Sequence[Any]) -> int | None:
        return None

    def collate(self, prepared: list[PreparedImage]) -> dict[str, np.ndarray]:
        return {self.input_name: np.stack([p.pixels for p in prepared], dtype=np.float32)}

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: list[PreparedImage], *,
                    params: dict) -> list[dict]:
        return self.postprocess_columns(outputs, prepared, params=params).rows()

    def postprocess_columns(self, outputs: dict[str, np.ndarray], prepared: list[PreparedImage], *,
                            params: dict) -> ImageColumns:
        """`postprocess`'s results as columns (batch jobs write them to Parquet without a dict per row)."""
        k = parse_k(params.get("k"), default=3, limit=len(self.labels or []) or 1000)
        probs = outputs[self.output_name][:len(prepared)]
        index, probability = top_k_columns(probs, k=k)
        return ImageColumns(names=class_names(self.labels, probs.shape[1]), index=index, probability=probability,
                            original_size=[p.original_size for p in prepared],
                            inverted=[p.inverted for p in prepared])


@dataclass
class ImageColumns(TopKColumns):
    """A batch's image results as columns: each row's k best classes, best first, and its preprocessing facts."""

    original_size: list[tuple[int, int]]  # (width, height)
    inverted: list[bool]

    def rows(self) -> list[dict]:
        """One dict per row, as the task endpoint returns it."""
        names, results = self.names, []
        for idx, probs, size, inverted in zip(self.index.tolist(), self.probability.tolist(), self.original_size,
                                              self.inverted):
            results.append({"predictions": [{"label": names[i], "index": i, "probability": v}
                                            for i, v in zip(idx, probs)],
                            "preprocessing": {"original_size": list(size), "inverted": inverted}})
        return results

    def arrow(self) -> Any:
        """The same values as one Arrow struct array, typed as Arrow infers `rows()`, without a dict per row."""
        # NOTE: pyarrow is the optional `parquet` extra; only the batch Parquet writer calls this.
        import pyarrow as pa

        sizes = np.asarray(self.original_size, np.int64).reshape(-1)
        original = pa.ListArray.from_arrays(pa.array(np.arange(0, len(sizes) + 1, 2, dtype=np.int32)),
                                            pa.array(sizes))
        preprocessing = pa.StructArray.from_arrays([original, pa.array(self.inverted, pa.bool_())],
                                                   names=["original_size", "inverted"])
        return pa.StructArray.from_arrays([predictions_arrow(self.names, self.index, self.probability),
                                           preprocessing], names=["predictions", "preprocessing"])

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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from PIL import Image

from service.errors import InvalidInput, PayloadTooLarge
from service.processing.base import Limits, parse_k, setting, top_k_rows
from service.processing.photo import (
    ACCEPTS,
    check_pixels,
    draft_large_jpeg,
    even_paper,
    header,
    open_image,
    uneven_border,
    widen_thin,
)

SIDE, BOX = 28, 20


@dataclass
class PreparedImage:
    pixels: np.ndarray  # [1, 28, 28] float32 in [0, 1]
    original_size: tuple[int, int]
    inverted: bool


# to_gray's value of each 8-bit level, exactly: `np.asarray(img.convert("L"), np.float32) / 255.0` per pixel.
LEVELS = np.arange(256, dtype=np.float32) / 255.0


def gray_levels(img: Image.Image) -> np.ndarray | None:
    """The image's 8-bit gray levels [H, W] (uint8), whose `LEVELS` are `to_gray(img)` exactly; None where
    to_gray does more (transparency, 16/32-bit pixels)."""
    if img.mode in ("RGBA", "LA", "PA", "I;16", "I;16B", "I;16L", "I") or (
            img.mode == "P" and "transparency" in img.info):
        return None
    return np.asarray(img if img.mode == "L" else img.convert("L"))


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


# np.histogram's bin edges for float32 values in [0, 1] (float32 themselves): Otsu's bins, exactly.
_EDGES = np.histogram(np.zeros(1, np.float32), bins=256, range=(0.0, 1.0))[1]
_CENTRES = (_EDGES[:-1] + _EDGES[1:]) / 2


def _bins(values: np.ndarray) -> np.ndarray:
    """Each value's Otsu bin (np.histogram's, 256 over [0, 1]): scaled, then moved by one where float rounding
    crossed an edge."""
    bins = len(_CENTRES)
    index = np.minimum((values * np.float32(bins)).astype(np.intp), bins - 1)
    index -= values < _EDGES[index]
    index += (values >= _EDGES[index + 1]) & (index < bins - 1)
    return index


def otsu_thresholds(values: np.ndarray) -> np.ndarray:
    """Otsu's threshold of each row of `values` ([N, ...] in [0, 1]): the cut maximising the between-class variance.

    NOTE: a few lines of numpy rather than scikit-image (not a dependency, and the edge bundle ships this file);
    the bins are np.histogram's (256 over [0, 1]), counted for all rows at once with one bincount.
    """
    flat = values.reshape(len(values), -1)
    bins = len(_CENTRES)
    index = _bins(flat) + np.arange(len(flat))[:, None] * bins
    return _otsu_cuts(np.bincount(index.ravel(), minlength=len(flat) * bins).reshape(len(flat), bins))


def _otsu_cuts(hist: np.ndarray) -> np.ndarray:
    """Otsu's threshold of each row of a [N, 256] integer histogram over `_EDGES`' bins."""
    weight = np.cumsum(hist, axis=1).astype(np.float64)
    mass = np.cumsum(hist * _CENTRES, axis=1)
    total, total_mass = weight[:, -1:], mass[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * weight - total * mass) ** 2 / (weight * (total - weight))
    between = np.nan_to_num(between[:, :-1], nan=0.0, posinf=0.0)
    cuts = _EDGES[np.argmax(between, axis=1) + 1]
    return np.where(between.max(axis=1) > 0, cuts, np.float32(0.5)).astype(np.float32)


def _border(images: np.ndarray) -> np.ndarray:
    return np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)


def clean_ink(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """White ink on black in [0, 1] for each of [N, H, W] images: inverted where the border (paper) is lighter
    than the rest, paper set to 0. Returns (ink, inverted[N])."""
    inverted = _polarity(gray)
    ink = np.where(inverted[:, None, None], 1.0 - gray, gray)
    stretched, blank = _stretched(ink, paper=np.median(_border(ink), axis=1), top=ink.max(axis=(1, 2)))
    cut = otsu_thresholds(stretched)[:, None, None]
    # Below the threshold is paper (grain, shadows, JPEG ringing); above it the stroke keeps its soft edge.
    kept = (stretched >= cut) & ~blank[:, None, None]
    return np.where(kept, stretched, 0.0).astype(np.float32), inverted


def clean_ink_levels(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`clean_ink(LEVELS[levels])` of [N, H, W] 8-bit gray levels, exactly, at a fraction of the cost.

    Every step is a function of a pixel's level within its image, so it is computed once per level ([N, 256]
    tables); the quantile and Otsu's histogram come from the levels' counts, and only the polarity's sum and
    the result are looked up per pixel. Same float32 operations on the same values, so the same bits.
    """
    n = len(levels)
    at = levels.reshape(n, -1) + (np.arange(n) * 256)[:, None]  # each pixel's entry in the [N, 256] tables
    counts = np.bincount(at.ravel(), minlength=n * 256).reshape(n, 256)
    deviation = LEVELS - np.median(LEVELS[_border(levels)], axis=1)[:, None]
    spread = np.abs(deviation)
    far = spread >= quantile_of_levels(spread, counts, 0.95)[:, None]
    polarity = np.where(far, deviation, 0.0).ravel()[at].reshape(levels.shape)
    inverted = polarity.sum(axis=(1, 2), dtype=np.float64) < 0  # summed per pixel, as `_polarity` does
    ink = np.where(inverted[:, None], 1.0 - LEVELS, LEVELS)  # [N, 256]: each level's ink
    paper = np.median(np.take_along_axis(ink, _border(levels).astype(np.intp), axis=1), axis=1)
    stretched, blank = _stretched(ink, paper=paper, top=np.where(counts > 0, ink, -np.inf).max(axis=1))
    bins = len(_CENTRES)
    hist = np.bincount((_bins(stretched) + (np.arange(n) * bins)[:, None]).ravel(), weights=counts.ravel(),
                       minlength=n * bins).astype(np.int64).reshape(n, bins)  # integer counts: exact in float64
    kept = (stretched >= _otsu_cuts(hist)[:, None]) & ~blank[:, None]
    table = np.where(kept, stretched, 0.0).astype(np.float32)
    return table.ravel()[at].reshape(levels.shape), inverted


def quantile_of_levels(values: np.ndarray, counts: np.ndarray, q: float) -> np.ndarray:
    """`np.quantile(pixels, q, axis=1)` of [N, P] pixels given as each row's value per level ([N, L]) and how
    many pixels have each level ([N, L]), with numpy's own arithmetic.

    NOTE: numpy's "linear" quantile interpolates between the k-th and (k+1)-th smallest values at the fraction
    gamma of (P - 1) * q; both are read off the cumulative counts here, and numpy's own interpolation of a
    2-value row at gamma gives the same bits as its interpolation over all P values.
    """
    pixels = int(counts[0].sum())
    virtual = (pixels - 1) * q
    k = math.floor(virtual)
    order = np.argsort(values, axis=1, kind="stable")
    ranked = np.take_along_axis(values, order, axis=1)
    below = np.cumsum(np.take_along_axis(counts, order, axis=1), axis=1)
    rows = np.arange(len(values))
    pair = np.stack([ranked[rows, (below <= k).sum(axis=1)],
                     ranked[rows, (below <= min(k + 1, pixels - 1)).sum(axis=1)]], axis=1)
    return np.quantile(pair, virtual - k, axis=1)


def _polarity(gray: np.ndarray) -> np.ndarray:
    """Which of [N, H, W] images to invert: the pixels furthest from the paper (the border's level) are the ink;
    darker ones -> invert."""
    deviation = gray - np.median(_border(gray), axis=1)[:, None, None]
    spread = np.abs(deviation)
    far = spread >= np.quantile(spread.reshape(len(gray), -1), 0.95, axis=1)[:, None, None]
    return np.where(far, deviation, 0.0).sum(axis=(1, 2), dtype=np.float64) < 0


def _stretched(ink: np.ndarray, *, paper: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's ink (rows of `ink`) stretched so paper is 0 and the darkest ink 1, and which are blank."""
    span = top.astype(np.float64) - paper.astype(np.float64)
    blank = span < 1e-3  # a blank image: nothing to find
    span = np.where(blank, 1.0, span).astype(np.float32)
    per_image = (-1,) + (1,) * (ink.ndim - 1)
    return np.clip((ink - paper.reshape(per_image)) / span.reshape(per_image), 0.0, 1.0), blank


def _median3(mask: np.ndarray) -> np.ndarray:
    """3x3 median of [N, H, W] booleans with the edges repeated, as Pillow's MedianFilter(3): at least 5 of 9."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge").astype(np.uint8)
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return np.greater_equal(rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:], 5)


def ink_boxes(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top, bottom, left, right) [N, 4] of each image's ink after a 3x3 median filter (isolated specks don't
    count; thin strokes only, which the filter removes, are kept), and which images have any ink at all."""
    mask: np.ndarray = np.greater(ink, 0)
    filtered = _median3(mask)
    use = np.where(np.any(filtered, axis=(1, 2))[:, None, None], filtered, mask)
    rows, cols = np.any(use, axis=2), np.any(use, axis=1)
    height, width = ink.shape[1:]
    boxes = np.stack([rows.argmax(1), height - rows[:, ::-1].argmax(1),
                      cols.argmax(1), width - cols[:, ::-1].argmax(1)], axis=1)
    return boxes, np.any(rows, axis=1)


_RESIZE: dict[int, np.ndarray] = {}


def _resize_matrix(side: int) -> np.ndarray:
    """[BOX, side] weights of Pillow's bilinear resize from `side` to BOX pixels along one axis.

    NOTE: read off Pillow itself (resizing an identity image along one axis), so `A @ square @ A.T` is Pillow's
    separable resize of a whole group of equally sized squares in one matmul, not one Pillow call per image.
    """
    if side not in _RESIZE:
        eye = Image.fromarray(np.eye(side, dtype=np.float32), mode="F")
        _RESIZE[side] = np.asarray(eye.resize((BOX, side), Image.Resampling.BILINEAR), np.float64).T.copy()
    return _RESIZE[side]


def _squares(ink: np.ndarray, boxes: np.ndarray, side: int) -> np.ndarray:
    """Each image's ink box, centred in a zero `side` x `side` square (boxes at most `side` on each axis)."""
    # NOTE: one slice copy per image: cheaper than one fancy-indexed gather of every square's pixels.
    squares = np.zeros((len(ink), side, side), ink.dtype)
    for square, image, (top, bottom, left, right) in zip(squares, ink, boxes.tolist()):
        oy, ox = (side - (bottom - top)) // 2, (side - (right - left)) // 2
        square[oy:oy + bottom - top, ox:ox + right - left] = image[top:bottom, left:right]
    return squares


def _digits(ink: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """[N, BOX, BOX]: each ink box padded square and resized to BOX x BOX, at full contrast."""
    sides = np.maximum(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2])
    small = np.empty((len(ink), BOX, BOX), np.float32)
    for side in np.unique(sides).tolist():  # one matmul per square size present in the batch
        rows = np.flatnonzero(sides == side)
        a = _resize_matrix(side)
        small[rows] = a @ _squares(ink[rows], boxes[rows], side) @ a.T
    digits = np.clip(small, 0.0, 1.0)
    return widen_thin(digits / np.maximum(digits.max(axis=(1, 2)), np.float32(1e-6))[:, None, None])


def layout_batch(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MNIST layout of [N, H, W] grayscale images at once: clean, crop to the ink, pad square, resize to 20x20,
    centre of mass at the 28x28 centre. Paper whose border is uneven (shadows, light falling off) is evened
    first (photo.py). Returns (pixels [N, 1, 28, 28] float32, inverted [N])."""
    uneven = uneven_border(_border(gray))
    if uneven.any():
        gray = gray.copy()
        light = _polarity(gray[uneven])
        for row, light_paper in zip(np.flatnonzero(uneven).tolist(), light.tolist()):
            evened = even_paper(gray[row], light_paper=light_paper)
            if evened is not None:
                gray[row] = evened
    return _layout(*clean_ink(gray))


def layout_levels(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`layout_batch(LEVELS[levels])` of [N, H, W] 8-bit gray levels, exactly (see `clean_ink_levels`); images
    with uneven paper take the float path."""
    uneven = uneven_border(LEVELS[_border(levels)])
    if not uneven.any():
        return _layout(*clean_ink_levels(levels))
    pixels = np.zeros((len(levels), 1, SIDE, SIDE), np.float32)
    inverted = np.zeros(len(levels), bool)
    pixels[uneven], inverted[uneven] = layout_batch(LEVELS[levels[uneven]])
    if not uneven.all():
        pixels[~uneven], inverted[~uneven] = _layout(*clean_ink_levels(levels[~uneven]))
    return pixels, inverted


def _layout(ink: np.ndarray, inverted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    boxes, found = ink_boxes(ink)
    out = np.zeros((len(ink), 1, SIDE, SIDE), np.float32)
    if not found.any():
        return out, inverted
    rows = np.flatnonzero(found)
    digits = _digits(ink[rows], boxes[rows])
    grid = np.arange(BOX, dtype=np.float64)
    total = digits.sum(axis=(1, 2), dtype=np.float64)
    cy = (digits.sum(axis=2, dtype=np.float64) @ grid) / total
    cx = (digits.sum(axis=1, dtype=np.float64) @ grid) / total
    # Shift so the centre of mass lands on the frame's centre, keeping the 20x20 box inside the frame.
    y0 = np.clip(np.rint(SIDE / 2 - 0.5 - cy), 0, SIDE - BOX).astype(int).tolist()
    x0 = np.clip(np.rint(SIDE / 2 - 0.5 - cx), 0, SIDE - BOX).astype(int).tolist()
    for row, digit, y, x in zip(rows.tolist(), digits, y0, x0):
        out[row, 0, y:y + BOX, x:x + BOX] = digit
    return out, inverted


def layout(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """`layout_batch` of one [H, W] image: ([1, 28, 28] pixels, inverted)."""
    pixels, inverted = layout_batch(gray[None])
    return pixels[0], bool(inverted[0])


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
                img = header(payload, index=index)
                check_pixels(img, index=index, max_pixels=self.limits.max_image_pixels)
                draft_large_jpeg(img)
                total += img.width * img.height
            elif isinstance(payload, np.ndarray):
                total += payload.size
            if total > limit:
                raise PayloadTooLarge(f"the request's images decode to more than {limit} pixels together (at item "
                                      f"{index}); send fewer or smaller images ({setting('max_request_pixels')})")

    def _pixels(self, payload: Any, *, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The item as [H, W] 8-bit gray levels (uint8, most files) or grayscale in [0, 1] (float32), and its
        original (width, height)."""
        if isinstance(payload, np.ndarray):  # batch .npy rows: a [H, W] or [1, H, W] image, uint8 or [0, 1]
            arr = np.squeeze(np.asarray(payload, np.float32))
            if arr.ndim != 2:
                raise InvalidInput(f"item {index}: expected a 2-D image array, got shape {list(payload.shape)}")
            return (arr / 255.0 if payload.dtype == np.uint8 else arr), (arr.shape[1], arr.shape[0])
        img, size = open_image(payload, index=index, max_pixels=self.limits.max_image_pixels)
        levels = gray_levels(img)
        return (to_gray(img) if levels is None else levels), size

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
        k = parse_k(params.get("k"), default=3, limit=len(self.labels or []) or 1000)
        probs = outputs[self.output_name]
        best = top_k_rows(probs[:len(prepared)], labels=self.labels, k=k)
        return [{"predictions": best[i],
                 "preprocessing": {"original_size": list(p.original_size), "inverted": p.inverted}}
                for i, p in enumerate(prepared)]

"""The cnn layout as it was written before round 4 (service/processing/image.py at c8bda38), float path only,
frozen here as the plain formulation that `service.processing.image_layout` must reproduce bit for bit:
`np.median` of the border, `np.quantile` of the spread, np.histogram's Otsu bins, `np.pad` for the median
filter, one slice copy per square. Pillow decodes (`to_gray`), as the server did. The resize weights
(`_resize_matrix`, read off Pillow) are imported: round 4 left them unchanged. So are the photo steps round 4
added beside the layout (service/processing/photo.py: evening uneven paper on photos, widening thin strokes,
EXIF orientation and reduction when decoding): they are the same code on both sides, applied at the same points."""

from __future__ import annotations

import numpy as np

from service.processing.image import to_gray
from service.processing.image_layout import BOX, SIDE, _resize_matrix
from service.processing.photo import PHOTO_SIDE, even_paper, open_image, uneven_border, widen_thin

_EDGES = np.histogram(np.zeros(1, np.float32), bins=256, range=(0.0, 1.0))[1]

_CENTRES = (_EDGES[:-1] + _EDGES[1:]) / 2


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


def _bins(values: np.ndarray) -> np.ndarray:
    index = np.minimum((values * np.float32(256)).astype(np.intp), 255)
    index -= values < _EDGES[index]
    index += (values >= _EDGES[index + 1]) & (index < 255)
    return index


def _border(images: np.ndarray) -> np.ndarray:
    return np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)


def _stretched(ink: np.ndarray, *, paper: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    span = top.astype(np.float64) - paper.astype(np.float64)
    blank = span < 1e-3
    span = np.where(blank, 1.0, span).astype(np.float32)
    return np.clip((ink - paper[:, None, None]) / span[:, None, None], 0.0, 1.0), blank


def clean_ink(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inverted = _polarity(gray)
    ink = np.where(inverted[:, None, None], 1.0 - gray, gray)
    stretched, blank = _stretched(ink, paper=np.median(_border(ink), axis=1), top=ink.max(axis=(1, 2)))
    flat = stretched.reshape(len(stretched), -1)
    index = _bins(flat) + np.arange(len(flat))[:, None] * 256
    hist = np.bincount(index.ravel(), minlength=len(flat) * 256).reshape(len(flat), 256)
    kept = (stretched >= _otsu_cuts(hist)[:, None, None]) & ~blank[:, None, None]
    return np.where(kept, stretched, 0.0).astype(np.float32), inverted


def ink_boxes(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = np.greater(ink, 0)
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge").astype(np.uint8)
    rows3 = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    filtered = np.greater_equal(rows3[:, :, :-2] + rows3[:, :, 1:-1] + rows3[:, :, 2:], 5)
    use = np.where(np.any(filtered, axis=(1, 2))[:, None, None], filtered, mask)
    rows, cols = np.any(use, axis=2), np.any(use, axis=1)
    height, width = ink.shape[1:]
    boxes = np.stack([rows.argmax(1), height - rows[:, ::-1].argmax(1),
                      cols.argmax(1), width - cols[:, ::-1].argmax(1)], axis=1)
    return boxes, np.any(rows, axis=1)


def _digits(ink: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    sides = np.maximum(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2])
    small = np.empty((len(ink), BOX, BOX), np.float32)
    for side in np.unique(sides).tolist():
        rows = np.flatnonzero(sides == side)
        squares = np.zeros((len(rows), side, side), ink.dtype)
        for square, image, (top, bottom, left, right) in zip(squares, ink[rows], boxes[rows].tolist()):
            oy, ox = (side - (bottom - top)) // 2, (side - (right - left)) // 2
            square[oy:oy + bottom - top, ox:ox + right - left] = image[top:bottom, left:right]
        a = _resize_matrix(side)
        small[rows] = a @ squares @ a.T
    digits = np.clip(small, 0.0, 1.0)
    return widen_thin(digits / np.maximum(digits.max(axis=(1, 2)), np.float32(1e-6))[:, None, None])


def _polarity(gray: np.ndarray) -> np.ndarray:
    deviation = gray - np.median(_border(gray), axis=1)[:, None, None]
    spread = np.abs(deviation)
    far = spread >= np.quantile(spread.reshape(len(gray), -1), 0.95, axis=1)[:, None, None]
    return np.where(far, deviation, 0.0).sum(axis=(1, 2), dtype=np.float64) < 0


def _even_photos(gray: np.ndarray) -> np.ndarray:
    if min(gray.shape[1:]) < PHOTO_SIDE:
        return gray
    uneven = uneven_border(_border(gray))
    if not uneven.any():
        return gray
    gray = gray.copy()
    for row, light in zip(np.flatnonzero(uneven).tolist(), _polarity(gray[uneven]).tolist()):
        evened = even_paper(gray[row], light_paper=light)
        if evened is not None:
            gray[row] = evened
    return gray


def layout_batch(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, H, W] float grayscale -> ([N, 1, 28, 28] float32, inverted [N]), the pre-round-4 way."""
    ink, inverted = clean_ink(_even_photos(gray))
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
    y0 = np.clip(np.rint(SIDE / 2 - 0.5 - cy), 0, SIDE - BOX).astype(int).tolist()
    x0 = np.clip(np.rint(SIDE / 2 - 0.5 - cx), 0, SIDE - BOX).astype(int).tolist()
    for row, digit, y, x in zip(rows.tolist(), digits, y0, x0):
        out[row, 0, y:y + BOX, x:x + BOX] = digit
    return out, inverted


def prepare_file(data: bytes) -> tuple[np.ndarray, bool]:
    """One PNG/JPEG file decoded by Pillow and laid out alone: ([1, 28, 28], inverted)."""
    pixels, inverted = layout_batch(to_gray(open_image(data, index=0, max_pixels=2 ** 40)[0])[None])
    return pixels[0], bool(inverted[0])

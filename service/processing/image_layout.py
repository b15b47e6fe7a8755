"""The cnn family's MNIST layout of decoded grayscale images, a batch at a time (see service/processing/image.py).

Two entry points give the same bits: `layout_batch` on finite float images (gray in [0, 1]), `layout_levels`
on 8-bit gray levels (every step past the polarity is a function of a pixel's level, computed once per level).
Each step is numpy's own arithmetic on the same values as the plain formulation (`np.median` of the border,
`np.quantile` of the spread, np.histogram's bins for Otsu, Pillow's bilinear resize), only arranged to cost
less: order statistics from one `np.partition` at the two ranks they need, the inverted images' paper level
from the same partition, level tables instead of per-pixel work. tests/image_layout_reference.py holds the
plain formulation (the code before this arrangement); tests/test_image_layout_exact.py compares bit for bit.

Shipped inside edge bundles with image.py (export/edge.py): numpy and Pillow only.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from service.processing.photo import PHOTO_SIDE, even_paper, uneven_border, widen_thin

SIDE, BOX = 28, 20

# to_gray's value of each 8-bit level, exactly: `np.asarray(img.convert("L"), np.float32) / 255.0` per pixel.
LEVELS = np.arange(256, dtype=np.float32) / 255.0

# np.histogram's bin edges for float32 values in [0, 1] (float32 themselves): Otsu's bins, exactly.
_EDGES = np.histogram(np.zeros(1, np.float32), bins=256, range=(0.0, 1.0))[1]
_CENTRES = (_EDGES[:-1] + _EDGES[1:]) / 2
# Past this many pixels an image's polarity is summed pixel by pixel (see `_level_sums_exact`).
_EXACT_LEVEL_SUM_PIXELS = 2 ** 20


def _bins(values: np.ndarray) -> np.ndarray:
    """Each value's Otsu bin (np.histogram's, 256 over [0, 1]) of values in [0, 1].

    NOTE: np.histogram's edges here are exactly k/256 and `values * 256` is exact in float32 (a power of two), so
    the bin is that product's floor (the last bin closed at 1.0): np.histogram's own edge corrections never fire.
    """
    index = (values * np.float32(256)).astype(np.intp)
    return np.minimum(index, 255, out=index)


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
    between = between[:, :-1]
    between = np.where(np.isfinite(between), between, 0.0)  # 0/0 at empty ends; never negative
    cuts = _EDGES[np.argmax(between, axis=1) + 1]
    return np.where(between.max(axis=1) > 0, cuts, np.float32(0.5)).astype(np.float32)


def _border(images: np.ndarray) -> np.ndarray:
    return np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)


def _median_pairs(border: np.ndarray) -> np.ndarray:
    """[N, 2]: each row's two middle values, as `np.median` averages them (rows have an even length: 2H + 2W)."""
    half = border.shape[1] // 2
    return np.partition(border, (half - 1, half), axis=1)[:, half - 1:half + 1]


def _pair_quantile(values: np.ndarray, q: float) -> np.ndarray:
    """`np.quantile(values, q, axis=1)` of [N, P] rows: one partition at the two ranks numpy interpolates.

    NOTE: numpy's "linear" quantile interpolates between the k-th and (k+1)-th smallest at gamma = frac((P-1)q)
    after partitioning four ranks (and a Python-level wrapper that costs more than the interpolation here).
    """
    pixels = values.shape[1]
    virtual = (pixels - 1) * q
    k = math.floor(virtual)
    ranks = (k, min(k + 1, pixels - 1))
    return _lerp(np.partition(values, ranks, axis=1)[:, list(ranks)], virtual - k)


def _lerp(pair: np.ndarray, t: float) -> np.ndarray:
    """numpy's quantile interpolation (`_lerp` in numpy/lib/_function_base_impl.py) of [N, 2] order statistics at
    gamma `t`, in their dtype: a Python float stays weak, as in `np.quantile(values, q)` with a float q."""
    low, high = pair[:, 0], pair[:, 1]
    diff = high - low
    return high - diff * (1 - t) if t >= 0.5 else low + diff * t


def clean_ink(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """White ink on black in [0, 1] for each of [N, H, W] finite images (`finite_rows` says which are): inverted
    where the border (paper) is lighter than the rest, paper set to 0. Returns (ink, inverted[N])."""
    inverted, pairs = _polarity(gray)
    ink, paper = gray, np.mean(pairs, axis=1)
    if inverted.any():
        ink = np.where(inverted[:, None, None], 1.0 - gray, gray)
        # 1 - x is monotone decreasing (rounding too), so the inverted border's middle pair is 1 - the pair.
        paper = np.where(inverted, np.mean(1.0 - pairs[:, ::-1], axis=1), paper)
    stretched, blank = _stretched(ink, paper=paper, top=ink.max(axis=(1, 2)))
    kept = (stretched >= otsu_thresholds(stretched)[:, None, None]) & ~blank[:, None, None]
    return np.where(kept, stretched, np.float32(0.0)), inverted


def _polarity(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which of [N, H, W] images to invert: the pixels furthest from the paper (the border's median) are the
    ink, darker ones -> invert; the border's two middle values [N, 2])."""
    pairs = _median_pairs(_border(gray))
    deviation = gray - np.mean(pairs, axis=1)[:, None, None]  # np.median's last step on its two middle values
    spread = np.abs(deviation)
    far = spread >= _pair_quantile(spread.reshape(len(gray), -1), 0.95)[:, None, None]
    return np.where(far, deviation, 0.0).sum(axis=(1, 2), dtype=np.float64) < 0, pairs


def finite_rows(gray: np.ndarray) -> np.ndarray:
    """[N] bool: which of [N, ...] float images hold no NaN or infinity (the only ones the layout accepts)."""
    return np.isfinite(gray.reshape(len(gray), -1)).all(axis=1)


def clean_ink_levels(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`clean_ink(LEVELS[levels])` of [N, H, W] 8-bit gray levels, exactly, at a fraction of the cost.

    Every step is a function of a pixel's level within its image, so it is computed once per level ([N, 256]
    tables); the quantile, the polarity's sum and Otsu's histogram come from the levels' counts, and only the
    result is looked up per pixel. Same float32 operations on the same values, so the same bits.
    """
    n = len(levels)
    at = levels.reshape(n, -1) + (np.arange(n) * 256)[:, None]  # each pixel's entry in the [N, 256] tables
    counts = np.bincount(at.ravel(), minlength=n * 256).reshape(n, 256)
    pairs = _median_pairs(LEVELS[_border(levels)])
    deviation = LEVELS - np.mean(pairs, axis=1)[:, None]  # np.median's last step, as in `clean_ink`
    spread = np.abs(deviation)
    far = spread >= quantile_of_levels(spread, counts, 0.95)[:, None]
    inverted = _polarity_sums(np.where(far, deviation, np.float32(0.0)), counts=counts, at=at) < 0
    ink = np.where(inverted[:, None], 1.0 - LEVELS, LEVELS)  # [N, 256]: each level's ink
    paper = np.where(inverted, (1.0 - pairs[:, ::-1]).mean(axis=1), pairs.mean(axis=1))
    stretched, blank = _stretched(ink, paper=paper, top=np.where(counts > 0, ink, -np.inf).max(axis=1))
    bins = len(_CENTRES)
    hist = np.bincount((_bins(stretched) + (np.arange(n) * bins)[:, None]).ravel(), weights=counts.ravel(),
                       minlength=n * bins).astype(np.int64).reshape(n, bins)  # integer counts: exact in float64
    kept = (stretched >= _otsu_cuts(hist)[:, None]) & ~blank[:, None]
    table = np.where(kept, stretched, 0.0).astype(np.float32)
    return table.ravel()[at].reshape(levels.shape), inverted


def _polarity_sums(polarity: np.ndarray, *, counts: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Each image's sum over its pixels of its level's `polarity` ([N, 256] float32), in float64, exactly as a
    pixel-by-pixel sum: from the level counts where that sum is exact in any order, else pixel by pixel.

    NOTE: levels are multiples of 2^-32 (float32 of k/255 >= 2^-9), the border median a multiple of 2^-33, so
    every deviation is k * 2^-33 with |k| <= 2^33; a float64 sum of up to 2^20 of them is exact in any order
    (|partial sums| * 2^33 < 2^53), so counts x value gives the pixel sum's bits without touching the pixels.
    """
    if at.shape[1] <= _EXACT_LEVEL_SUM_PIXELS:
        return (polarity.astype(np.float64) * counts).sum(axis=1)
    return polarity.ravel()[at].sum(axis=1, dtype=np.float64)


def quantile_of_levels(values: np.ndarray, counts: np.ndarray, q: float) -> np.ndarray:
    """`np.quantile(pixels, q, axis=1)` of [N, P] pixels given as each row's value per level ([N, L]) and how
    many pixels have each level ([N, L]), with numpy's own arithmetic.

    NOTE: numpy's "linear" quantile interpolates between the k-th and (k+1)-th smallest values at the fraction
    gamma of (P - 1) * q; both are read off the cumulative counts here and interpolated as numpy does (`_lerp`).
    """
    pixels = int(counts[0].sum())
    virtual = (pixels - 1) * q
    k = math.floor(virtual)
    order = np.argsort(values, axis=1)  # tied values are equal: their order cannot change the pair
    ranked = np.take_along_axis(values, order, axis=1)
    below = np.cumsum(np.take_along_axis(counts, order, axis=1), axis=1)
    rows = np.arange(len(values))
    pair = np.stack([ranked[rows, (below <= k).sum(axis=1)],
                     ranked[rows, (below <= min(k + 1, pixels - 1)).sum(axis=1)]], axis=1)
    return _lerp(pair, virtual - k)


def _stretched(ink: np.ndarray, *, paper: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's ink (rows of `ink`) stretched so paper is 0 and the darkest ink 1, and which are blank."""
    span = top.astype(np.float64) - paper.astype(np.float64)
    blank = span < 1e-3  # a blank image: nothing to find
    span = np.where(blank, 1.0, span).astype(np.float32)
    per_image = (-1,) + (1,) * (ink.ndim - 1)
    out = np.subtract(ink, paper.reshape(per_image))
    np.divide(out, span.reshape(per_image), out=out)
    return np.clip(out, 0.0, 1.0, out=out), blank


def _median3(mask: np.ndarray) -> np.ndarray:
    """3x3 median of [N, H, W] booleans with the edges repeated, as Pillow's MedianFilter(3): at least 5 of 9."""
    n, height, width = mask.shape
    # NOTE: edges repeated by hand: np.pad's generality costs more than this whole filter on small images.
    p = np.empty((n, height + 2, width + 2), np.uint8)
    p[:, 1:-1, 1:-1] = mask
    p[:, 0, 1:-1], p[:, -1, 1:-1] = mask[:, 0], mask[:, -1]
    p[:, :, 0], p[:, :, -1] = p[:, :, 1], p[:, :, -2]
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return np.greater_equal(rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:], 5)


def ink_boxes(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top, bottom, left, right) [N, 4] of each image's ink after a 3x3 median filter (isolated specks don't
    count; thin strokes only, which the filter removes, are kept), and which images have any ink at all."""
    mask: np.ndarray = np.greater(ink, 0)
    filtered = _median3(mask)
    rows, cols = np.any(filtered, axis=2), np.any(filtered, axis=1)
    bare = ~rows.any(axis=1)  # the filter removed everything: use the unfiltered mask
    if bare.any():
        rows[bare], cols[bare] = np.any(mask[bare], axis=2), np.any(mask[bare], axis=1)
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


def _squares(ink: np.ndarray, boxes: np.ndarray, rows: np.ndarray, side: int) -> np.ndarray:
    """The ink box of each of `rows` of `ink`, centred in a zero `side` x `side` square (boxes at most `side` on
    each axis)."""
    if len(rows) == len(ink) and ink.shape[1:] == (side, side) and (boxes == (0, side, 0, side)).all():
        return ink  # every box is its whole (square) image: nothing to crop or pad
    # NOTE: one slice copy per image, straight from the batch: cheaper than a fancy-indexed gather of every
    # square's pixels, or than first copying the group's whole images out of the batch.
    squares = np.zeros((len(rows), side, side), ink.dtype)
    for square, row, (top, bottom, left, right) in zip(squares, rows.tolist(), boxes[rows].tolist()):
        oy, ox = (side - (bottom - top)) // 2, (side - (right - left)) // 2
        square[oy:oy + bottom - top, ox:ox + right - left] = ink[row, top:bottom, left:right]
    return squares


def _digits(ink: np.ndarray, boxes: np.ndarray, found: np.ndarray) -> np.ndarray:
    """[len(found), BOX, BOX]: the ink box of each of the `found` rows of `ink`, padded square and resized to
    BOX x BOX, at full contrast."""
    sides = np.maximum(boxes[found, 1] - boxes[found, 0], boxes[found, 3] - boxes[found, 2])
    small = np.empty((len(found), BOX, BOX), np.float32)
    for side in np.unique(sides).tolist():  # one matmul per square size present in the batch
        group = np.flatnonzero(sides == side)
        a = _resize_matrix(side)
        small[group] = a @ _squares(ink, boxes, found[group], side) @ a.T
    digits = np.clip(small, 0.0, 1.0, out=small)
    return widen_thin(digits / np.maximum(digits.max(axis=(1, 2)), np.float32(1e-6))[:, None, None])


def layout_batch(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MNIST layout of [N, H, W] grayscale images at once: clean, crop to the ink, pad square, resize to 20x20,
    centre of mass at the 28x28 centre. Photos whose paper is uneven (shadows, light falling off) are evened
    first (photo.py). Returns (pixels [N, 1, 28, 28] float32, inverted [N])."""
    uneven = _uneven_photos(gray)
    if uneven.any():
        gray = gray.copy()
        light = _polarity(gray[uneven])[0]
        for row, light_paper in zip(np.flatnonzero(uneven).tolist(), light.tolist()):
            evened = even_paper(gray[row], light_paper=light_paper)
            if evened is not None:
                gray[row] = evened
    return _layout(*clean_ink(gray))


def layout_levels(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`layout_batch(LEVELS[levels])` of [N, H, W] 8-bit gray levels, exactly (see `clean_ink_levels`); photos
    with uneven paper take the float path."""
    uneven = _uneven_photos(levels)
    if not uneven.any():
        return _layout(*clean_ink_levels(levels))
    pixels = np.zeros((len(levels), 1, SIDE, SIDE), np.float32)
    inverted = np.zeros(len(levels), bool)
    pixels[uneven], inverted[uneven] = layout_batch(LEVELS[levels[uneven]])
    if not uneven.all():
        pixels[~uneven], inverted[~uneven] = _layout(*clean_ink_levels(levels[~uneven]))
    return pixels, inverted


def _uneven_photos(images: np.ndarray) -> np.ndarray:
    """[N] bool: which of [N, H, W] images (gray in [0, 1], or 8-bit levels) are photos with uneven paper.
    Under PHOTO_SIDE nothing is evened (photo.py), so small images skip the check."""
    if min(images.shape[1:]) < PHOTO_SIDE:
        return np.zeros(len(images), bool)
    border = _border(images)
    return uneven_border(LEVELS[border] if images.dtype == np.uint8 else border)


def _layout(ink: np.ndarray, inverted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    boxes, found = ink_boxes(ink)
    out = np.zeros((len(ink), 1, SIDE, SIDE), np.float32)
    if not found.any():
        return out, inverted
    rows = np.flatnonzero(found)
    digits = _digits(ink, boxes, rows)
    grid = np.arange(BOX, dtype=np.float64)
    # NOTE: a sliver of ink (a 13x1 image) can vanish in the 20x20 resize: no mass, no centre (NaN would make an
    # empty slice below, a 500). Such a digit stays centred, all zeros.
    total = digits.sum(axis=(1, 2), dtype=np.float64)
    mass = np.where(total > 0, total, 1.0)
    cy = np.where(total > 0, (digits.sum(axis=2, dtype=np.float64) @ grid) / mass, (BOX - 1) / 2)
    cx = np.where(total > 0, (digits.sum(axis=1, dtype=np.float64) @ grid) / mass, (BOX - 1) / 2)
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

"""What a photo (not a scan) needs before the MNIST layout: decoded safely, upright, a bounded size, even paper.

Phone photos carry an EXIF orientation (the sensor's rows are stored sideways), are 12 MP or more, and have
shadows and uneven light across the paper. The layout in image.py assumes paper of one level; these steps
bring a photo to that without touching images that already are (no EXIF turn, short side under
``REDUCE_ABOVE``, even border: the training layout and every scan keep their exact pixels).

Shipped verbatim inside edge bundles with image.py: numpy, Pillow, service.errors and processing.base only.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.processing.base import setting

# Pillow's format names of what users send: phone and camera JPEGs (MPO: a JPEG whose MPF marker lists extra
# images, e.g. a depth map, as some phones write), screenshots, web images, scans. A file of several frames
# (animated GIF/WebP, multi-page TIFF) is answered on its first frame, as an <img> shows it before it plays.
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTS = "a PNG, JPEG, WebP, GIF, BMP or TIFF image (any size or colour mode; the first frame of an animation)"
# The file names a folder of images is read by (`modelserve predict`), for the same formats.
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# HEIF/AVIF (iPhone photos by default) hold an ISO-BMFF "ftyp" box; Pillow cannot decode them without a plugin,
# so they are named in the refusal rather than called "not an image".
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")

# A photo's short side is brought down to at least TARGET pixels (by a whole factor) once it exceeds
# REDUCE_ABOVE: the digit ends up 20x20, and a 12 MP photo laid out at full size costs seconds.
TARGET, REDUCE_ABOVE = 512, 1024
# A border whose levels spread more than this (10th to 90th percentile, gray in [0, 1]) is uneven paper.
UNEVEN = 0.2
# Only a photo is evened: under PHOTO_SIDE pixels on the short side an image is a crop, a scan or a rendering,
# where a digit filling the frame (no paper margin) would look like uneven paper; those keep their pixels.
PHOTO_SIDE = 200
_COARSE = 16  # the paper's level is estimated on a copy with this short side ...
_WINDOW = 7  # ... with a window wider than a stroke there: only what is wider than 7/16 of the image is paper


def header(data: bytes, *, index: int) -> Image.Image:
    """The image with only its header read (Pillow decodes lazily): format and size, no pixels yet."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
            raise UnsupportedMediaType(f"item {index}: HEIF/AVIF images are not accepted (a phone's HEIC photo: "
                                       f"share or export it as JPEG); expected {ACCEPTS}") from None
        raise UnsupportedMediaType(f"item {index}: not an image; expected {ACCEPTS}") from None
    except Image.DecompressionBombError:
        # Pillow refuses past 2x its own MAX_IMAGE_PIXELS before we can look at the size.
        raise PayloadTooLarge(f"item {index}: the image declares more pixels than Pillow will decode; "
                              f"expected {ACCEPTS}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # NOTE: some plugins read past the header while opening (WebP builds its decoder, TIFF reads its IFD):
        # a truncated file fails here, not in load().
        raise InvalidInput(f"item {index}: the image data is truncated or corrupt ({exc}); expected {ACCEPTS}") from None
    if img.format not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(f"item {index}: {img.format} images are not accepted; expected {ACCEPTS}")
    return img


def check_pixels(img: Image.Image, *, index: int, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise PayloadTooLarge(f"item {index}: image of {img.width}x{img.height} pixels exceeds the limit of "
                              f"{max_pixels} pixels per image ({setting('max_image_pixels')})")


def open_image(data: bytes, *, index: int, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded image, upright and bounded in size (photo.py), and the file's (width, height) upright."""
    img = header(data, index=index)
    check_pixels(img, index=index, max_pixels=max_pixels)
    size = img.size
    try:
        draft_large_jpeg(img)
        img.load()
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn by 90 degrees
            size = (size[1], size[0])
        img = upright_and_bounded(img)
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"item {index}: the image declares more pixels than Pillow will decode; "
                              f"expected {ACCEPTS}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for truncated/corrupt data
        raise InvalidInput(f"item {index}: the {img.format} data is truncated or corrupt ({exc}); "
                           f"expected {ACCEPTS}") from None
    return img, size


def draft_large_jpeg(img: Image.Image) -> None:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling: cheaper, and less memory)."""
    short = min(img.size)
    if img.format in ("JPEG", "MPO") and short > REDUCE_ABOVE:
        scale = short / TARGET
        img.draft(None, (int(img.width / scale) + 1, int(img.height / scale) + 1))


def upright_and_bounded(img: Image.Image) -> Image.Image:
    """The decoded image turned as its EXIF orientation says, and reduced (box filter) when large."""
    img = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img
    factor = min(img.size) // TARGET
    if min(img.size) <= REDUCE_ABOVE or factor < 2:
        return img
    if img.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):  # palette, 1-bit, 16-bit, CMYK: average as RGB(A)/I
        has_alpha = "transparency" in img.info or img.mode in ("PA",)
        img = img.convert("I" if img.mode.startswith("I;16") else ("RGBA" if has_alpha else "RGB"))
    return img.reduce(factor)


def uneven_border(border: np.ndarray) -> np.ndarray:
    """Which rows of [N, B] border levels in [0, 1] are uneven paper (shadow, light falling off)."""
    low, high = np.quantile(border, [0.1, 0.9], axis=1)
    return np.asarray(high - low > UNEVEN)


def even_paper(gray: np.ndarray, *, light_paper: bool) -> np.ndarray | None:
    """[H, W] gray in [0, 1] with the paper's slow changes removed, or None where the paper is even.

    The paper's level is estimated on a coarse copy: a max then min filter (light paper; min then max on dark)
    wider than any stroke fills the ink in and keeps only what is wider than 7/16 of the short side, i.e. a
    shadow or the light falling off, never a digit touching the border. That level is subtracted and its
    median added back.
    """
    height, width = gray.shape
    if min(height, width) < PHOTO_SIDE:
        return None
    scale = _COARSE / min(height, width)
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(gray.astype(np.float32), mode="F").resize(small_size, Image.Resampling.BOX))
    first, second = (np.max, np.min) if light_paper else (np.min, np.max)
    paper = _rank(_rank(small, first, _WINDOW), second, _WINDOW)
    if float(paper.max() - paper.min()) <= UNEVEN:
        return None
    paper = _rank(paper, np.mean, 3)  # smooth the steps the rank filters leave
    full = np.asarray(Image.fromarray(paper.astype(np.float32), mode="F").resize((width, height),
                                                                                  Image.Resampling.BILINEAR))
    return np.clip(gray - full + np.median(paper), 0.0, 1.0).astype(np.float32)


def _rank(image: np.ndarray, reduce: object, window: int) -> np.ndarray:
    """`reduce` (np.max / np.min / np.mean) over a window x window square, edges repeated."""
    padded = np.pad(image, window // 2, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (window, window))
    return np.asarray(reduce(windows, axis=(2, 3)))  # type: ignore[operator]


# The thinnest digit of the training layout covers 68 of the 20x20 box's pixels above half intensity (measured
# over scikit-learn's 1,797 digits); a thinner stroke (a fine pen, a large photo) is widened until it covers
# that much, at most three times by one pixel, so the model sees strokes of the width it was trained on.
THIN_BELOW, _WIDEN = 68, 3


def widen_thin(digits: np.ndarray) -> np.ndarray:
    """[N, 20, 20] digits in [0, 1], the thin ones dilated (3x3 max) until they cover THIN_BELOW pixels."""
    for _ in range(_WIDEN):
        thin = np.count_nonzero(digits > 0.5, axis=(1, 2)) < THIN_BELOW
        if not thin.any():
            break
        digits = digits.copy()
        digits[thin] = _max3(digits[thin])
    return digits


def _max3(images: np.ndarray) -> np.ndarray:
    """3x3 max of [N, H, W] images in [0, 1] with a zero border (as a zero-padded sliding window's max).

    NOTE: as a row max then a column max of shifted slices: a maximum is exact, so this is the 3x3 window's max
    bit for bit, at a fraction of the cost of reducing a sliding_window_view over its two small axes.
    """
    n, height, width = images.shape
    padded = np.zeros((n, height + 2, width + 2), images.dtype)
    padded[:, 1:-1, 1:-1] = images
    rows = np.maximum(np.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    return np.maximum(np.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])

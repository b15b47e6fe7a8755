"""Realistic "photos of a digit" made from held-out scikit-learn digits, one condition at a time.

Each 8x8 digit is upscaled (bicubic) into a smooth ink map and cut at a level (a low cut gives a thick stroke,
a high cut a thin one), then put on paper of some size, tone and pattern, with shadow, tilt, blur, noise, and
saved in some format/mode (JPEG quality, EXIF orientation, RGBA, LA, P, 16-bit, CMYK JPEG, WebP/GIF/BMP/TIFF, ink
on a transparent canvas). Used by tests/test_answers_round4.py, tests/test_answers_round6.py and by
`python -m loadtests.answer_audit` (accuracy per condition).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Photo:
    """How one photo is made; every condition is a change of some fields of the default."""

    side: int = 400  # canvas width
    aspect: float = 4 / 3  # height / width: 4/3 a portrait phone photo, 3/4 a landscape one
    digit_frac: float = 0.5  # digit height / canvas height
    offset: tuple[float, float] = (0.0, 0.0)  # digit centre offset, as a fraction of the canvas (x, y)
    cut: float = 0.45  # ink where the smooth map exceeds this: 0.25 thick, 0.65 thin
    paper: int = 225  # paper level (0-255)
    ink: int = 40  # ink level
    gradient: float = 0.0  # paper level change across the page (left to right)
    shadow: float = 0.0  # a soft shadow over the lower right part, darkening by this many levels
    lines: bool = False  # ruled paper: blue lines every 1/8 of the digit height
    rotate: float = 0.0
    blur: float = 0.6
    noise: float = 4.0
    fmt: str = "JPEG"
    quality: int = 90
    mode: str = "RGB"  # RGB, L, RGBA, LA, P, I;16, CMYK; "ink on transparent" / "P on transparent": no paper
    exif_orientation: int = 0  # 0: no tag; 3, 6 or 8: stored turned, the tag says how to turn it back
    tint: tuple[float, float, float] = (1.0, 0.97, 0.9)  # paper colour (RGB multipliers)


def _ink_mask(image8: np.ndarray, *, height: int, cut: float) -> np.ndarray:
    """[height, height] soft-edged ink coverage in [0, 1] of the 8x8 digit (values 0..16)."""
    small = Image.fromarray((image8 / 16.0).astype(np.float32), mode="F")
    smooth = np.asarray(small.resize((height, height), Image.Resampling.BICUBIC), np.float32)
    edge = 0.08  # a soft stroke edge (anti-aliasing), as a pen on paper photographed
    return np.clip((smooth - cut) / edge + 0.5, 0.0, 1.0)


def render(image8: np.ndarray, photo: Photo, *, seed: int) -> bytes:
    """The encoded file of one digit under `photo`'s conditions."""
    rng = np.random.default_rng(seed)
    width, height = photo.side, round(photo.side * photo.aspect)
    digit = max(8, int(height * photo.digit_frac))
    page = np.full((height, width), float(photo.paper), np.float32)
    page += np.linspace(-photo.gradient / 2, photo.gradient / 2, width, dtype=np.float32)[None, :]
    if photo.lines:
        step = max(3, digit // 8)
        page[::step] -= 60
    mask = np.zeros((height, width), np.float32)
    cx = int(width / 2 + photo.offset[0] * width) - digit // 2
    cy = int(height / 2 + photo.offset[1] * height) - digit // 2
    ink = _ink_mask(image8, height=digit, cut=photo.cut)
    y0, x0 = max(cy, 0), max(cx, 0)
    y1, x1 = min(cy + digit, height), min(cx + digit, width)
    mask[y0:y1, x0:x1] = ink[y0 - cy:y1 - cy, x0 - cx:x1 - cx]
    gray = page * (1 - mask) + photo.ink * mask
    if photo.shadow:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        gray -= photo.shadow / (1 + np.exp(-((xx / width + yy / height) - 1.1) * 12))
    img = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
    if photo.rotate:
        img = img.rotate(photo.rotate, resample=Image.Resampling.BICUBIC, fillcolor=int(photo.paper))
    if photo.blur:
        img = img.filter(ImageFilter.GaussianBlur(photo.blur * photo.side / 400))
    gray = np.asarray(img, np.float32) + rng.normal(0, photo.noise, (height, width))
    return _encode(np.clip(gray, 0, 255), photo)


def _encode(gray: np.ndarray, photo: Photo) -> bytes:
    rgb = np.clip(gray[..., None] * np.array(photo.tint, np.float32), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if photo.mode == "L":
        img = img.convert("L")
    elif photo.mode == "RGBA":
        img = img.convert("RGBA")
    elif photo.mode == "LA":
        img = img.convert("LA")
    elif photo.mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif photo.mode == "I;16":
        img = Image.fromarray((gray * 257).astype(np.uint16))
    elif photo.mode == "CMYK":
        img = img.convert("CMYK")
    elif photo.mode in ("ink on transparent", "P on transparent"):
        img = _on_transparent(gray, photo)
    kwargs: dict = {"quality": photo.quality} if photo.fmt == "JPEG" else {}
    if photo.mode == "P on transparent":
        kwargs["transparency"] = 0
    if photo.exif_orientation:
        # The camera stores the sensor's rows and a tag saying how to turn them upright.
        turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                8: Image.Transpose.ROTATE_270}[photo.exif_orientation]
        img = img.transpose(turn)
        exif = Image.Exif()
        exif[0x0112] = photo.exif_orientation
        kwargs["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, photo.fmt, **kwargs)
    return buf.getvalue()


def _on_transparent(gray: np.ndarray, photo: Photo) -> Image.Image:
    """The ink alone, in the ink's colour, on a transparent canvas (a digit drawn in an app and exported as PNG):
    alpha is how far each pixel is from the paper towards the ink; the canvas under alpha 0 is black."""
    alpha = np.clip((photo.paper - gray) / (photo.paper - photo.ink or 1), 0, 1)
    rgba = np.zeros((*gray.shape, 4), np.uint8)
    rgba[..., :3] = photo.ink
    rgba[..., 3] = np.round(alpha * 255).astype(np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    if photo.mode == "P on transparent":  # a palette with entry 0 transparent (as GIF-style editors save)
        levels = np.round(alpha * 15).astype(np.uint8)
        img = Image.fromarray(levels, "P")
        img.putpalette([v for k in range(16) for v in (255 - 17 * k,) * 3])
    return img


BASE = Photo()
CONDITIONS: dict[str, Photo] = {
    "paper 400px (default)": BASE,
    "small 300px": replace(BASE, side=300),
    "large 2000px": replace(BASE, side=2000),
    "grey background": replace(BASE, paper=150, ink=30, tint=(1.0, 1.0, 1.0)),
    "gradient background": replace(BASE, gradient=90),
    "light ink on dark": replace(BASE, paper=35, ink=220),
    "shadow": replace(BASE, shadow=110),
    "rotated 10 deg": replace(BASE, rotate=10),
    "rotated -15 deg": replace(BASE, rotate=-15),
    "rotated 20 deg": replace(BASE, rotate=20),
    "rotated -25 deg": replace(BASE, rotate=-25),
    "rotated -15 deg, thin strokes": replace(BASE, rotate=-15, cut=0.7),
    "blurred": replace(BASE, blur=3.0),
    "JPEG q50": replace(BASE, quality=50, noise=8),
    "JPEG q95 PNG-like": replace(BASE, quality=95, noise=2),
    "EXIF orientation 6": replace(BASE, exif_orientation=6),
    "EXIF orientation 8": replace(BASE, exif_orientation=8),
    "PNG RGBA": replace(BASE, fmt="PNG", mode="RGBA"),
    "PNG LA": replace(BASE, fmt="PNG", mode="LA"),
    "PNG P (palette)": replace(BASE, fmt="PNG", mode="P"),
    "PNG 16-bit": replace(BASE, fmt="PNG", mode="I;16"),
    "CMYK JPEG": replace(BASE, mode="CMYK"),
    "small digit, wide margins": replace(BASE, digit_frac=0.18),
    "off-centre": replace(BASE, offset=(0.28, -0.25), digit_frac=0.35),
    "thick strokes": replace(BASE, cut=0.2),
    "thin strokes": replace(BASE, cut=0.7),
    "lined paper": replace(BASE, lines=True, tint=(1.0, 1.0, 1.0)),
    # Round 6: what users send besides phone JPEGs.
    "EXIF orientation 3 (upside down)": replace(BASE, exif_orientation=3),
    "WebP": replace(BASE, fmt="WEBP"),
    "GIF": replace(BASE, fmt="GIF", noise=2),
    "BMP": replace(BASE, fmt="BMP"),
    "TIFF": replace(BASE, fmt="TIFF"),
    "PNG black ink on transparent": replace(BASE, fmt="PNG", mode="ink on transparent", ink=0, noise=0),
    "PNG grey ink on transparent": replace(BASE, fmt="PNG", mode="ink on transparent", ink=90, noise=0),
    "PNG palette, transparent background": replace(BASE, fmt="PNG", mode="P on transparent", noise=0),
    "4000x3000 landscape photo": replace(BASE, side=4000, aspect=3 / 4, digit_frac=0.4),
}


def photos(images8: np.ndarray, photo: Photo, *, seed: int = 0) -> list[bytes]:
    """One file per digit, each with its own noise."""
    return [render(im, photo, seed=seed + i) for i, im in enumerate(images8)]


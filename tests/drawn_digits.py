"""Real-looking digit photos drawn in the test: a TrueType digit on noisy, tinted paper, rotated, JPEG or PNG.

The font is matplotlib's bundled DejaVu Sans (matplotlib is in the train extra, which the tests install), so
nothing is downloaded. Each photo differs in size, stroke weight, tilt, paper tone, noise and format.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSans-BoldOblique.ttf")
SIZES = ((200, 240), (160, 160), (320, 240), (120, 180), (240, 300))


def draw_digit(digit: int, *, seed: int) -> tuple[bytes, str]:
    """(encoded bytes, "JPEG" or "PNG") of a dark ``digit`` on light paper, parameters varied by ``seed``."""
    rng = np.random.default_rng(seed)
    width, height = SIZES[seed % len(SIZES)]
    paper = int(rng.integers(200, 245))
    page = Image.new("L", (width, height), paper)
    font = ImageFont.truetype(str(FONT_DIR / FONTS[seed % len(FONTS)]), size=int(min(width, height) * 0.55))
    draw = ImageDraw.Draw(page)
    box = draw.textbbox((0, 0), str(digit), font=font)
    x = (width - (box[2] - box[0])) / 2 - box[0] + rng.integers(-width // 10, width // 10)
    y = (height - (box[3] - box[1])) / 2 - box[1] + rng.integers(-height // 10, height // 10)
    draw.text((x, y), str(digit), fill=int(rng.integers(10, 60)), font=font,
              stroke_width=int(rng.integers(1, 4)), stroke_fill=int(rng.integers(10, 60)))
    page = page.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, fillcolor=paper)
    grain = rng.normal(0, 6, (height, width)) + np.linspace(-10, 10, width)[None, :]  # noise + uneven light
    photo = Image.fromarray(np.clip(np.asarray(page, np.float64) + grain, 0, 255).astype(np.uint8))
    photo = photo.filter(ImageFilter.GaussianBlur(0.8)).convert("RGB")
    fmt = "JPEG" if seed % 2 == 0 else "PNG"
    buffer = io.BytesIO()
    photo.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue(), fmt


def drawn_digits(count: int = 10, *, seed: int = 0) -> list[tuple[int, bytes, str]]:
    """(label, bytes, format) for digits 0..9 in turn."""
    return [(i % 10, *draw_digit(i % 10, seed=seed + i)) for i in range(count)]

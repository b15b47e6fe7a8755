"""The cnn layout after round 4 (service/processing/image_layout.py) gives the bits of the plain formulation it
replaced (tests/image_layout_reference.py): float images, 8-bit levels, files through the processor; and rows
the layout cannot take (NaN, infinity) fail alone with a 4xx-kind error."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInput, UnsupportedMediaType
from service.offline.cli import main
from service.processing import image_layout
from service.processing import png_levels as fast_png
from service.processing.image import ImageProcessor
from tests import image_layout_reference as reference
from tests.task_media import digit_file, held_out_digits


def _resized(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im, mode="F").resize(size, Image.Resampling.BILINEAR))
                     for im in images]).astype(np.float32)


def float_batches() -> dict[str, np.ndarray]:
    """~700 float images in batches of one size each: held-out digits as trained, inverted, on grey paper, noisy,
    larger and non-square, noise, blank and flat pages, values outside [0, 1], exact 8-bit levels, ties."""
    rng = np.random.default_rng(11)
    _, _, laid = held_out_digits(300)
    digits = laid[:, 0].astype(np.float32)
    paper = np.clip(0.35 + 0.5 * digits, 0, 1).astype(np.float32)
    noisy = np.clip(digits[:96] + rng.normal(0, 0.08, (96, 28, 28)), 0, 1).astype(np.float32)
    flat = np.full((6, 28, 28), 0.5, np.float32)
    flat[1:] = rng.choice([0.25, 0.75], (5, 28, 28)).astype(np.float32)  # two levels: ties at the quantile
    return {"digits": digits, "inverted": (1 - digits).astype(np.float32), "paper": paper, "noisy": noisy,
            "larger": _resized(1 - digits[:40], (64, 64)), "wide": _resized(paper[40:72], (90, 50)),
            "noise": rng.random((64, 28, 28), dtype=np.float32), "noise big": rng.random((6, 120, 90), np.float32),
            "levels": (rng.integers(0, 256, (32, 28, 28)) / np.float32(255)).astype(np.float32),
            "flat": flat, "blank": np.zeros((3, 28, 28), np.float32),
            "outside": (rng.random((8, 28, 28)) * 3 - 1).astype(np.float32), "tiny": rng.random((4, 2, 3), np.float32)}


@pytest.mark.parametrize("name", list(float_batches()))
def test_float_layout_gives_the_reference_bits(name):
    gray = float_batches()[name]
    want, want_inverted = reference.layout_batch(gray)
    for size in (32, 7, 1):  # batches of several sizes, so one image's bits never depend on its batch-mates
        got = [image_layout.layout_batch(gray[s:s + size]) for s in range(0, len(gray), size)]
        assert np.array_equal(np.concatenate([p for p, _ in got]), want), (name, size)
        assert np.array_equal(np.concatenate([i for _, i in got]), want_inverted), (name, size)


def level_batches() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    images8, _, laid = held_out_digits(200)
    photo = np.stack([np.asarray(Image.open(io.BytesIO(digit_file(im, side=64, dark_on_light=i % 2 == 0))).convert("L"))
                      for i, im in enumerate(images8[:64])])
    eight = np.round(laid[:, 0] * 255).astype(np.uint8)
    return {"digits": eight, "inverted": 255 - eight, "photos": photo, "noise": rng.integers(0, 256, (32, 48, 40),
            dtype=np.uint8), "two levels": rng.choice(np.array([127, 129], np.uint8), (8, 32, 32)),
            "flat": np.full((2, 28, 28), 200, np.uint8)}


@pytest.mark.parametrize("name", list(level_batches()))
def test_levels_layout_gives_the_reference_bits(name):
    levels = level_batches()[name]
    want, want_inverted = reference.layout_batch(image_layout.LEVELS[levels])
    got, inverted = image_layout.layout_levels(levels)
    assert np.array_equal(got, want) and np.array_equal(inverted, want_inverted), name


def test_polarity_past_the_exact_level_sum_goes_pixel_by_pixel():
    rng = np.random.default_rng(2)
    page = rng.integers(180, 256, (1, 1030, 1020), dtype=np.uint8)  # > 2^20 pixels: summed pixel by pixel
    page[0, 300:700, 400:520] = rng.integers(0, 60, (400, 120))
    want, want_inverted = reference.layout_batch(image_layout.LEVELS[page])
    got, inverted = image_layout.layout_levels(page)
    assert np.array_equal(got, want) and inverted.tolist() == want_inverted.tolist() == [True]


def test_otsu_bins_are_np_histograms():
    rng = np.random.default_rng(9)
    edges = np.arange(257, dtype=np.float32) / 256
    values = np.concatenate([rng.random(5000, dtype=np.float32), edges, np.nextafter(edges, np.float32(0)),
                             np.nextafter(edges, np.float32(1)), np.float32([0, 1, 1e-30])]).clip(0, 1)
    want = np.histogram(values, bins=256, range=(0.0, 1.0))[0]
    assert np.array_equal(np.bincount(image_layout._bins(values), minlength=256), want)
    assert np.array_equal(image_layout._bins(values), reference._bins(values))


def _encode(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def image_files() -> list[bytes]:
    """Digits as photos in every mode the processor takes, sizes from 20 to 155 pixels, PNG and JPEG."""
    images8, _, _ = held_out_digits(60)
    rng = np.random.default_rng(8)
    files = []
    for side in (28, 64, 200):  # photo-like: a digit on textured, tinted RGB paper with noise
        page = np.full((side, side, 3), (200, 190, 170), np.int16) + rng.integers(-25, 25, (side, side, 3))
        page[side // 4:3 * side // 4, side // 2 - side // 12:side // 2 + side // 12] = (40, 40, 60)
        files.append(_encode(np.clip(page, 0, 255).astype(np.uint8)))
    for i, im in enumerate(images8):
        mode = ("L", "RGB", "P", "RGBA", "LA", "1", "I;16")[i % 7]
        fmt = "JPEG" if i % 9 == 4 and mode in ("L", "RGB") else "PNG"
        files.append(digit_file(im, fmt=fmt, side=20 + 9 * (i % 16), dark_on_light=i % 3 != 0, mode=mode))
    return files


def test_processor_files_give_pillows_reference_bits_in_order():
    files = image_files()
    files.insert(17, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a broken PNG among them fails alone
    processor = ImageProcessor(input_name="image", output_name="probs", labels=None)
    got = processor.prepare_batch(files, indices=list(range(len(files))))
    assert isinstance(got[17], UnsupportedMediaType) and str(got[17]).startswith("item 17: not an image")
    for index, (data, prepared) in enumerate(zip(files, got)):
        if index == 17:
            continue
        pixels, inverted = reference.prepare_file(data)
        assert not isinstance(prepared, Exception), (index, prepared)
        assert np.array_equal(prepared.pixels, pixels) and prepared.inverted == inverted, index
        assert prepared.original_size == Image.open(io.BytesIO(data)).size


def test_non_finite_rows_are_refused_alone(tiny_zoo, tmp_path):
    rng = np.random.default_rng(4)
    images = rng.random((9, 28, 28), dtype=np.float32)
    images[3, 5, 5], images[7, 0, 0] = np.nan, np.inf
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "o.jsonl"
    assert main(["--model", "cnn", "--input", str(tmp_path / "x.npy"), "--model-repository", str(tiny_zoo),
                 "--output", str(out), "--batch-size", "4"]) == 0  # a job with some good rows succeeds
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(9))
    assert [r["ok"] for r in rows] == [i not in (3, 7) for i in range(9)]
    assert "item 3: the image holds NaN or infinite values" in rows[3]["error"]
    processor = ImageProcessor(input_name="image", output_name="probs", labels=None)
    got = processor.prepare_batch(list(images[2:5]), indices=[2, 3, 4])
    assert isinstance(got[1], InvalidInput) and "expected finite pixel values" in str(got[1])
    assert not isinstance(got[0], Exception) and not isinstance(got[2], Exception)


def _png_with(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", **save)
    return buf.getvalue()


@pytest.mark.skipif(fast_png.pyspng is None, reason="the `png` extra (pyspng) is not installed")
def test_plain_pngs_decode_without_pillow_to_pillows_levels():
    rng = np.random.default_rng(6)
    plain = [_png_with(rng.integers(0, 256, (h, w, *c), dtype=np.uint8), optimize=bool(i % 2))
             for i, (h, w, c) in enumerate([(1, 1, ()), (28, 28, ()), (33, 61, (3,)), (200, 150, (3,)), (7, 300, ())])]
    plain.append(_png_with(rng.integers(0, 256, (40, 40), dtype=np.uint8), dpi=(300, 300)))  # a pHYs chunk
    for data in plain:
        got = fast_png.png_levels(data, max_pixels=10**6)
        img = Image.open(io.BytesIO(data))
        assert got is not None, img.mode
        assert np.array_equal(got[0], np.asarray(img.convert("L"))) and got[1] == img.size


def test_other_pngs_are_left_to_pillow():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    others = {"palette": digit_file(gray[:8, :8] // 16, mode="P"),
              "transparency": _png_with(gray, transparency=7), "16-bit": digit_file(gray[:8, :8] // 16, mode="I;16"),
              "alpha": digit_file(gray[:8, :8] // 16, mode="LA"), "jpeg": digit_file(gray[:8, :8] // 16, fmt="JPEG")}
    for name, data in others.items():
        assert fast_png.png_levels(data, max_pixels=10**6) is None, name
    plain = _png_with(gray)
    assert fast_png.png_levels(plain, max_pixels=599) is None  # over the caller's limit: Pillow says so
    processor = ImageProcessor(input_name="image", output_name="probs", labels=None)
    data_at = plain.index(b"IDAT") + 4
    for broken in (plain[:data_at + 30],  # truncated
                   plain[:data_at + 30] + bytes([plain[data_at + 30] ^ 0xFF]) + plain[data_at + 31:]):  # bad CRC
        assert fast_png.png_levels(broken, max_pixels=10**6) is None
        with pytest.raises(InvalidInput, match="item 4: the PNG data is truncated or corrupt"):
            processor.prepare(broken, index=4)  # Pillow's own verdict, as before
    bad_crc_only = plain[:-16] + b"\x00\x00\x00\x00" + plain[-12:]  # the data's CRC, not the data: Pillow decodes
    assert fast_png.png_levels(bad_crc_only, max_pixels=10**6) is None
    assert np.array_equal(processor.prepare(bad_crc_only, index=0).pixels, processor.prepare(plain, index=0).pixels)

"""The cheaper PNG and WAV preparation gives today's results bit for bit: the 8-bit image path against the
float path (`layout_batch(to_gray(img))`), WAV batches against `prepare` clip by clip, and a whole
`modelserve predict` job (process pool for images, WAVs inline) against rows prepared one by one."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from service.offline.cli import main
from service.offline.engine import LocalEngine, _run_batch
from service.offline.readers import open_input
from service.processing.image import (
    LEVELS,
    ImageProcessor,
    clean_ink,
    clean_ink_levels,
    gray_levels,
    layout_batch,
    quantile_of_levels,
    to_gray,
)
from service.processing.speech import SpeechProcessor
from tests.task_media import digit_file, held_out_digits, keyword_audio, wav_bytes


def _png(arr: np.ndarray, *, fmt: str = "PNG", mode: str | None = None) -> bytes:
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    (img.convert(mode) if mode else img).save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def image_cases() -> list[bytes]:
    """Digits both ways round at several sizes, RGB, palette, JPEG, noise, blank and flat pages, a speck, a stroke,
    the smallest image answered (8x8); and images whose gray levels sit symmetrically around the paper (ties in the quantile)."""
    rng = np.random.default_rng(7)
    images8, _, _ = held_out_digits(24)
    files = [digit_file(im, side=20 + 9 * i, dark_on_light=i % 3 == 0) for i, im in enumerate(images8[:12])]
    files += [digit_file(im, fmt="JPEG", side=48, mode=("L", "RGB")[i % 2]) for i, im in enumerate(images8[12:16])]
    files += [digit_file(im, side=40, mode=m) for im, m in zip(images8[16:19], ("RGB", "P", "1"))]
    files.append(digit_file(images8[19], fmt="JPEG", side=40, mode="CMYK"))
    for h, w in [(28, 28), (33, 61), (8, 8), (8, 11)]:  # 8 px: the smallest image answered
        noise = rng.integers(0, 256, (h, w), dtype=np.uint8)
        files += [_png(noise), _png(np.stack([noise, 255 - noise, noise // 2], axis=-1))]
    flat, speck, stroke = (np.full((40, 40), v, np.uint8) for v in (0, 128, 0))
    speck[20, 30] = 255
    stroke[5:35, 12] = 255
    symmetric = np.where(rng.random((32, 32)) < 0.5, 127, 129).astype(np.uint8)
    symmetric[0] = 128
    files += [_png(a) for a in (flat, speck, stroke, symmetric, 255 - stroke)]
    return files


def test_levels_path_gives_the_float_paths_bits():
    files = image_cases()
    processor = ImageProcessor(input_name="image", output_name="probs", labels=None)
    got = processor.prepare_batch(files, indices=list(range(len(files))))
    levels_rows = 0
    for index, (data, prepared) in enumerate(zip(files, got)):
        img = Image.open(io.BytesIO(data))
        levels_rows += gray_levels(img) is not None
        pixels, inverted = layout_batch(to_gray(img)[None])  # today's float path, image by image
        assert not isinstance(prepared, Exception)
        assert np.array_equal(prepared.pixels, pixels[0]), f"image {index} ({img.mode} {img.size})"
        assert (prepared.inverted, prepared.original_size) == (bool(inverted[0]), img.size)
        one = processor.prepare(data, index=index)
        assert np.array_equal(one.pixels, pixels[0]) and one.inverted == bool(inverted[0])
    assert levels_rows == len(files)  # every case above went through the 8-bit path
    assert any(p.inverted for p in got) and not all(p.inverted for p in got)  # type: ignore[union-attr]


def test_clean_ink_levels_equals_clean_ink_on_batches():
    rng = np.random.default_rng(3)
    for shape in [(16, 28, 28), (5, 64, 64), (3, 7, 90)]:
        levels = rng.integers(0, 256, shape, dtype=np.uint8)
        levels[0] = np.where(levels[0] > 200, 255, 0)  # a high-contrast page
        levels[1] = levels[1] // 64 + 100  # four levels: many ties
        ink, inverted = clean_ink_levels(levels)
        want_ink, want_inverted = clean_ink(LEVELS[levels])
        assert ink.dtype == want_ink.dtype and np.array_equal(ink, want_ink)
        assert np.array_equal(inverted, want_inverted)


@pytest.mark.parametrize("q", [0.95, 0.5, 0.0, 0.999])
def test_quantile_of_levels_is_numpys_quantile(q):
    rng = np.random.default_rng(int(q * 1000))
    for pixels in (1, 2, 17, 784, 4096):
        levels = rng.integers(0, 256, (6, pixels))
        levels[0] = levels[0] % 3  # few distinct values
        values = np.abs(LEVELS - LEVELS[rng.integers(0, 256, 6)][:, None])  # symmetric values: ties
        counts = np.stack([np.bincount(row, minlength=256) for row in levels])
        want = np.quantile(np.take_along_axis(values, levels, axis=1), q, axis=1)
        got = quantile_of_levels(values, counts, q)
        assert got.dtype == want.dtype and np.array_equal(got, want), (pixels, q)


def _wav(frames: int, *, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16", endian: str = "FILE") -> bytes:
    wave = np.random.default_rng(frames).uniform(-1, 1, (frames, channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, subtype=subtype, format="WAV", endian=endian)
    return buf.getvalue()


def test_wav_batch_gives_prepares_waveforms_and_errors():
    clips = [_wav(16000), _wav(15999), _wav(1), _wav(20000), _wav(8000, rate=22050), _wav(8000, channels=2),
             _wav(8000, subtype="PCM_24"), _wav(9000, subtype="FLOAT"), _wav(700, endian="BIG"),
             wav_bytes(keyword_audio("yes")), b"not a wav", _wav(8000)[:3000], np.zeros(5000, np.float32)]
    processor = SpeechProcessor(input_name="waveform", output_name="probs", labels=None)
    got = processor.prepare_batch(clips, indices=list(range(len(clips))))
    for index, (clip, prepared) in enumerate(zip(clips, got)):
        try:
            want = processor.prepare(clip, index=index)
        except Exception as exc:
            assert isinstance(prepared, Exception) and str(prepared) == str(exc)
            continue
        assert not isinstance(prepared, Exception)
        assert prepared.waveform.dtype == np.float32 and np.array_equal(prepared.waveform, want.waveform)
        assert (prepared.sample_rate, prepared.channels, prepared.seconds) == \
            (want.sample_rate, want.channels, want.seconds)
    assert sum(isinstance(p, Exception) for p in got) == 2
    stacked = processor.collate([p for p in got if not isinstance(p, Exception)])["waveform"]
    assert stacked.dtype == np.float32 and stacked.shape == (11, 16000)


@pytest.fixture()
def media(tmp_path):
    images8, _, _ = held_out_digits(40)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, im in enumerate(images8):
        (pngs / f"d{i:03d}.png").write_bytes(digit_file(im, side=28 + i % 4 * 12, dark_on_light=i % 5 == 0,
                                                        mode=("L", "RGB")[i % 7 == 3]))
    (pngs / "d017-broken.png").write_bytes(b"\x89PNG truncated")
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for i in range(37):
        word = ("yes", "stop", "left", "go")[i % 4]
        (wavs / f"w{i:03d}.wav").write_bytes(wav_bytes(keyword_audio(word)[:12000 + 97 * i],
                                                       rate=(16000, 16000, 22050)[i % 3]))
    (wavs / "w011-truncated.wav").write_bytes(wav_bytes(keyword_audio("go"))[:3000])
    return {"cnn": pngs, "speech": wavs}


@pytest.mark.parametrize("model", ["cnn", "speech"])
def test_predict_job_gives_the_per_row_results_in_order(tiny_zoo, media, tmp_path, model):
    folder, batch = media[model], 8
    out = tmp_path / "out.parquet"
    assert main(["--model", model, "--input", str(folder), "--output", str(out), "--model-repository",
                 str(tiny_zoo), "--batch-size", str(batch), "--part-rows", "20", "--workers", "2"]) == 0
    got = pq.read_table(out).to_pylist()
    engine = LocalEngine(tiny_zoo / model, batch_size=batch, params={"k": 3}, workers=2, decode_files=True)
    try:
        # Worker processes decode images; WAVs are read inline (nothing to pickle back).
        assert (engine.decoder is not None, engine.inline_files) == ((True, False) if model == "cnn" else (False, True))
        items = list(open_input(folder, task=engine.task).items)
        want = []
        for part in range(0, len(items), 20):  # predict's parts and batches, every row prepared on its own
            rows = items[part:part + 20]
            for s in range(0, len(rows), batch):
                chunk = rows[s:s + batch]
                prepared, good = [], []
                for item in chunk:
                    try:
                        prepared.append(engine.model.processor.prepare(item.payload, index=item.row))
                        good.append(item)
                    except Exception as exc:
                        want.append({"row": item.row, "id": item.id, "ok": False, "error": getattr(exc, "message", "")})
                want += _run_batch(engine.model, prepared, good, params={"k": 3}) if prepared else []
    finally:
        engine.close()
    want.sort(key=lambda r: r["row"])
    assert [r["row"] for r in got] == list(range(len(items))) == [r["row"] for r in want]
    assert [(r["id"], r["ok"]) for r in got] == [(r["id"], r["ok"]) for r in want]
    assert sum(not r["ok"] for r in got) == 1 and [r["error"] for r in got if not r["ok"]] == \
        [r["error"] for r in want if not r["ok"]]
    for g, w in zip(got, want):
        if w["ok"]:
            assert [p["label"] for p in g["result"]["predictions"]] == [p["label"] for p in w["result"]["predictions"]]
            np.testing.assert_allclose([p["probability"] for p in g["result"]["predictions"]],
                                       [p["probability"] for p in w["result"]["predictions"]], rtol=1e-6)
            assert json.dumps({k: v for k, v in g["result"].items() if k != "predictions"}, sort_keys=True) == \
                json.dumps({k: v for k, v in w["result"].items() if k != "predictions"}, sort_keys=True)

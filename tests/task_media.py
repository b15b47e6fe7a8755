"""Real files for the task endpoint and batch tests: digit PNG/JPEGs, keyword WAVs, texts, user ids."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from PIL import Image

from service.processing.image import ImageProcessor

TEXTS = ["Open a file and read it line by line.", "Sort a list of dictionaries by a key.",
         "Start a TCP server that echoes what it receives.", "Compress a folder into a zip archive."]
KEYWORDS = ["yes", "stop", "left"]


def held_out_digits(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(8x8 images in [0, 16], labels, the same digits laid out as the cnn was trained: [n, 1, 28, 28]).

    The cnn family's split: load_digits, stratified 20% hold-out with seed 0 (models/cnn.py `split`).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from models.cnn_data import load_digits_28

    digits = load_digits()
    index = np.arange(len(digits.target))
    _, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=0)
    pick = test[:n]
    return digits.images[pick], digits.target[pick], load_digits_28().images[pick]


def digit_file(image8: np.ndarray, *, fmt: str = "PNG", side: int = 64, dark_on_light: bool = False,
               mode: str = "L") -> bytes:
    """An 8x8 digit rendered at side x side pixels (bilinear), as PNG or JPEG bytes."""
    pixels = (image8 / 16.0 * 255).astype(np.uint8)
    if dark_on_light:
        pixels = 255 - pixels
    img = Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def keyword_audio(word: str) -> np.ndarray:
    """The word spoken by eSpeak NG (as the speech family synthesizes it), float32 16 kHz, placed in 1 s."""
    from models.speech_synth import synth_word

    audio = synth_word(word, voice="en-us+m3", rate=160, pitch=50)[:16000]
    out = np.zeros(16000, np.float32)
    start = (16000 - len(audio)) // 2
    out[start:start + len(audio)] = audio
    return out


def wav_bytes(wave16k: np.ndarray, *, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    """A WAV of the 16 kHz waveform at another rate / channel count / sample format."""
    from math import gcd

    from scipy.signal import resample_poly

    from service.processing.speech import RATE

    g = gcd(rate, RATE)
    data = wave16k if rate == RATE else resample_poly(wave16k, rate // g, RATE // g).astype(np.float32)
    if channels == 2:
        data = np.stack([data, data * 0.5], axis=1)
    buf = io.BytesIO()
    sf.write(buf, data, rate, subtype=subtype, format="WAV")
    return buf.getvalue()


def write_inputs(root: Path) -> dict[str, Path]:
    """One input of each kind for `modelserve predict`, each with one bad row."""
    images8, _, _ = held_out_digits(12)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    for i, im in enumerate(images8):
        (img_dir / f"digit-{i:02d}.png").write_bytes(digit_file(im))
    (img_dir / "zz-broken.png").write_bytes(b"this is not a png")
    wav_dir = root / "wavs"
    wav_dir.mkdir()
    for word in KEYWORDS:
        (wav_dir / f"{word}.wav").write_bytes(wav_bytes(keyword_audio(word), rate=22050, subtype="PCM_24"))
    (wav_dir / "truncated.wav").write_bytes(wav_bytes(keyword_audio("go"))[:3000])
    texts = root / "texts.jsonl"
    rows = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)] + [{"id": "empty", "text": ""}]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    users = root / "users.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "user_id": [1, 2, 987654321, None]}), users)
    return {"images": img_dir, "wavs": wav_dir, "texts": texts, "users": users}


def post_task(server: str, path: str, **kwargs) -> httpx.Response:
    """POST to a task route of the server at `server` (host:port)."""
    import httpx

    return httpx.post(f"http://{server}{path}", timeout=120, **kwargs)


def images_json(files: list[bytes]) -> dict:
    """The image task route's JSON body for these encoded image files."""
    return {"images": [base64.b64encode(f).decode() for f in files]}


def laid_pixels(files: list[bytes]) -> np.ndarray:
    """What the image preprocessing lays out for each file (the model's input rows)."""
    processor = ImageProcessor(input_name="image", output_name="probabilities", labels=None)
    return np.stack([processor.prepare(f, index=i).pixels[0] for i, f in enumerate(files)])

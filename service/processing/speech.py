"""Keyword spotting (speech family): a WAV at any rate, mono or stereo, PCM 8/16/24/32-bit or float.

Decoded with soundfile (libsndfile), downmixed to mono, resampled to 16 kHz with scipy's polyphase filter,
then cut or zero-padded to the one second the model was trained on (the loudest second of a longer clip).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from math import gcd
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.processing.base import parse_k, top_k

RATE = 16_000
MAX_SECONDS = 60.0
ACCEPTS = "a WAV file (RIFF/WAVE; mono or stereo; 8/16/24/32-bit PCM or 32/64-bit float; any sample rate)"


@dataclass
class PreparedAudio:
    waveform: np.ndarray  # [samples] float32 at 16 kHz
    sample_rate: int
    channels: int
    seconds: float


def check_riff(data: bytes, *, index: int) -> None:
    """Refuse non-WAV and truncated WAV data.

    NOTE: hand-written because libsndfile silently decodes what is there of a truncated file; comparing the
    data chunk's declared size with the bytes present is the only way to say the upload was cut short.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        raise UnsupportedMediaType(f"item {index}: not a WAV file; expected {ACCEPTS}")
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk == b"data":
            if pos + 8 + size > len(data):
                raise InvalidInput(f"item {index}: truncated WAV: the data chunk declares {size} bytes but "
                                   f"{len(data) - pos - 8} are present; expected {ACCEPTS}")
            return
        pos += 8 + size + (size & 1)
    raise InvalidInput(f"item {index}: WAV file has no data chunk; expected {ACCEPTS}")


def decode_wav(data: bytes, *, index: int) -> tuple[np.ndarray, int, int]:
    check_riff(data, index=index)
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise InvalidInput(f"item {index}: unreadable WAV ({exc}); expected {ACCEPTS}") from None
    if audio.shape[0] > MAX_SECONDS * rate:
        raise PayloadTooLarge(f"item {index}: {audio.shape[0] / rate:.1f} s of audio exceeds the limit of "
                              f"{MAX_SECONDS:.0f} s; send clips of at most {MAX_SECONDS:.0f} s")
    if audio.shape[0] == 0:
        raise InvalidInput(f"item {index}: WAV file has no samples; expected {ACCEPTS}")
    return audio, int(rate), audio.shape[1]


def to_model_rate(mono: np.ndarray, rate: int) -> np.ndarray:
    if rate == RATE:
        return mono.astype(np.float32)
    g = gcd(RATE, rate)
    return resample_poly(mono, RATE // g, rate // g).astype(np.float32)


def fit_one_second(wave: np.ndarray, *, samples: int = RATE) -> np.ndarray:
    """Zero-pad short clips; of a longer clip keep the window with the most energy (where the word is)."""
    if len(wave) <= samples:
        return np.pad(wave, (0, samples - len(wave)))
    energy = np.concatenate([[0.0], np.cumsum(wave.astype(np.float64) ** 2)])
    start = int(np.argmax(energy[samples:] - energy[:-samples]))
    return wave[start:start + samples]


class SpeechProcessor:
    task = "keyword-spotting"

    def __init__(self, *, input_name: str, output_name: str, labels: list[str] | None,
                 trained_samples: int = RATE) -> None:
        self.input_name, self.output_name, self.labels = input_name, output_name, labels
        self.samples = trained_samples

    def describe(self) -> dict:
        return {"accepts": ACCEPTS + ": multipart field 'file' (repeatable) or JSON {\"audio\": [base64, ...]}",
                "preprocessing": f"downmixed to mono, resampled to {RATE} Hz (scipy resample_poly), the loudest "
                                 f"{self.samples / RATE:g} s kept or zero-padded to it",
                "params": {"k": "number of labels returned (default 3)"}}

    def prepare(self, payload: Any, *, index: int) -> PreparedAudio:
        if isinstance(payload, np.ndarray):  # batch .npy rows: a 16 kHz waveform in [-1, 1]
            if payload.ndim != 1:
                raise InvalidInput(f"item {index}: expected a 1-D 16 kHz waveform, got shape {list(payload.shape)}")
            audio, rate, channels = np.asarray(payload, np.float32)[:, None], RATE, 1
        else:
            audio, rate, channels = decode_wav(payload, index=index)
        mono = to_model_rate(audio.mean(axis=1), rate)
        return PreparedAudio(fit_one_second(mono, samples=self.samples), rate, channels, audio.shape[0] / rate)

    def collate(self, prepared: list[PreparedAudio]) -> dict[str, np.ndarray]:
        return {self.input_name: np.stack([p.waveform for p in prepared]).astype(np.float32)}

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: list[PreparedAudio], *,
                    params: dict) -> list[dict]:
        k = parse_k(params.get("k"), default=3, limit=len(self.labels or []) or 1000)
        probs = outputs[self.output_name]
        results = []
        for i, p in enumerate(prepared):
            best = top_k(probs[i], labels=self.labels, k=k)
            results.append({"keyword": best[0]["label"], "predictions": best,
                            "audio": {"sample_rate": p.sample_rate, "channels": p.channels,
                                      "seconds": round(p.seconds, 3)}})
        return results

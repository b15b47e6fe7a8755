"""Keyword spotting on the WAV variants users have, through a real server, against the 16 kHz mono answer.

    python -m loadtests.answer_audit_speech --zoo /tmp/defzoo3 [--code-root OTHER_CHECKOUT] [--before-zoo OTHER_ZOO]

The held-out voices (models/speech_data.py TEST_VARIANTS, never trained on) say each keyword; each clip is
written as a WAV in one variant (format, rate, channels, length, DC offset, clipping) and sent to
/v1/models/speech/predict. Prints accuracy per variant; silence and very short clips print what they got.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import soxr

from loadtests.answer_audit import serve_side_by_side
from models.speech_data import TEST_VARIANTS
from models.speech_synth import synth_word

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def held_out_clips() -> list[tuple[str, np.ndarray]]:
    """(keyword, 1 s float32 16 kHz) for every keyword and held-out voice, the word centred."""
    clips = []
    for voice in TEST_VARIANTS:
        for word in KEYWORDS:
            audio = synth_word(word, voice=f"en-us+{voice}", rate=160, pitch=50)[:16000]
            clip = np.zeros(16000, np.float32)
            start = (16000 - len(audio)) // 2
            clip[start:start + len(audio)] = audio
            clips.append((word, clip))
    return clips


def wav(wave: np.ndarray, *, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    data = wave if rate == 16000 else soxr.resample(wave, 16000, rate).astype(np.float32)
    if channels == 2:
        data = np.stack([data, data * 0.8], axis=1)
    buf = io.BytesIO()
    sf.write(buf, np.clip(data, -1, 1) if subtype.startswith("PCM") else data, rate, subtype=subtype, format="WAV")
    return buf.getvalue()


def clipped_at(wave: np.ndarray, *, gain: float, rate: int = 16000, channels: int = 1,
               subtype: str = "PCM_16") -> bytes:
    """The word recorded `gain` times too loud at `rate`: clipped where it is sampled, as a microphone clips."""
    data = np.clip(soxr.resample(wave * gain, 16000, rate) if rate != 16000 else wave * gain, -1, 1)
    if channels == 2:
        data = np.stack([data, data * 0.8], axis=1)
    buf = io.BytesIO()
    sf.write(buf, data, rate, subtype=subtype, format="WAV")
    return buf.getvalue()


def streamed(data: bytes) -> bytes:
    """A WAV as a program writing to a pipe leaves it (ffmpeg -f wav -): the sizes are 0xFFFFFFFF."""
    out, at = bytearray(data), data.index(b"data")
    out[4:8] = out[at + 4:at + 8] = b"\xff\xff\xff\xff"
    return bytes(out)


def _long(wave: np.ndarray) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0, 0.003, 30 * 16000).astype(np.float32)
    noise[12 * 16000:13 * 16000] += wave
    return noise


VARIANTS: dict[str, Callable[[np.ndarray], bytes]] = {
    "16 kHz mono PCM_16 (reference)": lambda w: wav(w),
    "44.1 kHz stereo PCM_16": lambda w: wav(w, rate=44100, channels=2),
    "48 kHz mono PCM_24": lambda w: wav(w, rate=48000, subtype="PCM_24"),
    "22.05 kHz mono PCM_U8 (8-bit)": lambda w: wav(w, rate=22050, subtype="PCM_U8"),
    "8 kHz mono PCM_16 (telephone)": lambda w: wav(w, rate=8000),
    "16 kHz PCM_32": lambda w: wav(w, subtype="PCM_32"),
    "16 kHz FLOAT": lambda w: wav(w, subtype="FLOAT"),
    "44.1 kHz stereo DOUBLE": lambda w: wav(w, rate=44100, channels=2, subtype="DOUBLE"),
    "DC offset +0.3": lambda w: wav(w + np.float32(0.3) * (np.abs(w).max() > 0)),
    "clipped (x8 gain)": lambda w: wav(np.clip(w * 8, -1, 1)),
    "quiet (x0.05 gain)": lambda w: wav(w * np.float32(0.05)),
    "30 s clip, word at 12 s": lambda w: wav(_long(w)),
    "clipped (x2 gain)": lambda w: wav(np.clip(w * 2, -1, 1)),
    "clipped x4, 48 kHz 24-bit": lambda w: clipped_at(w, gain=4, rate=48000, subtype="PCM_24"),
    "clipped x8, 44.1 kHz stereo": lambda w: clipped_at(w, gain=8, rate=44100, channels=2),
    "clipped x8, 8 kHz": lambda w: clipped_at(w, gain=8, rate=8000),
    "streamed WAV (sizes 0xFFFFFFFF)": lambda w: streamed(wav(w, rate=44100, channels=2)),
}
_RNG = np.random.default_rng(1)
ODD = {
    "silence 1 s": wav(np.zeros(16000, np.float32)),
    "60 ms of noise": wav(_RNG.normal(0, 0.1, 960).astype(np.float32)),
    "one sample": wav(np.full(1, 0.5, np.float32)),
    "10 ms of noise": wav(_RNG.normal(0, 0.1, 160).astype(np.float32)),
    "200 ms noise burst in 1 s": wav(np.pad(_RNG.normal(0, 0.1, 3200), (6400, 6400)).astype(np.float32)),
    "click in 1 s": wav(np.pad(np.full(8, 0.9), (8000, 7992)).astype(np.float32)),
    "100 ms beep (1 kHz)": wav((0.3 * np.sin(2 * np.pi * 1000 * np.arange(1600) / 16000)).astype(np.float32)),
    "5 s of noise, no word": wav(_RNG.normal(0, 0.05, 80000).astype(np.float32)),
}


def bursts(count: int = 100) -> list[bytes]:
    """Short noise bursts (5-500 ms, white, gated) at random places in a second of silence: no keyword in any."""
    rng, out = np.random.default_rng(7), []
    for _ in range(count):
        length = int(np.exp(rng.uniform(np.log(80), np.log(8000))))
        clip = np.zeros(16000, np.float32)
        start = int(rng.integers(0, 16000 - length + 1))
        clip[start:start + length] = rng.normal(0, np.exp(rng.uniform(np.log(0.005), np.log(0.3))), length)
        out.append(wav(clip))
    return out


def _keywords(client: httpx.Client, files: list[bytes]) -> list[str]:
    got: list[str] = []
    for start in range(0, len(files), 16):
        chunk = [base64.b64encode(f).decode() for f in files[start:start + 16]]
        resp = client.post("/v1/models/speech/predict", json={"audio": chunk})
        if resp.status_code != 200:
            got += [f"HTTP {resp.status_code}: {resp.json().get('error', '')[:80]}"] * len(chunk)
        else:
            got += [r["keyword"] for r in resp.json()["results"]]
    return got


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("/tmp/defzoo3"))
    parser.add_argument("--code-root", type=Path, help="another checkout to compare against (its server)")
    parser.add_argument("--before-zoo", type=Path, help="another zoo whose speech model to compare against")
    args = parser.parse_args(argv)
    clips = held_out_clips()
    with ExitStack() as stack:
        clients = serve_side_by_side(stack, zoo=args.zoo, model="speech", code_root=args.code_root,
                                     before_zoo=args.before_zoo)
        print(f"load average {os.getloadavg()}; {len(clips)} held-out clips ({len(TEST_VARIANTS)} unseen voices)")
        for variant, make in VARIANTS.items():
            files = [make(clip) for _, clip in clips]
            row = []
            for client in clients.values():
                got = _keywords(client, files)
                errors = sorted({g for g in got if g.startswith("HTTP")})
                row.append(f"{np.mean([g == w for g, (w, _) in zip(got, clips)]):.3f}" + (f" {errors[0]}" if errors else ""))
            print(f"{variant:34s} " + "  ".join(row), flush=True)
        noise = bursts()
        print(f"{'100 noise bursts: no keyword':34s} " + "  ".join(
            f"{np.mean([g.startswith('_') for g in _keywords(c, noise)]):.3f}" for c in clients.values()))
        for name, data in ODD.items():
            print(f"{name:34s} " + "  ".join(_keywords(c, [data])[0] for c in clients.values()))
        print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

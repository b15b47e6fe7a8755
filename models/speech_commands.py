"""Loader for the Google Speech Commands folder layout, to train the ``speech`` model on real audio.

Expected layout (as extracted from speech_commands_v0.02.tar.gz)::

    <root>/<word>/<speaker>_nohash_<n>.wav     16 kHz mono clips, one word each
    <root>/testing_list.txt                     relative paths of the test clips (required)
    <root>/validation_list.txt                  relative paths of validation clips (optional, not trained on)
    <root>/_background_noise_/*.wav             long noise recordings (optional; else synthetic noise)

Words other than the ten keywords become ``_unknown_``; ``_silence_`` clips are cut from the noise.
"""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly
from tqdm import tqdm

from models import speech_data as sd
from models.speech_frontend import SAMPLE_RATE

NOISE_DIR = "_background_noise_"


def read_wav(path: Path) -> np.ndarray:
    """Mono float32 in [-1, 1] at 16 kHz from a PCM/float WAV file (resampled when needed)."""
    try:
        rate, data = wavfile.read(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable WAV file ({exc})") from exc
    if data.dtype == np.uint8:
        audio = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        audio = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    else:
        audio = data.astype(np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = gcd(SAMPLE_RATE, rate)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return np.clip(audio, -1.0, 1.0)


def _read_list(path: Path) -> set[str]:
    return {line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()}


def _word_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ValueError(f"Speech Commands root {root} is not a folder; expected <root>/<word>/*.wav "
                         "plus testing_list.txt")
    words = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    if not {p.name for p in words} & set(sd.KEYWORDS):
        raise ValueError(f"{root} has no keyword folders; expected some of {list(sd.KEYWORDS)} "
                         f"as <root>/<word>/*.wav, found {[p.name for p in words][:10]}")
    return words


def _assign(root: Path, *, rng: np.random.Generator, max_per_word: int | None) -> dict[str, list[str]]:
    """Relative paths per split: test from testing_list.txt, validation skipped, the rest train."""
    word_dirs = _word_dirs(root)
    test_list = root / "testing_list.txt"
    if not test_list.is_file():
        raise ValueError(f"{root} lacks testing_list.txt (the speaker-disjoint test split of Speech Commands)")
    testing = _read_list(test_list)
    validation = _read_list(root / "validation_list.txt") if (root / "validation_list.txt").is_file() else set()
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for word_dir in word_dirs:
        files = sorted(f"{word_dir.name}/{p.name}" for p in word_dir.glob("*.wav"))
        for split, chosen in (("test", [f for f in files if f in testing]),
                              ("train", [f for f in files if f not in testing and f not in validation])):
            if max_per_word is not None and len(chosen) > max_per_word:
                chosen = sorted(rng.choice(chosen, size=max_per_word, replace=False))
            splits[split] += chosen
    return splits


def _label(relative: str) -> int:
    word = relative.split("/", 1)[0]
    return sd.LABELS.index(word) if word in sd.KEYWORDS else sd.LABELS.index(sd.UNKNOWN)


def _noise(root: Path, *, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train/test background noise: first 2/3 of each recording for training, the rest for test."""
    files = sorted((root / NOISE_DIR).glob("*.wav")) if (root / NOISE_DIR).is_dir() else []
    if not files:
        rng = np.random.default_rng(seed)
        return sd.noise_bank(rng, count=12), sd.noise_bank(rng, count=6)
    recordings = [read_wav(f) for f in files]
    cut = [len(r) * 2 // 3 for r in recordings]
    return [r[:c] for r, c in zip(recordings, cut)], [r[c:] for r, c in zip(recordings, cut)]


def load(root: Path, *, seed: int, max_per_word: int | None = None, progress: bool = True) -> sd.Corpus:
    """Utterances of a Speech Commands folder (``max_per_word`` caps clips per word and split)."""
    root = Path(root)
    splits = _assign(root, rng=np.random.default_rng(seed), max_per_word=max_per_word)
    if not splits["train"] or not splits["test"]:
        raise ValueError(f"{root}: found {len(splits['train'])} training and {len(splits['test'])} test clips; "
                         "need both (is testing_list.txt listing files that exist?)")
    utterances: dict[str, list[sd.Utterance]] = {}
    for split, files in splits.items():
        utterances[split] = [sd.Utterance(read_wav(root / f), _label(f), f)
                             for f in tqdm(files, desc=f"speech: read {split} wavs", disable=not progress,
                                           leave=False)]
    train_noise, test_noise = _noise(root, seed=seed)
    words = sorted({f.split("/", 1)[0] for f in splits["train"]})
    description = {
        "data": f"Speech Commands layout at {root} ({len(words)} words, ten keywords, the rest _unknown_)",
        "split": "testing_list.txt (speakers disjoint from training); validation_list.txt not trained on",
    }
    return sd.Corpus(utterances["train"], utterances["test"], train_noise, test_noise, description)

"""Keyword-spotting data: label set, synthetic corpus from eSpeak NG voices, noise and augmentation.

The label set and the ``_unknown_`` vocabulary follow Google Speech Commands (v0.02). The
synthetic corpus splits by *voice*: test voices use eSpeak variants that never occur in
training, so the test accuracy measures generalisation to unseen speakers, not memorisation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.speech_frontend import SAMPLE_RATE
from models.speech_synth import synth_word

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE, UNKNOWN = "_silence_", "_unknown_"
LABELS = (SILENCE, UNKNOWN, *KEYWORDS)  # the order of TensorFlow's speech_commands example
# The 25 auxiliary Speech Commands words: what the real data set files under _unknown_.
UNKNOWN_WORDS = (
    "bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine", "one",
    "seven", "sheila", "six", "three", "tree", "two", "wow", "zero", "backward", "follow", "forward",
    "learn", "visual",
)
CLIP_SAMPLES = SAMPLE_RATE  # one-second clips, as in Speech Commands
DIALECTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
            "en-us-nyc")
# Speaker-like eSpeak variants (files under espeak-ng-data/voices/!v). TEST_VARIANTS never train.
TRAIN_VARIANTS = (
    "m1", "m2", "m4", "m5", "m7", "m8", "f1", "f2", "f3", "f5", "Alex", "Andy", "Alicia", "Andrea", "Gene",
    "Jacky", "Mario", "Michael", "Mike", "Storm", "adam", "anika", "aunty", "belinda", "benjamin", "boris",
    "david", "ed", "edward", "gustave", "ian", "iven", "john", "klatt", "klatt4", "linda", "marcelo", "max",
    "paul", "quincy", "rob", "robosoft4", "sandro", "shelby", "steph", "travis",
)
TEST_VARIANTS = ("m3", "m6", "f4", "Annie", "robert", "klatt3", "steph2", "grandpa", "iven2", "Denis")
RATES = (120, 145, 170, 195, 220)
PITCHES = (25, 40, 55, 70)


@dataclass(frozen=True)
class SynthConfig:
    """Which voices speak which words how often (one preset per build profile)."""

    dialects: tuple[str, ...]
    train_variants: tuple[str, ...]
    test_variants: tuple[str, ...]
    unknown_words: tuple[str, ...] = UNKNOWN_WORDS
    keyword_takes: int = 1  # renditions (rate, pitch draws) per keyword and voice
    unknown_per_voice: int = 8  # unknown words each voice speaks, drawn at random
    test_keyword_takes: int = 1

    def __post_init__(self) -> None:
        overlap = set(self.train_variants) & set(self.test_variants)
        if overlap:
            raise ValueError(f"test voices must be held out of training; variants in both: {sorted(overlap)}")

    def voices(self, split: str) -> list[str]:
        variants = self.train_variants if split == "train" else self.test_variants
        return [f"{d}+{v}" for d, v in itertools.product(self.dialects, variants)]


@dataclass
class Utterance:
    audio: np.ndarray  # float32 mono 16 kHz in [-1, 1]; a bare word, or a whole clip for real data
    label: int
    source: str


@dataclass
class Corpus:
    train: list[Utterance]
    test: list[Utterance]
    train_noise: list[np.ndarray]
    test_noise: list[np.ndarray]
    description: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Augment:
    """Clip composition: placement jitter, loudness, background noise."""

    max_shift: int = 0  # extra jitter (samples) beyond the free room in the clip; 1600 for real clips
    gain_db: tuple[float, float] = (-18.0, 0.0)
    noise_prob: float = 0.8
    snr_db: tuple[float, float] = (5.0, 30.0)
    silence_rms: tuple[float, float] = (1e-4, 0.05)
    # Speed perturbation shifts pitch and formants together, like a longer or shorter vocal tract:
    # it widens the range of "speakers" beyond the eSpeak variants. (1, 1) turns it off.
    speed: tuple[float, float] = (0.9, 1.1)
    # Extra _silence_ clips, per silence clip, holding short non-speech sounds (noise bursts, clicks, beeps; see
    # `transient_clip`): without them 60 ms of noise padded to a second was answered "up" (round 5).
    transients: float = 1.0
    transient_seconds: tuple[float, float] = (1 / SAMPLE_RATE, 0.8)

    def for_test(self) -> Augment:
        """Test clips: same placement, gain and noise, but the recorded voice left as it is, and no transients
        (the held-out set stays the one earlier models were measured on; `non_speech_set` measures them)."""
        return replace(self, speed=(1.0, 1.0), transients=0.0)


def _synth_jobs(cfg: SynthConfig, *, split: str, rng: np.random.Generator) -> list[tuple[str, str, int, int]]:
    takes = cfg.keyword_takes if split == "train" else cfg.test_keyword_takes
    jobs = []
    for voice in cfg.voices(split):
        words = [w for w in KEYWORDS for _ in range(takes)]
        count = min(cfg.unknown_per_voice, len(cfg.unknown_words))
        words += [str(w) for w in rng.choice(cfg.unknown_words, size=count, replace=False)]
        for word in words:
            jobs.append((word, voice, int(rng.choice(RATES)), int(rng.choice(PITCHES))))
    return jobs


def synth_corpus(cfg: SynthConfig, *, seed: int, cache_dir: Path | None, progress: bool = True) -> Corpus:
    """Synthesize the train (training voices) and test (held-out voices) utterances."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Utterance]] = {}
    for split in ("train", "test"):
        jobs = _synth_jobs(cfg, split=split, rng=rng)
        utterances = []
        for word, voice, rate, pitch in tqdm(jobs, desc=f"speech: synthesize {split}", disable=not progress,
                                             leave=False, mininterval=1.0):
            audio = synth_word(word, voice=voice, rate=rate, pitch=pitch, cache_dir=cache_dir)
            label = LABELS.index(word) if word in KEYWORDS else LABELS.index(UNKNOWN)
            utterances.append(Utterance(audio, label, f"{word}|{voice}|r{rate}|p{pitch}"))
        splits[split] = utterances
    description = {
        "data": "synthetic: eSpeak NG (espeakng-loader) words, resampled to 16 kHz, noise/gain/shift augmented",
        "train_voices": cfg.voices("train"),
        "test_voices": cfg.voices("test"),
        "split": "by voice: test voices use eSpeak variants never seen in training "
                 f"({', '.join(cfg.test_variants)})",
    }
    return Corpus(splits["train"], splits["test"], noise_bank(rng, count=12), noise_bank(rng, count=6),
                  description)


def colored_noise(rng: np.random.Generator, *, samples: int, exponent: float) -> np.ndarray:
    """Unit-RMS noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    freqs = np.fft.rfftfreq(samples, d=1.0 / SAMPLE_RATE)
    spectrum *= 1.0 / np.maximum(freqs, 20.0) ** (exponent / 2.0)
    noise = np.fft.irfft(spectrum, n=samples)
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def noise_bank(rng: np.random.Generator, *, count: int, seconds: float = 5.0) -> list[np.ndarray]:
    """Synthetic background noises (coloured noise, some with mains hum) of ``seconds`` each."""
    samples = int(seconds * SAMPLE_RATE)
    bank = []
    for _ in range(count):
        noise = colored_noise(rng, samples=samples, exponent=float(rng.uniform(0.0, 2.0)))
        if rng.random() < 0.3:  # mains hum and harmonics: a common real-world background
            t = np.arange(samples) / SAMPLE_RATE
            base = float(rng.choice([50.0, 60.0]))
            hum = np.sum([np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.3)) / k for k in (1, 2, 3)], axis=0)
            noise = noise + float(rng.uniform(0.5, 2.0)) * hum.astype(np.float32)
            noise /= np.sqrt(np.mean(noise**2)) + 1e-12
        bank.append(noise.astype(np.float32))
    return bank


def place(audio: np.ndarray, rng: np.random.Generator, *, length: int, max_shift: int) -> np.ndarray:
    """Put ``audio`` at a random offset in a zero clip of ``length`` samples (cropping what overflows)."""
    clip = np.zeros(length, dtype=np.float32)
    low, high = min(0, length - audio.size) - max_shift, max(0, length - audio.size) + max_shift
    offset = int(rng.integers(low, high + 1))
    start, end = max(0, offset), min(length, offset + audio.size)
    if end > start:
        clip[start:end] = audio[start - offset:end - offset]
    return clip


def _noise_segment(bank: list[np.ndarray], rng: np.random.Generator, *, length: int) -> np.ndarray:
    noise = bank[int(rng.integers(len(bank)))]
    if noise.size < length:
        noise = np.tile(noise, length // noise.size + 1)
    start = int(rng.integers(0, noise.size - length + 1))
    return noise[start:start + length]


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play ``audio`` ``factor`` times faster (linear interpolation: cheap, and the slight
    low-pass it adds is harmless for 40 mel bands)."""
    if factor == 1.0:
        return audio
    count = max(1, round(audio.size / factor))
    return np.interp(np.arange(count) * factor, np.arange(audio.size), audio).astype(np.float32)


def speech_clip(utt: Utterance, rng: np.random.Generator, *, noise: list[np.ndarray], aug: Augment) -> np.ndarray:
    """One augmented one-second clip of ``utt``: sped up/down, shifted, rescaled, over background noise."""
    audio = change_speed(utt.audio, float(rng.uniform(*aug.speed))) if aug.speed != (1.0, 1.0) else utt.audio
    clip = place(audio, rng, length=CLIP_SAMPLES, max_shift=aug.max_shift)
    peak = float(np.abs(clip).max())
    if peak > 0:
        clip *= 10 ** (rng.uniform(*aug.gain_db) / 20.0) * 0.9 / peak
    if noise and rng.random() < aug.noise_prob:
        active = clip[np.abs(clip) > 1e-4]  # SNR against the spoken part, not the padding
        level = float(np.sqrt(np.mean(active**2))) if active.size else 0.01
        snr = rng.uniform(*aug.snr_db)
        clip += _noise_segment(noise, rng, length=CLIP_SAMPLES) * level / 10 ** (snr / 20.0)
    return np.clip(clip, -1.0, 1.0)


def silence_clip(rng: np.random.Generator, *, noise: list[np.ndarray], aug: Augment) -> np.ndarray:
    """A ``_silence_`` clip: background noise at a random, log-uniform level (or digital silence)."""
    if not noise or rng.random() < 0.05:
        return np.zeros(CLIP_SAMPLES, dtype=np.float32)
    level = float(np.exp(rng.uniform(np.log(aug.silence_rms[0]), np.log(aug.silence_rms[1]))))
    return np.clip(_noise_segment(noise, rng, length=CLIP_SAMPLES) * level, -1.0, 1.0)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _sound(rng: np.random.Generator, length: int) -> np.ndarray:
    """One non-speech sound of `length` samples at unit peak: coloured noise, a beep or a click."""
    kind = rng.random()
    if kind < 0.6:
        sound = (colored_noise(rng, samples=length, exponent=float(rng.uniform(0.0, 2.0))) if length >= 64
                 else rng.standard_normal(length).astype(np.float32))
        if rng.random() < 0.5:  # a soft onset and decay, as a rustle or a breath, rather than a gated burst
            sound = sound * np.hanning(length + 2)[1:-1].astype(np.float32)
    elif kind < 0.8:
        freq = _log_uniform(rng, 100.0, 4000.0)
        sound = np.sin(2 * np.pi * freq * np.arange(length) / SAMPLE_RATE + rng.uniform(0, 6.3)).astype(np.float32)
    else:  # a click: a decaying impulse of up to 2 ms, whatever `length` was drawn
        length = min(length, int(rng.integers(1, 33)))
        sound = (np.exp(-np.arange(length) / max(1.0, length / 4)) * rng.choice([-1.0, 1.0])).astype(np.float32)
    return sound / (float(np.abs(sound).max()) + 1e-12)


def transient_clip(rng: np.random.Generator, *, noise: list[np.ndarray], aug: Augment) -> np.ndarray:
    """A ``_silence_`` clip with no speech but one to three short sounds (1 sample to `aug.transient_seconds`
    long, peak 0.003-0.9) in digital silence or quiet background noise: a tap, a click, a beep, a rustle."""
    clip = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    if noise and rng.random() < 0.5:
        clip += _noise_segment(noise, rng, length=CLIP_SAMPLES) * _log_uniform(rng, 1e-4, 3e-3)
    low, high = (max(1, round(s * SAMPLE_RATE)) for s in aug.transient_seconds)
    for _ in range(int(rng.integers(1, 4))):
        sound = _sound(rng, round(_log_uniform(rng, low, high + 1)))
        start = int(rng.integers(0, CLIP_SAMPLES - sound.size + 1))
        clip[start:start + sound.size] += sound * _log_uniform(rng, 0.003, 0.9)
    return np.clip(clip, -1.0, 1.0)


def non_speech_set(rng: np.random.Generator, *, noise: list[np.ndarray], count: int) -> np.ndarray:
    """`count` held-out transient clips ``[count, 16000]`` (a model should answer none with a keyword)."""
    return np.stack([transient_clip(rng, noise=noise, aug=Augment()) for _ in range(count)])


def compose(
    utterances: list[Utterance], rng: np.random.Generator, *, noise: list[np.ndarray], aug: Augment,
    per_class: int | None = None, unknown_ratio: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Clips ``[n, 16000]`` and labels ``[n]``: every keyword utterance, ``per_class`` silences
    (default: the mean keyword count) and ``unknown_ratio * per_class`` unknown utterances drawn
    from the pool (training uses more than one class's share: ``_unknown_`` is the most varied)."""
    labels = np.array([u.label for u in utterances])
    unknown = np.flatnonzero(labels == LABELS.index(UNKNOWN))
    known = np.flatnonzero(labels != LABELS.index(UNKNOWN))
    if per_class is None:
        per_class = max(1, round(known.size / len(KEYWORDS))) if known.size else unknown.size
    draw = min(round(unknown_ratio * per_class), unknown.size)
    chosen = np.concatenate([known, rng.choice(unknown, size=draw, replace=False)])
    silences, transients = per_class, round(aug.transients * per_class)
    # -1 marks a silence, -2 a transient; rows are written in shuffled order straight into one preallocated
    # array (stacking then permuting thousands of clips costs more than composing them).
    items = rng.permutation(np.concatenate([chosen, np.full(silences, -1), np.full(transients, -2)]))
    clips = np.empty((items.size, CLIP_SAMPLES), dtype=np.float32)
    for row, index in enumerate(items):
        clips[row] = (speech_clip(utterances[index], rng, noise=noise, aug=aug) if index >= 0
                      else silence_clip(rng, noise=noise, aug=aug) if index == -1
                      else transient_clip(rng, noise=noise, aug=aug))
    y = np.where(items < 0, LABELS.index(SILENCE), labels[np.maximum(items, 0)]).astype(np.int64)
    return clips, y

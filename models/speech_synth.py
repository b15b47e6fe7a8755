"""Word synthesis with the eSpeak NG library shipped inside the ``espeakng-loader`` wheel.

eSpeak NG has no maintained Python binding that works offline with that wheel's data, so it is
driven directly through ctypes: synchronous mode with a synth callback that collects the
22,050 Hz int16 samples. Output is resampled to 16 kHz with ``scipy.signal.resample_poly``,
trimmed of leading/trailing silence and cached per (word, voice, rate, pitch) as ``.npy``.
"""

from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

ESPEAK_RATE = 22_050
TARGET_RATE = 16_000
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
RATE_RANGE = (80, 450)  # words per minute eSpeak accepts
PITCH_RANGE = (0, 99)

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class ESpeak:
    """One process-wide eSpeak NG engine (the C library keeps global state, hence the lock)."""

    _instance: ESpeak | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        # NOTE: optional (train extra); loads the eSpeak NG native library
        import espeakng_loader

        self.data_path = Path(espeakng_loader.get_data_path())
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0)
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"eSpeak NG initialisation returned {rate}, expected {ESPEAK_RATE} Hz")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: C holds only the pointer
        self._lib.espeak_SetSynthCallback(self._callback)
        self.languages = _languages(self.data_path)
        self.variants = {p.name for p in (self.data_path / "voices" / "!v").iterdir() if p.is_file()}

    @classmethod
    def get(cls) -> ESpeak:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _collect(self, wav: ctypes.Array, count: int, events: int) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def check_voice(self, voice: str) -> None:
        """Raise ValueError unless ``voice`` is ``language`` or ``language+variant`` eSpeak knows."""
        language, _, variant = voice.partition("+")
        if language.lower() not in self.languages:
            raise ValueError(f"unknown eSpeak language {language!r} in voice {voice!r}; "
                             f"expected one of e.g. {sorted(self.languages)[:8]}...")
        # NOTE: eSpeak silently ignores an unknown variant, so check the file exists ourselves.
        if variant and variant not in self.variants:
            raise ValueError(f"unknown eSpeak variant {variant!r} in voice {voice!r}; "
                             f"expected one of {sorted(self.variants)}")

    def synthesize(self, text: str, *, voice: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples at 22,050 Hz of ``text`` spoken by ``voice`` (``lang+variant``)."""
        self.check_voice(voice)
        if not RATE_RANGE[0] <= rate <= RATE_RANGE[1] or not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
            raise ValueError(f"rate must be in {RATE_RANGE} wpm and pitch in {PITCH_RANGE}, "
                             f"got rate={rate}, pitch={pitch}")
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise RuntimeError(f"eSpeak NG could not select voice {voice!r}")
            self._lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
            self._lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
            self._chunks = []
            data = text.encode("utf-8") + b"\0"
            status = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self._lib.espeak_Synchronize()
            if status != 0:
                raise RuntimeError(f"eSpeak NG failed on {text!r} with voice {voice!r} (status {status})")
            chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


def _languages(data_path: Path) -> set[str]:
    """Language names eSpeak accepts, from the file names under ``espeak-ng-data/lang``."""
    return {p.name.lower() for p in (data_path / "lang").rglob("*") if p.is_file()}


def trim_silence(audio: np.ndarray, *, threshold: float = 0.02, margin: int = 320) -> np.ndarray:
    """Cut leading/trailing samples quieter than ``threshold`` x peak, keeping ``margin`` samples."""
    if audio.size == 0:
        return audio
    loud = np.flatnonzero(np.abs(audio.astype(np.float32)) > threshold * float(np.abs(audio).max()))
    if loud.size == 0:
        return audio[:0]
    return audio[max(0, loud[0] - margin): loud[-1] + 1 + margin]


def _cache_file(cache_dir: Path, *, word: str, voice: str, rate: int, pitch: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", voice)
    return cache_dir / safe / f"{re.sub(r'[^A-Za-z0-9_-]', '_', word)}-r{rate}-p{pitch}.npy"


def synth_word(word: str, *, voice: str, rate: int, pitch: int, cache_dir: Path | None = None) -> np.ndarray:
    """``word`` as trimmed float32 audio in [-1, 1] at 16 kHz, cached under ``cache_dir`` if given."""
    path = _cache_file(cache_dir, word=word, voice=voice, rate=rate, pitch=pitch) if cache_dir else None
    if path is not None and path.exists():
        return np.load(path).astype(np.float32) / 32768.0
    raw = ESpeak.get().synthesize(word, voice=voice, rate=rate, pitch=pitch)
    # 16000 / 22050 = 320 / 441 exactly, so a polyphase resampler is exact-rate and cheap.
    audio = resample_poly(raw.astype(np.float32), 320, 441)
    audio16 = trim_silence(np.clip(np.round(audio), -32768, 32767).astype(np.int16))
    if audio16.size == 0:
        raise RuntimeError(f"eSpeak NG produced silence for {word!r} with voice {voice!r}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, audio16)
        tmp.replace(path)  # atomic: parallel builds never read a half-written file
    return audio16.astype(np.float32) / 32768.0

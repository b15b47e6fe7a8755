"""Keyword spotting (speech family): a WAV at any rate, mono or stereo, PCM 8/16/24/32-bit or float.

Decoded with soundfile (libsndfile), downmixed to mono, resampled to 16 kHz with libsoxr (python-soxr),
then cut or zero-padded to the one second the model was trained on (the loudest second of a longer clip).
A model whose input is ``logmel`` (the network without its in-graph front end, e.g. an edge bundle made with
``--speech-frontend numpy``) gets the family's log-mel features from ``service.processing.logmel`` instead.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.processing.base import Limits, TopKColumns, parse_k, setting
from service.processing.logmel import FEATURES, log_mel

RATE = 16_000
ACCEPTS = "a WAV file (RIFF/WAVE; mono or stereo; 8/16/24/32-bit PCM or 32/64-bit float; any sample rate)"


@dataclass
class PreparedAudio:
    waveform: np.ndarray  # [samples] float32 at 16 kHz
    sample_rate: int
    channels: int
    seconds: float


@dataclass(frozen=True)
class WavHeader:
    sample_rate: int
    channels: int
    frames: int  # sample frames the data chunk declares
    pcm16_at: int | None = None  # where the samples start, for plain 16-bit PCM (read without libsndfile)
    big_endian: bool = False
    streamed_at: int | None = None  # a streamed WAV's data chunk (its size a placeholder): where it starts
    data_bytes: int = 0  # the data chunk's bytes, whole frames (a streamed WAV's: those present)

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def _fmt(body: bytes, *, endian: str, index: int) -> tuple[int, int, int, bool]:
    """(rate, channels, bytes per frame, plain 16-bit PCM) of a fmt chunk."""
    if len(body) < 16:
        raise InvalidInput(f"item {index}: WAV fmt chunk is {len(body)} bytes, shorter than 16; expected {ACCEPTS}")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack(endian + "HHIIHH", body[:16])
    if channels == 0 or block_align == 0:
        raise InvalidInput(f"item {index}: WAV fmt chunk declares {channels} channels and {block_align}-byte "
                           f"frames; expected {ACCEPTS}")
    return rate, channels, block_align, tag == 1 and bits == 16 and block_align == 2 * channels


def read_header(data: bytes, *, index: int) -> WavHeader:
    """Rate, channels and frame count from the RIFF header, refusing non-WAV and truncated data.

    NOTE: hand-written because libsndfile silently decodes what is there of a truncated file (comparing the
    data chunk's declared size with the bytes present is the only way to say the upload was cut short), and
    because the rate and length must be known before decoding and resampling cost memory and time.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        raise UnsupportedMediaType(f"item {index}: not a WAV file; expected {ACCEPTS}")
    endian = "<" if data[:4] == b"RIFF" else ">"
    fmt: tuple[int, int, int, bool] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack(endian + "I", data[pos + 4:pos + 8])[0]
        if chunk == b"fmt ":
            fmt = _fmt(data[pos + 8:pos + 8 + size], endian=endian, index=index)
        elif chunk == b"data":
            if fmt is not None and _streamed(data, size=size, at=pos, endian=endian):
                size = (len(data) - pos - 8) // fmt[2] * fmt[2]  # the rest of the file, in whole frames
                return WavHeader(sample_rate=fmt[0], channels=fmt[1], frames=size // fmt[2],
                                 pcm16_at=pos + 8 if fmt[3] else None, big_endian=endian == ">", streamed_at=pos,
                                 data_bytes=size)
            if pos + 8 + size > len(data):
                raise InvalidInput(f"item {index}: truncated WAV: the data chunk declares {size} bytes but "
                                   f"{len(data) - pos - 8} are present; expected {ACCEPTS}")
            if fmt is None:
                raise InvalidInput(f"item {index}: WAV data chunk comes before any fmt chunk; expected {ACCEPTS}")
            return WavHeader(sample_rate=fmt[0], channels=fmt[1], frames=size // fmt[2],
                             pcm16_at=pos + 8 if fmt[3] else None, big_endian=endian == ">",
                             data_bytes=size // fmt[2] * fmt[2])
        pos += 8 + size + (size & 1)
    raise InvalidInput(f"item {index}: WAV file has no data chunk; expected {ACCEPTS}")


# A WAV written to a pipe (ffmpeg `-f wav -`, sox/arecord to stdout, a streaming recorder) cannot go back to fill
# in its sizes: the data chunk says 0xFFFFFFFF, or 0 with the RIFF size 0 or 0xFFFFFFFF too, and the samples run
# to the end of the file.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


def _streamed(data: bytes, *, size: int, at: int, endian: str) -> bool:
    """Whether the data chunk at `at`, declaring `size` bytes, is a streamed WAV's (sizes left as placeholders)."""
    if size == 0xFFFFFFFF:
        return len(data) > at + 8
    riff = struct.unpack(endian + "I", data[4:8])[0]
    return size == 0 and riff in _UNKNOWN_SIZES and len(data) > at + 8


def _sized(data: bytes, header: WavHeader) -> bytes:
    """A streamed WAV with its RIFF and data sizes filled in (what libsndfile reads), other WAVs as they are."""
    if header.streamed_at is None:
        return data
    endian = ">" if data[:4] == b"RIFX" else "<"
    at, size = header.streamed_at, header.data_bytes
    return b"".join((data[:4], struct.pack(endian + "I", at + 8 + size - 8), data[8:at + 4],
                     struct.pack(endian + "I", size), data[at + 8:at + 8 + size]))


def check_header(header: WavHeader, *, index: int, limits: Limits) -> None:
    """The declared rate and length within the limits, before anything is decoded."""
    low, high = limits.min_sample_rate, limits.max_sample_rate
    if not low <= header.sample_rate <= high:
        raise InvalidInput(f"item {index}: WAV sample rate {header.sample_rate} Hz is outside the accepted "
                           f"{low}-{high} Hz ({setting('min_sample_rate')} / {setting('max_sample_rate')})")
    if header.seconds > limits.max_audio_seconds:
        raise PayloadTooLarge(f"item {index}: {header.seconds:.1f} s of audio exceeds the limit of "
                              f"{limits.max_audio_seconds:g} s per clip ({setting('max_audio_seconds')})")


PCM16_SCALE = np.float32(1 / 32768)


def pcm16(data: bytes, header: WavHeader) -> np.ndarray:
    """The [frames, channels] int16 samples of a plain 16-bit PCM WAV (header.pcm16_at set), without a copy."""
    samples = np.frombuffer(data, ">i2" if header.big_endian else "<i2", count=header.frames * header.channels,
                            offset=header.pcm16_at or 0)
    return samples.reshape(header.frames, header.channels)


def decode_wav(data: bytes, *, index: int, limits: Limits) -> tuple[np.ndarray, int, int]:
    header = read_header(data, index=index)
    check_header(header, index=index, limits=limits)
    if header.pcm16_at is not None and header.frames > 0:
        # NOTE: plain 16-bit PCM (most WAVs) is read straight from the data chunk: the same float32 values as
        # libsndfile's (sample / 32768, exact), without its virtual-IO callbacks (~1 ms a clip, most of a clip's
        # preparation). Every other format goes through libsndfile.
        audio = pcm16(data, header).astype(np.float32) * PCM16_SCALE
        return audio, header.sample_rate, header.channels
    try:
        audio, rate = sf.read(io.BytesIO(_sized(data, header)), dtype="float32", always_2d=True,
                              frames=int(limits.max_audio_seconds * header.sample_rate) + 1)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise InvalidInput(f"item {index}: unreadable WAV ({exc}); expected {ACCEPTS}") from None
    if rate != header.sample_rate or audio.shape[0] > limits.max_audio_seconds * rate:
        raise InvalidInput(f"item {index}: the WAV decodes to {audio.shape[0]} frames at {rate} Hz, not what its "
                           f"header declares; expected {ACCEPTS}")
    if audio.shape[0] == 0:
        raise InvalidInput(f"item {index}: WAV file has no samples; expected {ACCEPTS}")
    return audio, int(rate), audio.shape[1]


def to_model_rate(mono: np.ndarray, rate: int) -> np.ndarray:
    if rate == RATE:
        return mono.astype(np.float32)
    # NOTE: libsoxr resamples by any ratio at a cost linear in the samples (no up/down polyphase factors to
    # bound, as scipy's resample_poly needed for prime rates), and is a few hundred KB against scipy's 140 MB.
    return np.asarray(soxr.resample(mono.astype(np.float32), rate, RATE), dtype=np.float32)


# A clip whose mean is further from 0 than this (1% of full scale) has a DC offset (a cheap microphone or sound
# card): it is subtracted, as the training clips are centred on 0 (measured: +0.3 cost 5 of 100 held-out words).
# Clips closer to 0 keep their exact samples.
DC_LIMIT = 0.01


def without_dc(wave: np.ndarray) -> np.ndarray:
    """`wave` (float32) with its mean subtracted where that mean is a DC offset (over DC_LIMIT), else itself."""
    mean = np.float32(wave.mean(dtype=np.float64)) if len(wave) else np.float32(0)
    return wave - mean if abs(mean) > DC_LIMIT else wave


# Clipping (a microphone or gain set too hot) flattens the waveform's peaks at one value; the corners it makes
# are broadband clicks the model never heard (training clips peak at 0.9 at most): x8 gain cost 11 of 100 held-out
# words, x2 (0.4% of samples clipped) 6 of 100 (round 6). A clip is taken as clipped when at least CLIPPED_SAMPLES
# of its samples lie in flat runs of at least CLIPPED_RUN equal samples at its maximum or minimum (a sine or a
# word peaks at one sample, digital silence is not at an extreme); other clips keep their exact samples.
CLIPPED_RUN, CLIPPED_SAMPLES, CLIPPED_LEVEL = 3, 8, 0.1
TRAINED_PEAK = 0.9  # models/speech_data.py: each training word is scaled to peak at 0.9 x a gain of -18..0 dB


def _flat_runs(wave: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of at least CLIPPED_RUN samples equal to the clip's maximum or minimum."""
    hi, lo = wave.max(), wave.min()
    at_hi = wave == hi if hi >= CLIPPED_LEVEL else None
    at_lo = wave == lo if lo <= -CLIPPED_LEVEL else None
    # Most clips peak at one sample: fewer than CLIPPED_SAMPLES at the extremes can't make a clipped clip, and
    # this check (~10 µs a one-second clip) spares the run search (~70 µs) that `modelserve predict` paid per clip.
    if sum(int(np.count_nonzero(m)) for m in (at_hi, at_lo) if m is not None) < CLIPPED_SAMPLES:
        return []
    at = np.zeros(len(wave) + 2, np.int8)
    at[1:-1] = (at_hi if at_hi is not None else False) | (at_lo if at_lo is not None else False)
    edges = np.flatnonzero(np.diff(at))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= CLIPPED_RUN]


def declipped(wave: np.ndarray) -> np.ndarray:
    """`wave` (float32, its own rate) with clipped peaks redrawn, scaled to peak at TRAINED_PEAK; else itself.

    Each flat run is replaced by the cubic Hermite curve that leaves the last unclipped samples on either side
    with their slopes (what the peak would have been), kept between the clip level and 4x it, then the clip is
    scaled so its new peak is the training clips' largest.
    """
    # NOTE: a few lines of numpy rather than a declipping library (none is a dependency, and edge bundles ship
    # this file with numpy only); measured on 300 held-out words: x8 0.87 -> 0.93, x2 0.92 -> 0.95.
    if len(wave) < 2 * CLIPPED_SAMPLES:
        return wave
    runs = [(a, b) for a, b in _flat_runs(wave) if a >= 2 and b + 2 <= len(wave)]
    if sum(b - a for a, b in runs) < CLIPPED_SAMPLES:
        return wave
    out = wave.astype(np.float64)
    for a, b in runs:
        steps = b - a + 1
        p0, p1 = out[a - 1], out[b]
        m0, m1 = (p0 - out[a - 2]) * steps, (out[b + 1] - p1) * steps
        t = np.arange(1, steps) / steps
        curve = ((2 * t ** 3 - 3 * t ** 2 + 1) * p0 + (t ** 3 - 2 * t ** 2 + t) * m0
                 + (3 * t ** 2 - 2 * t ** 3) * p1 + (t ** 3 - t ** 2) * m1)
        sign, level = np.sign(out[a]), abs(out[a])
        out[a:b] = sign * np.clip(curve * sign, level, 4 * level)
    return (out * (TRAINED_PEAK / np.abs(out).max())).astype(np.float32)


def fit_one_second(wave: np.ndarray, *, samples: int = RATE) -> np.ndarray:
    """Zero-pad short clips; of a longer clip keep the window with the most energy (where the word is)."""
    if len(wave) <= samples:
        return np.pad(wave, (0, samples - len(wave)))
    energy = np.concatenate([[0.0], np.cumsum(wave.astype(np.float64) ** 2)])
    start = int(np.argmax(energy[samples:] - energy[:-samples]))
    return wave[start:start + samples]


class SpeechProcessor:
    task = "keyword-spotting"
    # `modelserve predict` prepares clips inline: a 16-bit clip is read into its batch row in ~16 µs of CPU, while
    # pickling its 64 KB waveform back from a worker process cost ~140 µs, and prep threads cost ~100 µs of CPU
    # a row more than inline and fewer rows/s (GIL hand-offs around session.run; loadtests.offline_media_bench).
    prepare_inline = True

    def __init__(self, *, input_name: str, output_name: str, labels: list[str] | None,
                 trained_samples: int = RATE, limits: Limits | None = None) -> None:
        self.input_name, self.output_name, self.labels = input_name, output_name, labels
        self.limits = limits or Limits()
        self.samples = trained_samples
        self.features = input_name == FEATURES  # the graph takes log-mel features, not the waveform

    def describe(self) -> dict:
        features = ", then log-mel features (NumPy)" if self.features else ""
        return {"accepts": ACCEPTS + ": multipart field 'file' (repeatable) or JSON {\"audio\": [base64, ...]}",
                "preprocessing": f"downmixed to mono, clipped peaks redrawn, resampled to {RATE} Hz (libsoxr), the loudest "
                                 f"{self.samples / RATE:g} s kept or zero-padded to it{features}",
                "params": {"k": "number of labels returned (default 3)"}}

    def admit(self, payloads: Sequence[Any]) -> None:
        """Refuse a request whose clips together declare more than max_request_audio_seconds, before decoding."""
        total, limit = 0.0, self.limits.max_request_audio_seconds
        for index, payload in enumerate(payloads):
            if isinstance(payload, bytes):
                header = read_header(payload, index=index)
                check_header(header, index=index, limits=self.limits)
                total += header.seconds
            elif isinstance(payload, np.ndarray):
                total += payload.size / RATE
            if total > limit:
                raise PayloadTooLarge(f"the request's clips last more than {limit:g} s together (at item {index}); "
                                      f"send fewer or shorter clips ({setting('max_request_audio_seconds')})")

    def prepare(self, payload: Any, *, index: int) -> PreparedAudio:
        if isinstance(payload, np.ndarray):  # batch .npy rows: a 16 kHz waveform in [-1, 1]
            if payload.ndim != 1:
                raise InvalidInput(f"item {index}: expected a 1-D 16 kHz waveform, got shape {list(payload.shape)}")
            audio, rate, channels = np.asarray(payload, np.float32)[:, None], RATE, 1
        else:
            audio, rate, channels = decode_wav(payload, index=index, limits=self.limits)
        if not np.isfinite(audio).all():  # a float WAV may hold NaN/inf: every score would be NaN (JSON null)
            raise InvalidInput(f"item {index}: the audio holds NaN or infinite samples; expected finite samples "
                               "(float WAVs in [-1, 1])")
        mono = declipped(audio[:, 0] if channels == 1 else audio.mean(axis=1))
        mono = without_dc(to_model_rate(mono, rate))
        return PreparedAudio(fit_one_second(mono, samples=self.samples), rate, channels, audio.shape[0] / rate)

    def prepare_batch(self, payloads: Sequence[Any], *, indices: Sequence[int]) -> list[PreparedAudio | Exception]:
        """`prepare` of many clips, each written into its row of one zeroed [N, samples] array; a bad clip is its
        own exception in the list, never its batch-mates'."""
        waveforms = np.zeros((len(payloads), self.samples), np.float32)
        out: list[PreparedAudio | Exception] = []
        for row, (payload, index) in enumerate(zip(payloads, indices)):
            try:
                out.append(self._prepare_into(waveforms[row], payload, index=index))
            except Exception as exc:  # a bad row's own error (InvalidInput, or anything odd in its data)
                out.append(exc)
        return out

    def _prepare_into(self, row: np.ndarray, payload: Any, *, index: int) -> PreparedAudio:
        """`prepare` writing the waveform into `row` (zeros): a mono 16 kHz 16-bit clip of at most the model's
        length is scaled straight into place (the zero padding is already there), as `prepare` computes it."""
        header = read_header(payload, index=index) if isinstance(payload, bytes) else None
        if header is None or header.pcm16_at is None or header.channels != 1 or header.sample_rate != RATE \
                or not 0 < header.frames <= self.samples:
            prepared = self.prepare(payload, index=index)
            row[:] = prepared.waveform
            return PreparedAudio(row, prepared.sample_rate, prepared.channels, prepared.seconds)
        check_header(header, index=index, limits=self.limits)
        head = row[:header.frames]
        head[:] = pcm16(payload, header)[:, 0]
        head *= PCM16_SCALE
        head[:] = without_dc(declipped(head))  # as `prepare` does, on the same float32 samples
        return PreparedAudio(row, RATE, 1, header.frames / RATE)

    def rows_per_run(self, prepared: Sequence[Any]) -> int | None:
        return None

    def collate(self, prepared: list[PreparedAudio]) -> dict[str, np.ndarray]:
        waveforms = _rows_in_place(prepared)
        if waveforms is None:
            waveforms = np.stack([p.waveform for p in prepared], dtype=np.float32)
        return {self.input_name: log_mel(waveforms) if self.features else waveforms}

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: list[PreparedAudio], *,
                    params: dict) -> list[dict]:
        return self.postprocess_columns(outputs, prepared, params=params).rows()

    def postprocess_columns(self, outputs: dict[str, np.ndarray], prepared: list[PreparedAudio], *,
                            params: dict) -> KeywordColumns:
        """`postprocess`'s results as columns (batch jobs write them to Parquet without a dict per row)."""
        k = parse_k(params.get("k"), default=3, limit=len(self.labels or []) or 1000)
        probs = outputs[self.output_name][:len(prepared)]
        k = max(1, min(k, probs.shape[1]))
        # The stable sort of each whole row is `top_k`'s own order (ties by the lower index); a keyword model
        # has a dozen classes, so sorting all of them costs less than partitioning first.
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        names = [self.labels[i] if self.labels and i < len(self.labels) else str(i) for i in range(probs.shape[1])]
        return KeywordColumns(names=names, index=best.astype(np.int64),
                              probability=np.take_along_axis(probs, best, axis=1).astype(np.float64),
                              sample_rate=[p.sample_rate for p in prepared], channels=[p.channels for p in prepared],
                              seconds=[round(p.seconds, 3) for p in prepared])


def _rows_in_place(prepared: list[PreparedAudio]) -> np.ndarray | None:
    """The waveforms as one [N, samples] array without a copy when they are consecutive rows of one array (as
    `prepare_batch` writes them), else None."""
    base = prepared[0].waveform.base if prepared else None
    if not isinstance(base, np.ndarray) or base.ndim != 2 or base.dtype != np.float32 \
            or not base.flags.c_contiguous:
        return None
    start, stride = base.__array_interface__["data"][0], base.strides[0]
    first, extra = divmod(prepared[0].waveform.__array_interface__["data"][0] - start, stride)
    if extra or first + len(prepared) > len(base):
        return None
    for i, p in enumerate(prepared):
        w = p.waveform
        if w.base is not base or w.shape != base.shape[1:] \
                or w.__array_interface__["data"][0] != start + (first + i) * stride:
            return None
    return base[first:first + len(prepared)]


@dataclass
class KeywordColumns(TopKColumns):
    """A batch's keyword results as columns: each row's k best classes, best first, and its clip's facts."""

    sample_rate: list[int]
    channels: list[int]
    seconds: list[float]

    def rows(self) -> list[dict]:
        """One dict per row, as the task endpoint returns it."""
        names, results = self.names, []
        for idx, probs, rate, channels, seconds in zip(self.index.tolist(), self.probability.tolist(),
                                                       self.sample_rate, self.channels, self.seconds):
            best = [{"label": names[i], "index": i, "probability": v} for i, v in zip(idx, probs)]
            results.append({"keyword": best[0]["label"], "predictions": best,
                            "audio": {"sample_rate": rate, "channels": channels, "seconds": seconds}})
        return results

    def arrow(self) -> Any:
        """The same values as one Arrow struct array, typed as Arrow infers `rows()`, without a dict per row."""
        # NOTE: pyarrow is the optional `parquet` extra; only the Parquet writer calls this.
        import pyarrow as pa

        rows, k = self.index.shape
        labels = pa.array(self.names, pa.string()).take(pa.array(self.index.ravel()))
        picks = pa.StructArray.from_arrays([labels, pa.array(self.index.ravel()), pa.array(self.probability.ravel())],
                                           names=["label", "index", "probability"])
        predictions = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32)), picks)
        audio = pa.StructArray.from_arrays([pa.array(self.sample_rate, pa.int64()), pa.array(self.channels, pa.int64()),
                                            pa.array(self.seconds, pa.float64())],
                                           names=["sample_rate", "channels", "seconds"])
        keyword = labels.take(pa.array(np.arange(0, rows * k, k, dtype=np.int64)))
        return pa.StructArray.from_arrays([keyword, predictions, audio], names=["keyword", "predictions", "audio"])

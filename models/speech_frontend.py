"""Log-mel front end of the speech model, computed inside the exported graph.

The STFT is a strided ``conv1d`` with a fixed, windowed DFT basis rather than ``torch.stft``:
both export with the dynamo exporter (opset 18 ``STFT``), but in ONNX Runtime, which serves the
model, the conv form costs half the CPU time (4.1 ms vs 7.6 ms for 17 one-second clips, one
thread), and ``Conv`` is supported by every runtime and optimiser. (In PyTorch ``torch.stft`` is
faster, but the front end is under a tenth of a training step.) No torchaudio is allowed and
librosa would pull numba for one matrix, so the mel filterbank is written here (HTK mel scale).
A NumPy reference (``np.fft.rfft``) lives next to it so tests can check the graph against it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16_000
N_FFT = 512  # 32 ms window
HOP = 320  # 20 ms hop, as in "Hello Edge" DS-CNN (halves the network cost of 10 ms)
N_MELS = 40
FMIN = 40.0
FMAX = 7_800.0
LOG_EPS = 1e-6


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    *, n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
    fmin: float = FMIN, fmax: float = FMAX,
) -> np.ndarray:
    """Triangular HTK-mel filters as a ``[n_fft // 2 + 1, n_mels]`` float32 matrix."""
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= {sample_rate / 2} Hz, got fmin={fmin}, fmax={fmax}")
    bin_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    weights = np.clip(np.minimum(rising, falling), 0.0, None)
    if np.any(weights.sum(axis=1) == 0):
        raise ValueError(f"{n_mels} mel bands over {fmin}-{fmax} Hz leave some band with no FFT bin; "
                         f"use fewer bands or a larger n_fft than {n_fft}")
    return weights.T.astype(np.float32)


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (the STFT convention, same as ``torch.hann_window``)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float64)


def dft_basis(n_fft: int = N_FFT) -> np.ndarray:
    """Windowed real-DFT basis ``[2 * (n_fft // 2 + 1), n_fft]``: cosine rows, then -sine rows."""
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    angle = 2.0 * np.pi * k * n / n_fft
    basis = np.concatenate([np.cos(angle), -np.sin(angle)], axis=0) * hann_window(n_fft)[None, :]
    return basis.astype(np.float32)


def num_frames(samples: int) -> int:
    """Frames the front end yields for ``samples`` samples (edges zero-padded by ``N_FFT // 2``)."""
    return samples // HOP + 1


class LogMel(nn.Module):
    """Raw 16 kHz waveform ``[batch, samples]`` to log-mel ``[batch, frames, n_mels]``.

    Zero padding of half a window at both ends centres the frames (like ``torch.stft``'s
    ``center=True``) and lets any length >= 1 sample produce at least one frame.
    """

    basis: torch.Tensor
    mel: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("basis", torch.from_numpy(dft_basis())[:, None, :], persistent=False)
        self.register_buffer("mel", torch.from_numpy(mel_filterbank()), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be [batch, samples], got shape {list(waveform.shape)}")
        return self.framed(F.pad(waveform, (N_FFT // 2, N_FFT // 2)))

    def framed(self, padded: torch.Tensor) -> torch.Tensor:
        """Log-mel of every ``N_FFT`` window at multiples of ``HOP`` in ``[batch, samples]`` (no padding
        added): the streaming model (models/speech_stream.py) frames its carried samples with it."""
        spec = F.conv1d(padded[:, None, :], self.basis, stride=HOP)  # [batch, 2 * bins, frames]
        bins = N_FFT // 2 + 1
        power = spec[:, :bins] ** 2 + spec[:, bins:] ** 2
        return torch.log(torch.matmul(power.transpose(1, 2), self.mel) + LOG_EPS)


def log_mel_reference(waveform: np.ndarray) -> np.ndarray:
    """NumPy reference of ``LogMel`` (framing + ``np.fft.rfft``), float64 throughout."""
    waveform = np.asarray(waveform, dtype=np.float64)
    if waveform.ndim != 2:
        raise ValueError(f"waveform must be [batch, samples], got shape {list(waveform.shape)}")
    padded = np.pad(waveform, ((0, 0), (N_FFT // 2, N_FFT // 2)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=1)[:, ::HOP]
    power = np.abs(np.fft.rfft(frames * hann_window(N_FFT), axis=-1)) ** 2
    return np.log(power @ mel_filterbank().astype(np.float64) + LOG_EPS)

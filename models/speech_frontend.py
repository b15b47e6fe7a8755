"""Log-mel front end of the speech model, computed inside the exported graph.

The STFT is a strided ``conv1d`` with a fixed, windowed DFT basis rather than ``torch.stft``:
both export with the dynamo exporter (opset 18 ``STFT``), but in ONNX Runtime, which serves the
model, the conv form costs half the CPU time (4.1 ms vs 7.6 ms for 17 one-second clips, one
thread), and ``Conv`` is supported by every runtime and optimiser. (In PyTorch ``torch.stft`` is
faster, but the front end is under a tenth of a training step.) Its constants, filterbank and
basis come from ``service/processing/logmel.py``, the family's one definition of the features,
whose NumPy ``log_mel`` (``np.fft.rfft``) is also the front end servers and edge bundles run before
a features-input graph, and the reference tests check this graph against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.processing.logmel import (  # noqa: F401  (re-exported: the family's data code imports them here)
    FMAX,
    FMIN,
    HOP,
    LOG_EPS,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    dft_basis,
    hann_window,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    num_frames,
)
from service.processing.logmel import log_mel as log_mel_reference  # noqa: F401


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

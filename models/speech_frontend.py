"""Log-mel front end of the speech model, computed inside the exported graph.

The features are those of ``service/processing/logmel.py``, the family's one definition (constants,
filterbank, windowed DFT basis; its NumPy ``log_mel`` is also the front end servers and edge bundles run
before a features-input graph, and the reference the tests check this graph against). Only the arithmetic
is arranged for ONNX Runtime's CPU kernels, where the front end was about two thirds or more of the served
graph's time at batch 32 (per-node profile: ``python -m export.speech_profile``; docs/BENCHMARKS.md, "Speech
front end in the graph, round 3"):

* the first two steps of a radix-2 FFT, done with matrices: with ``A_r[j]`` the windowed DFT at bin ``j`` of a
  frame's samples ``n = r (mod 4)`` (window and twiddles folded into four quarter-size bases), every
  ``j <= N_FFT/8`` gives four bins at once: ``|X[j]| = |S0 + S1|``, ``|X[N/2 - j]| = |S0 - S1|``,
  ``|X[N/4 + j]| = |D0 - i D1|``, ``|X[N/4 - j]| = |D0 + i D1|``, where ``S0, D0 = A0 +- A2`` and
  ``S1, D1 = A1 +- A3`` (``X[N - k]`` is the conjugate of ``X[k]`` for a real frame). A quarter of the full
  DFT's multiply-adds; the ``+-i`` is a swap of ``D1``'s real and imaginary halves, whose signs vanish in
  the squares, which the mel weights sort back to bins (``radix4_dft``);
* framing by reshapes: the four sample phases are four streams with hop ``HOP/4``, cut into hop-long chunks,
  a frame is one chunk plus the head of the next (no Gather, no im2col);
* every frame of the batch in one MatMul per phase (ORT's GEMM wants the long ``batch * frames`` side;
  the ``Conv`` form ran a short GEMM per clip), then power and mel as one small MatMul.
Radix 2 (two phases, half the multiply-adds) measured 1.5x slower than this at batch 32; a further split
needs complex twiddles between the steps. The earlier form (the windowed DFT as one strided ``Conv``) gives
the same features to float rounding (tests/test_speech_frontend_graph.py); ``torch.stft`` exports as
opset-18 ``STFT``, slower than that Conv in ORT. In PyTorch, where it only serves training, this form takes
1.1x the Conv form's time (batch 64, one thread: 23 vs 21 ms, about 1% of a training step).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
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

HALF = N_FFT // 2
QUARTER = N_FFT // 4
EIGHTH = N_FFT // 8
PHASES = 4
# Zeros past the right edge so that a whole number of hop-long chunks always covers the frames.
TAIL = 2 * HOP - N_FFT
if HOP % PHASES or N_FFT % 8 or not HALF <= HOP <= N_FFT:
    raise ValueError(f"the radix-4 front end needs HOP divisible by 4 in [N_FFT/2, N_FFT] and N_FFT by 8, "
                     f"got HOP={HOP}, N_FFT={N_FFT}")


def radix4_dft() -> tuple[np.ndarray, np.ndarray]:
    """The front end's constants, from ``dft_basis`` and ``mel_filterbank``.

    Returns ``bases [4, N_FFT/4, 2m]``: the windowed DFT basis' rows for samples ``n = r (mod 4)``, at the
    ``m`` bins ``j = 0 .. N_FFT/8`` (cosine columns, then sine columns); and ``mel [8m, N_MELS]``: the mel
    weights of the squared columns of ``[S0 + S1, S0 - S1, D0 + D1', D0 - D1']`` (``D1'``: ``D1`` with its
    halves swapped), each bin counted once (``j = 0`` and ``j = N_FFT/8`` meet bins of the other groups).
    """
    mel = mel_filterbank().astype(np.float64)
    j = np.arange(EIGHTH + 1)
    bins = N_FFT // 2 + 1
    basis = dft_basis().astype(np.float64)[np.concatenate([j, j + bins])].T  # [N_FFT, 2m]
    bases = np.stack([basis[r::PHASES] for r in range(PHASES)])
    up = np.where((j == EIGHTH)[:, None], 0.0, mel[QUARTER + j])  # bin N/4 + j; j = N/8 is S0 - S1's bin
    down = np.where(((j == 0) | (j == EIGHTH))[:, None], 0.0, mel[QUARTER - j])  # j = 0: bin N/4 again
    # (a+d)^2 + (b-c)^2 = |D0 - i D1|^2 and (a-d)^2 + (b+c)^2 = |D0 + i D1|^2, D0 = a+ib, D1 = c+id.
    weights = np.concatenate([mel[j], mel[j], mel[HALF - j], mel[HALF - j], up, down, down, up])
    return bases.astype(np.float32), weights.astype(np.float32)


class LogMel(nn.Module):
    """Raw 16 kHz waveform ``[batch, samples]`` to log-mel ``[batch, frames, n_mels]``.

    Zero padding of half a window at both ends centres the frames (like ``torch.stft``'s
    ``center=True``) and lets any length >= 1 sample produce at least one frame.
    """

    bases: torch.Tensor
    mel_parts: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        bases, mel_parts = radix4_dft()
        self.register_buffer("bases", torch.from_numpy(bases), persistent=False)
        self.register_buffer("mel_parts", torch.from_numpy(mel_parts), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be [batch, samples], got shape {list(waveform.shape)}")
        frames = waveform.shape[1] // HOP + 1
        return self._log_mel(F.pad(waveform, (HALF, HALF + TAIL)), frames=frames)

    def framed(self, padded: torch.Tensor) -> torch.Tensor:
        """Log-mel of every ``N_FFT`` window at multiples of ``HOP`` in ``[batch, samples]`` (no padding
        added): the streaming model (models/speech_stream.py) frames its carried samples with it."""
        frames = (padded.shape[1] - N_FFT) // HOP + 1
        return self._log_mel(F.pad(padded, (0, TAIL)), frames=frames)

    def _log_mel(self, padded: torch.Tensor, *, frames: int) -> torch.Tensor:
        """``padded`` holds at least ``(frames + 1) * HOP`` samples (frame ``i`` starts at ``i * HOP``)."""
        batch, step, width = padded.shape[0], HOP // PHASES, N_FFT // PHASES
        chunks = (padded[:, :(frames + 1) * HOP].reshape(batch, (frames + 1) * step, PHASES)
                  .permute(2, 0, 1).reshape(PHASES, batch, frames + 1, step))  # [phase, batch, chunk, step]
        windows = torch.cat([chunks[:, :, :frames], chunks[:, :, 1:, :width - step]], dim=3)
        a = windows.reshape(PHASES, batch * frames, width) @ self.bases  # [phase, batch * frames, 2m]
        s0, d0, s1, d1 = a[0] + a[2], a[0] - a[2], a[1] + a[3], a[1] - a[3]
        m = d1.shape[1] // 2
        d1_swapped = torch.cat([d1[:, m:], d1[:, :m]], dim=1)
        parts = torch.cat([s0 + s1, s0 - s1, d0 + d1_swapped, d0 - d1_swapped], dim=1)
        power = (parts * parts) @ self.mel_parts
        # Shaped before the Log: its output is the log-mel tensor export/speech_split.py cuts the graph at.
        return torch.log(power.reshape(batch, frames, N_MELS) + LOG_EPS)


def graph_frontend(weights: Mapping[str, np.ndarray], *, source: object) -> str:
    """Which form of this front end a published graph's initializers hold: ``"radix4"`` (this module's) or
    ``"conv"`` (the windowed DFT as one strided Conv, exported before; the same features). Raises when the
    graph holds neither, or constants that differ from the family's definition."""
    bases, mel_parts = radix4_dft()
    forms = {"radix4": {"frontend.bases": bases, "frontend.mel_parts": mel_parts},
             "conv": {"frontend.basis": dft_basis()[:, None, :], "frontend.mel": mel_filterbank()}}
    for form, constants in forms.items():
        if not all(name in weights for name in constants):
            continue
        for name, expected in constants.items():
            if weights[name].shape != expected.shape or not np.allclose(weights[name], expected, atol=1e-6):
                raise ValueError(f"{source}: front end {name!r} differs from models.speech_frontend's")
        return form
    raise ValueError(f"{source}: no log-mel front end initializers ({', '.join(forms['radix4'])}, or "
                     f"{', '.join(forms['conv'])}); expected a graph exported by models.speech")

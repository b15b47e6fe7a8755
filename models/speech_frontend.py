"""Log-mel front end of the speech model, computed inside the exported graph.

The features are those of ``service/processing/logmel.py``, the family's one definition (constants,
filterbank, windowed DFT basis; its NumPy ``log_mel`` is also the front end servers and edge bundles run
before a features-input graph, and the reference the tests check this graph against). Only the arithmetic
is arranged for ONNX Runtime's CPU kernels, where the front end used to cost about two thirds of the served
graph at batch 32 (per-node profile: ``python -m export.speech_profile``; docs/BENCHMARKS.md, "Speech front
end in the graph, round 3"):

* one radix-2 step of an FFT, done with matrices: every bin ``j`` and its mirror ``N_FFT/2 - j`` come from
  the same two half-size products, ``P`` over a frame's even samples and ``Q`` over its odd ones (window
  and twiddles folded into the bases): ``|X[j]| = |P + Q|`` and ``|X[N_FFT/2 - j]| = |P - Q|``. Half the
  multiply-adds of the full DFT, and bins whose mel weight is zero everywhere are not computed at all;
* framing by reshapes: the even and odd samples are two streams with hop ``HOP/2``, cut into hop-long
  chunks, a frame is one chunk plus the head of the next (no Gather, no im2col);
* every frame of the batch in one MatMul (ORT's GEMM wants the long ``batch * frames`` side; ``Conv`` ran
  a short GEMM per clip), then power and mel as two small MatMuls.
The previous form (the windowed DFT as one strided ``Conv``) gives the same features to float rounding
(tests/test_speech_frontend_graph.py); ``torch.stft`` exports as opset-18 ``STFT``, slower still in ORT.
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
# Zeros past the right edge so that a whole number of hop-long chunks always covers the frames.
TAIL = 2 * HOP - N_FFT
if HOP % 2 or not HALF <= HOP <= N_FFT or N_FFT % 4:
    raise ValueError(f"the split DFT needs an even HOP in [N_FFT/2, N_FFT] and N_FFT divisible by 4, "
                     f"got HOP={HOP}, N_FFT={N_FFT}")


def split_dft() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The front end's constants, from ``dft_basis`` and ``mel_filterbank``.

    Returns ``bases [2, N_FFT/2, 2k]`` (even-sample rows, odd-sample rows of the windowed DFT basis, for
    the ``k`` bins ``j <= N_FFT/4`` whose pair ``(j, N_FFT/2 - j)`` has a mel weight; cosine columns then
    sine columns), and the mel weights ``[2k, N_MELS]`` of ``|P + Q|^2`` (bin ``j``) and of ``|P - Q|^2``
    (bin ``N_FFT/2 - j``; zero at ``j = N_FFT/4``, its own mirror, counted once).
    """
    mel = mel_filterbank().astype(np.float64)
    j = np.arange(QUARTER + 1)
    used = mel.sum(axis=1) > 0
    j = j[used[j] | used[HALF - j]]
    bins = N_FFT // 2 + 1
    basis = dft_basis().astype(np.float64)[np.concatenate([j, j + bins])].T  # [N_FFT, 2k]
    bases = np.stack([basis[0::2], basis[1::2]])
    mirror = np.where((j == QUARTER)[:, None], 0.0, mel[HALF - j])
    return (bases.astype(np.float32), np.concatenate([mel[j], mel[j]]).astype(np.float32),
            np.concatenate([mirror, mirror]).astype(np.float32))


class LogMel(nn.Module):
    """Raw 16 kHz waveform ``[batch, samples]`` to log-mel ``[batch, frames, n_mels]``.

    Zero padding of half a window at both ends centres the frames (like ``torch.stft``'s
    ``center=True``) and lets any length >= 1 sample produce at least one frame.
    """

    bases: torch.Tensor
    mel_sum: torch.Tensor
    mel_diff: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        bases, mel_sum, mel_diff = split_dft()
        self.register_buffer("bases", torch.from_numpy(bases), persistent=False)
        self.register_buffer("mel_sum", torch.from_numpy(mel_sum), persistent=False)
        self.register_buffer("mel_diff", torch.from_numpy(mel_diff), persistent=False)

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
        batch, step = padded.shape[0], HOP // 2
        chunks = (padded[:, :(frames + 1) * HOP].reshape(batch, (frames + 1) * step, 2)
                  .permute(2, 0, 1).reshape(2, batch, frames + 1, step))  # [even/odd, batch, chunk, step]
        windows = torch.cat([chunks[:, :, :frames], chunks[:, :, 1:, :HALF - step]], dim=3)
        pq = windows.reshape(2, batch * frames, HALF) @ self.bases  # [2, batch * frames, 2k]
        plus, minus = pq[0] + pq[1], pq[0] - pq[1]
        power = (plus * plus) @ self.mel_sum + (minus * minus) @ self.mel_diff
        # Shaped before the Log: its output is the log-mel tensor export/speech_split.py cuts the graph at.
        return torch.log(power.reshape(batch, frames, N_MELS) + LOG_EPS)


def graph_frontend(weights: Mapping[str, np.ndarray], *, source: object) -> str:
    """Which form of this front end a published graph's initializers hold: ``"split"`` (this module's) or
    ``"conv"`` (the windowed DFT as one strided Conv, exported before; the same features). Raises when the
    graph holds neither, or constants that differ from the family's definition."""
    bases, mel_sum, mel_diff = split_dft()
    forms = {"split": {"frontend.bases": bases, "frontend.mel_sum": mel_sum, "frontend.mel_diff": mel_diff},
             "conv": {"frontend.basis": dft_basis()[:, None, :], "frontend.mel": mel_filterbank()}}
    for form, constants in forms.items():
        if not all(name in weights for name in constants):
            continue
        for name, expected in constants.items():
            if weights[name].shape != expected.shape or not np.allclose(weights[name], expected, atol=1e-6):
                raise ValueError(f"{source}: front end {name!r} differs from models.speech_frontend's")
        return form
    raise ValueError(f"{source}: no log-mel front end initializers ({', '.join(forms['split'])}, or "
                     f"{', '.join(forms['conv'])}); expected a graph exported by models.speech")

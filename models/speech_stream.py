"""``speech-stream``: the ``speech`` keyword spotter as a stateful model, fed audio a chunk at a time.

Triton's sequence batching with implicit state carries everything between a sequence's requests, so a
client sends 100 ms chunks (1600 samples of 16 kHz FP32 PCM; any length works, the last may be short) with
``sequence_id``/``sequence_start``/``sequence_end`` and gets back, after every chunk, the class scores of
the whole-clip model over the audio seen so far; after the last chunk they are the whole-clip scores.

State carried per sequence (config.pbtxt ``state``), exact by construction:
  * ``pending_audio`` [512]: the samples of the next STFT window not yet complete (the window overlap and
    the hop phase: anything from 192 to 511 samples), left zero padding included at START;
  * ``counts`` INT32 [2]: pending samples - 256, frames finalised so far;
  * ``log_mel`` [frames, 40]: the log-mel frames of the clip so far (each computed once).
Every request frames only its new samples (plus one provisional last frame over the right zero padding,
recomputed once real samples arrive), then runs the DS-CNN over the frames held.

NOTE: why the DS-CNN is not carried layer by layer (each conv's last k-1 frames + a running pooled sum).
The ``speech`` model removes the per-clip mean of the log-mel features before its first convolution, and
a ReLU follows that convolution: every output position depends non-linearly on a mean that is only known
when the clip has ended, so no fixed summary of the past reproduces the whole-clip scores. Carrying the
log-mel frames (40 floats per 20 ms) is the smallest state that does; the conv stack is re-run over the
frames held (up to the fullest row of the batch, masked per row), which costs at most one whole-clip
inference of the audio so far per chunk (measured: docs/BENCHMARKS.md).
Streams longer than ``--max-seconds`` (default 2 s; the model is trained on 1 s clips) are scored on
their first ``max_seconds``.

    python -m models.speech_stream --model-repository REPO   # derive REPO/speech-stream from REPO/speech
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from models.common import export_onnx
from models.speech_frontend import HOP, N_FFT, N_MELS, SAMPLE_RATE, LogMel, graph_frontend
from service.modelrepo.card import read_card
from service.modelrepo.publish import publish
from service.modelrepo.sessions import create_session

NAME = "speech-stream"
PARENT = "speech"
CHUNK = SAMPLE_RATE // 10  # 100 ms
PENDING = N_FFT  # the carried samples never reach a whole window
HALF = N_FFT // 2
MAX_SECONDS = 2.0
PARITY_ATOL = 1e-4
INPUTS = ["waveform", "START", "END", "READY", "pending_audio_in", "counts_in", "log_mel_in"]
OUTPUTS = ["probabilities", "pending_audio_out", "counts_out", "log_mel_out"]


def capacity_frames(max_seconds: float) -> int:
    """Log-mel frames the state holds: those the whole-clip model yields for ``max_seconds`` of audio."""
    return round(max_seconds * SAMPLE_RATE) // HOP + 1


class FoldedBlock(nn.Module):
    """A DS-CNN block with BatchNorm folded into the convolutions (as the exported ``speech`` graph has it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pointwise(F.relu(self.depthwise(x))))


class StreamingKeywordSpotter(nn.Module):
    """One step of a sequence: (chunk, controls, state) -> (scores so far, next state). Batch = sequences."""

    def __init__(self, *, stem: nn.Conv2d, blocks: list[FoldedBlock], head: nn.Linear, capacity: int) -> None:
        super().__init__()
        self.frontend = LogMel()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head
        self.capacity = capacity

    def forward(self, waveform: torch.Tensor, start: torch.Tensor, end: torch.Tensor, ready: torch.Tensor,
                pending_audio: torch.Tensor, counts: torch.Tensor, log_mel: torch.Tensor,
                ) -> tuple[torch.Tensor, ...]:
        fresh = start != 0  # [batch, 1]; the server also zeroes state on START, this makes it explicit
        pending_audio = torch.where(fresh, 0.0, pending_audio)
        counts = torch.where(fresh, 0, counts)
        log_mel = torch.where(fresh[:, :, None], 0.0, log_mel)
        have = counts[:, :1] + HALF  # carried samples: window overlap + hop phase
        done = counts[:, 1:2]  # frames finalised before this chunk
        joined = self._join(pending_audio, waveform, have)
        frames = self.frontend.framed(joined)  # [batch, k, mels]: frame j starts at joined[j * HOP]
        total = have + torch.ones_like(waveform).sum(dim=1, keepdim=True).to(have.dtype)
        final = torch.clamp(torch.div(total - N_FFT, HOP, rounding_mode="floor") + 1, min=0)
        provisional = (final * HOP <= total - HALF).to(final.dtype)  # a last frame over the right zero padding
        held = self._write(log_mel, frames, at=done, count=final + provisional)
        scores = self._classify(held, frames_seen=torch.clamp(done + final + provisional, max=self.capacity))
        next_audio = torch.gather(joined, 1, final * HOP + torch.arange(PENDING, device=joined.device)[None, :])
        next_counts = torch.cat([total - final * HOP - HALF, done + final], dim=1)
        keep = (ready != 0) & (end == 0)  # not ready: state unchanged; END: the sequence is over, clear it
        cleared = end != 0
        outs = []
        for new, old in ((next_audio, pending_audio), (next_counts, counts)):
            outs.append(torch.where(keep, new, torch.where(cleared, torch.zeros_like(old), old)))
        outs.append(torch.where(keep[:, :, None], held, torch.where(cleared[:, :, None], 0.0, log_mel)))
        return scores, outs[0], outs[1], outs[2]

    @staticmethod
    def _join(pending_audio: torch.Tensor, waveform: torch.Tensor, have: torch.Tensor) -> torch.Tensor:
        """``pending_audio[:have] + waveform`` then zeros, per row (rows carry different amounts), long
        enough for every complete window and the provisional one."""
        length = PENDING + waveform.shape[1] + HOP
        source = torch.cat([pending_audio, waveform, torch.zeros_like(pending_audio[:, :1]).expand(-1, length)], 1)
        pos = torch.arange(length, device=waveform.device)[None, :]
        return torch.gather(source, 1, torch.where(pos < have, pos, pos - have + PENDING))

    def _write(self, log_mel: torch.Tensor, frames: torch.Tensor, *, at: torch.Tensor,
               count: torch.Tensor) -> torch.Tensor:
        """``log_mel`` with rows ``at .. at+count-1`` replaced by ``frames[0 .. count-1]`` (past capacity: dropped)."""
        rel = torch.arange(self.capacity, device=frames.device)[None, :] - at  # [batch, capacity]
        take = (rel >= 0) & (rel < count)
        index = torch.clamp(rel, 0, frames.shape[1] - 1)[:, :, None].expand(-1, -1, N_MELS)
        return torch.where(take[:, :, None], torch.gather(frames, 1, index), log_mel)

    def _classify(self, log_mel: torch.Tensor, *, frames_seen: torch.Tensor) -> torch.Tensor:
        """The whole-clip network over the first ``frames_seen`` frames of each row; zeros past them stand
        for the convolutions' zero padding, so every kept position sees what the whole-clip model sees."""
        seen = torch.clamp(frames_seen, min=1).to(log_mel.dtype)  # idle rows (READY 0) hold no frame
        # Only the frames the fullest row holds: early in a stream that is a fraction of the capacity.
        longest = torch.clamp(frames_seen.max(), 1, self.capacity).item()
        torch._check(longest >= 1)
        torch._check(longest <= self.capacity)
        log_mel = log_mel[:, :longest]
        valid = (torch.arange(longest, device=log_mel.device)[None, :] < frames_seen)[:, :, None]
        mean = (log_mel * valid).sum(dim=(1, 2)) / (seen[:, 0] * N_MELS)
        x = F.relu(self.stem(((log_mel - mean[:, None, None]) * valid)[:, None]))
        rows = torch.div(frames_seen, 2, rounding_mode="floor") + 1  # the stem's stride-2 output length
        kept = (torch.arange(x.shape[2], device=x.device)[None, :] < rows)[:, None, :, None].to(x.dtype)
        x = x * kept
        for block in self.blocks:
            x = block(x) * kept
        pooled = x.sum(dim=(2, 3)) / (rows.to(x.dtype) * x.shape[3])
        return torch.softmax(self.head(pooled), dim=-1)


def _weights(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def load_folded(onnx_path: Path) -> tuple[nn.Conv2d, list[FoldedBlock], nn.Linear]:
    """The DS-CNN of a published ``speech`` graph (BatchNorm already folded): stem, blocks, head. Checks
    that the graph's front end computes models.speech_frontend's features (either form it was exported in)."""
    w = _weights(onnx.load(str(onnx_path)).graph)

    def conv(prefix: str, module: nn.Conv2d) -> nn.Conv2d:
        # NOTE: a trained export names the folded BatchNorm shift "<conv>.weight_bias"; a re-export of folded
        # convolutions (models/speech_refront.py) names it "<conv>.bias".
        bias = f"{prefix}.weight_bias" if f"{prefix}.weight_bias" in w else f"{prefix}.bias"
        for attr, key in (("weight", f"{prefix}.weight"), ("bias", bias)):
            if key not in w:
                raise ValueError(f"{onnx_path}: no initializer {key!r}; expected a graph exported by "
                                 "models.speech (DS-CNN with BatchNorm folded into its convolutions)")
            getattr(module, attr).data = torch.from_numpy(w[key].copy())
        return module

    channels = w["stem.0.weight"].shape[0] if "stem.0.weight" in w else 0
    blocks = sum(1 for k in w if k.startswith("blocks.") and k.endswith(".depthwise.weight"))
    stem = conv("stem.0", nn.Conv2d(1, channels, (10, 4), stride=2, padding=(5, 1)))
    folded = [FoldedBlock(channels) for _ in range(blocks)]
    for i, block in enumerate(folded):
        conv(f"blocks.{i}.depthwise", block.depthwise)
        conv(f"blocks.{i}.pointwise", block.pointwise)
    head = nn.Linear(channels, w["head.weight"].shape[0])
    head.weight.data, head.bias.data = torch.from_numpy(w["head.weight"].copy()), torch.from_numpy(w["head.bias"].copy())
    graph_frontend(w, source=onnx_path)  # the front end is rebuilt from models.speech_frontend: it must agree
    return stem, folded, head


def from_onnx(onnx_path: Path, *, max_seconds: float = MAX_SECONDS) -> StreamingKeywordSpotter:
    """The streaming model with the weights of a published ``speech`` graph (BatchNorm already folded)."""
    stem, folded, head = load_folded(onnx_path)
    return StreamingKeywordSpotter(stem=stem, blocks=folded, head=head, capacity=capacity_frames(max_seconds)).eval()


def export(model: StreamingKeywordSpotter, onnx_path: Path) -> Path:
    """ONNX with dynamic batch (sequences) and chunk length axes."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    samples = torch.export.Dim("samples", min=1, max=10 * SAMPLE_RATE)
    example = example_step(model, batch=2, samples=CHUNK)
    shapes = {"waveform": {0: batch, 1: samples},
              **{name: {0: batch} for name in ("start", "end", "ready", "pending_audio", "counts", "log_mel")}}
    return export_onnx(model, example, onnx_path, input_names=INPUTS, output_names=OUTPUTS, dynamic_shapes=shapes)


def example_step(model: StreamingKeywordSpotter, *, batch: int, samples: int) -> tuple[torch.Tensor, ...]:
    # NOTE: one tensor per input: torch.export treats the same tensor passed twice as one input.
    def flag(value: int) -> torch.Tensor:
        return torch.full((batch, 1), value, dtype=torch.int32)

    return (torch.zeros(batch, samples), flag(1), flag(0), flag(1), torch.zeros(batch, PENDING),
            torch.zeros(batch, 2, dtype=torch.int32), torch.zeros(batch, model.capacity, N_MELS))


def stream_scores(session: Any, clips: list[np.ndarray], *, chunk: int = CHUNK) -> np.ndarray:
    """Final scores of each clip streamed ``chunk`` samples at a time through the streaming graph, the clips
    as concurrent sequences: each step batches the rows whose next chunk has the same length."""
    capacity = session.get_inputs()[INPUTS.index("log_mel_in")].shape[1]
    state = [np.zeros((len(clips), PENDING), np.float32), np.zeros((len(clips), 2), np.int32),
             np.zeros((len(clips), capacity, N_MELS), np.float32)]
    final = np.zeros((len(clips), session.get_outputs()[0].shape[1]), np.float32)
    for step in range(max(-(-len(c) // chunk) for c in clips)):
        parts = [np.asarray(c[step * chunk:(step + 1) * chunk], np.float32) for c in clips]
        for length in sorted({len(p) for p in parts if len(p)}):
            rows = [i for i, p in enumerate(parts) if len(p) == length]
            flags = np.full((len(rows), 1), int(step == 0), np.int32)
            feeds = dict(zip(INPUTS, [np.stack([parts[i] for i in rows]), flags, flags * 0, flags * 0 + 1,
                                      *(a[rows] for a in state)]))
            out = session.run(None, feeds)
            final[rows] = out[0]
            for held, new in zip(state, out[1:]):
                held[rows] = new
    return final


def config_pbtxt(*, capacity: int, classes: int) -> str:
    """Triton's sequence batching with implicit state: the server feeds START/END/READY and the states."""
    def control(name: str, kind: str) -> str:
        return f'{{ name: "{name}" control [ {{ kind: CONTROL_SEQUENCE_{kind} int32_false_true: [ 0, 1 ] }} ] }}'

    def state(name: str, dtype: str, dims: list[int]) -> str:
        return (f'{{ input_name: "{name}_in" output_name: "{name}_out" data_type: {dtype} '
                f'dims: [ {", ".join(map(str, dims))} ] }}')

    return f"""name: "{NAME}"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ {{ name: "waveform" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ {classes} ] label_filename: "labels.txt" }} ]
sequence_batching {{
  max_sequence_idle_microseconds: 5000000
  oldest {{ max_queue_delay_microseconds: 0 }}
  control_input [
    {control("START", "START")},
    {control("END", "END")},
    {control("READY", "READY")}
  ]
  state [
    {state("pending_audio", "TYPE_FP32", [PENDING])},
    {state("counts", "TYPE_INT32", [2])},
    {state("log_mel", "TYPE_FP32", [capacity, N_MELS])}
  ]
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def check_parity(stream_path: Path, whole_path: Path, clips: list[np.ndarray]) -> dict:
    """Streamed (100 ms chunks, and odd 777-sample ones) vs whole-clip final scores; raises if they differ."""
    stream, whole = create_session(stream_path), create_session(whole_path)
    reference = np.concatenate([whole.run(None, {"waveform": c[None]})[0] for c in clips])
    worst = 0.0
    for chunk in (CHUNK, 777):
        worst = max(worst, float(np.abs(stream_scores(stream, clips, chunk=chunk) - reference).max()))
    if worst > PARITY_ATOL:
        raise ValueError(f"{NAME}: streamed scores differ from {PARENT}'s by {worst:.2e} (> {PARITY_ATOL})")
    return {"cases": [[1, len(c)] for c in clips], "max_abs_diff": worst, "atol": PARITY_ATOL, "rtol": 0.0,
            "against": f"{PARENT} (whole clip), chunks of {CHUNK} and 777 samples"}


def parity_clips(held_out: np.ndarray | None) -> list[np.ndarray]:
    """Held-out clips where the build has them, and random audio of awkward lengths either way."""
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (1, 300, 4_321, 16_000, 25_601)]
    return clips + ([] if held_out is None else [np.asarray(c, np.float32) for c in held_out[:8]])


def card(parent: dict, *, parity: dict, capacity: int) -> dict:
    spec = dict(parent.get("input_spec", {}))
    spec.update({"shape": [1, -1], "chunk_samples": CHUNK, "max_stream_samples": (capacity - 1) * HOP,
                 "sequence": "sequence_id on every request, sequence_start on the first, sequence_end on the last"})
    return {**{k: parent[k] for k in ("data", "split", "parameters", "metrics", "profile", "seed")
               if k in parent},
            "family": PARENT, "variant": "stream", "parent": PARENT,
            "task": "streaming keyword spotting: 100 ms chunks, state kept by the server (sequence batching)",
            "parity": parity, "input_spec": spec, "build_seconds": parent.get("build_seconds", 0.0),
            "labels": parent.get("labels", [])}


def card_markdown(c: dict) -> str:
    return f"""# {NAME}: keyword spotting over streamed audio

The `{PARENT}` model (same weights) as a Triton sequence model with implicit state: send 16 kHz mono FP32 audio
`waveform` `[1, samples]` a chunk at a time ({CHUNK} samples = 100 ms; any length works, the last may be
short) with `sequence_id` on every request, `sequence_start` on the first and `sequence_end` on the last.
Each response holds `probabilities` over the audio seen so far: exactly what `{PARENT}` returns for that
audio (max abs difference {c["parity"]["max_abs_diff"]:.1e} on the parity clips). Streams longer than
{c["input_spec"]["max_stream_samples"] / SAMPLE_RATE:g} s are scored on their first
{c["input_spec"]["max_stream_samples"] / SAMPLE_RATE:g} s. How the state works: `models/speech_stream.py`.
"""


def publish_stream(*, repo_dir: Path, held_out: np.ndarray | None = None,
                   max_seconds: float = MAX_SECONDS) -> dict:
    """Derive ``speech-stream`` from the published ``speech`` in ``repo_dir``, check it, publish it."""
    parent_dir = Path(repo_dir) / PARENT
    whole = parent_dir / "1" / "model.onnx"
    model = from_onnx(whole, max_seconds=max_seconds)
    labels = (parent_dir / "labels.txt").read_text().split()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export(model, Path(tmp) / "model.onnx")
        parity = check_parity(onnx_path, whole, parity_clips(held_out))
        c = card(read_card(parent_dir), parity=parity, capacity=model.capacity)
        publish(repo_dir=Path(repo_dir), name=NAME, onnx_path=onnx_path, card=c, card_md=card_markdown(c),
                config_pbtxt=config_pbtxt(capacity=model.capacity, classes=len(labels)), labels=labels)
    return parity


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.speech_stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS)
    args = parser.parse_args(argv)
    parity = publish_stream(repo_dir=args.model_repository, max_seconds=args.max_seconds)
    print(f"{NAME}: streamed vs whole-clip max |diff| {parity['max_abs_diff']:.2e} -> "
          f"{args.model_repository / NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

"""Export, parity check, model card and publication of the ``speech`` model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import speech_data as sd
from models.common import count_parameters, export_onnx, parity_check
from models.speech_frontend import FMAX, FMIN, HOP, N_FFT, N_MELS, SAMPLE_RATE
from service.modelrepo.publish import publish

NAME = "speech"
PARITY_BATCHES = (1, 3, 17)
PARITY_LENGTHS = (16_000, 12_000)
# NOTE: export-time bounds only; the ONNX graph has a symbolic axis and was checked on 1 to 600,000
# samples (tests cover short and long inputs).
MAX_SAMPLES = 30 * SAMPLE_RATE


def export_and_check(model: nn.Module, clips: np.ndarray, *, onnx_path: Path) -> dict:
    """Export with dynamic batch and samples axes, then compare ORT with PyTorch on real test clips
    at batch sizes 1, 3, 17 and two lengths (full second and a 0.75 s crop)."""
    if len(clips) < max(PARITY_BATCHES):
        raise ValueError(f"parity needs at least {max(PARITY_BATCHES)} test clips, got {len(clips)}")
    dims = {0: torch.export.Dim("batch", min=1, max=4096),
            1: torch.export.Dim("samples", min=N_FFT, max=MAX_SAMPLES)}
    export_onnx(model, (torch.from_numpy(clips[:3]),), onnx_path, input_names=["waveform"],
                output_names=["probabilities"], dynamic_shapes={"waveform": dims})
    cases: list[tuple[np.ndarray, ...]] = [
        (np.ascontiguousarray(clips[:n, :length]),) for length in PARITY_LENGTHS for n in PARITY_BATCHES]
    return parity_check(model, onnx_path, cases, atol=1e-4, rtol=1e-3)


def config_pbtxt() -> str:
    return f"""name: "{NAME}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ {{ name: "waveform" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ {len(sd.LABELS)} ] label_filename: "labels.txt" }} ]
dynamic_batching {{ preferred_batch_size: [ 8, 16 ] max_queue_delay_microseconds: 1000 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def model_card(
    *, corpus: sd.Corpus, model: nn.Module, metrics: dict, per_class: dict, parity: dict, hyper: object,
    train_clips: int, build_seconds: float, profile: str, seed: int,
) -> dict:
    desc = corpus.description
    return {
        "family": NAME,
        "task": "keyword spotting (Speech Commands label set: 10 keywords, _silence_, _unknown_)",
        "data": desc["data"],
        "split": f"{desc['split']}; {train_clips} train utterances, {int(metrics['test_clips'])} test clips",
        "parameters": count_parameters(model),
        "metrics": metrics,
        "per_class_accuracy": per_class,
        "parity": parity,
        "input_spec": {
            "name": "waveform", "shape": [-1, -1], "dtype": "FP32", "sample_rate": SAMPLE_RATE,
            "channels": 1, "scaling": "PCM / 32768, in [-1, 1]", "trained_samples": sd.CLIP_SAMPLES,
            "min_samples": 1,
            "frontend": {"n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "fmin": FMIN, "fmax": FMAX,
                         "window": "hann", "features": "log(mel power + 1e-6), per-clip mean removed"},
        },
        "labels": list(sd.LABELS),
        "train_voices": desc.get("train_voices", []),
        "test_voices": desc.get("test_voices", []),
        "training": {k: getattr(hyper, k) for k in ("channels", "blocks", "epochs", "batch_size", "lr")},
        "build_seconds": round(build_seconds, 2),
        "profile": profile,
        "seed": seed,
    }


def _non_speech_line(metrics: dict) -> str:
    if "non_speech_no_keyword" not in metrics:
        return ""
    return (f" Clips holding only short non-speech sounds (noise bursts, clicks, beeps of 1 sample to 0.8 s, trained as"
            f" `_silence_`): {metrics['non_speech_no_keyword']:.3f} answered with no keyword"
            f" ({int(metrics['non_speech_clips'])} held-out clips).")


def card_markdown(card: dict) -> str:
    m, p = card["metrics"], card["parity"]
    rows = "\n".join(f"| {name} | {acc:.3f} |" for name, acc in card["per_class_accuracy"].items())
    voices = (f"{len(card['train_voices'])} training voices, {len(card['test_voices'])} held-out test voices "
              f"({', '.join(card['test_voices'][:6])}{', ...' if len(card['test_voices']) > 6 else ''})"
              if card["test_voices"] else "speakers as split by the data set's testing_list.txt")
    return f"""# speech: keyword spotting (DS-CNN on in-graph log-mel)

- **Task**: {card["task"]}; labels in `labels.txt`.
- **Data**: {card["data"]}; {voices}.
- **Split**: {card["split"]}.
- **Input** `waveform`: FP32 `[batch, samples]`, mono {SAMPLE_RATE} Hz, PCM scaled to [-1, 1]. Trained on
  one-second clips ({sd.CLIP_SAMPLES} samples); other lengths work (global average pooling over time).
- **Output** `probabilities`: FP32 `[batch, {len(card["labels"])}]`, softmax inside the graph.
- **Model**: log-mel front end inside the graph ({N_FFT}-sample Hann STFT as a split DFT in MatMuls, hop {HOP},
  {N_MELS} mel bands) then a DS-CNN ({card["training"]["channels"]} channels,
  {card["training"]["blocks"]} depthwise-separable blocks), {card["parameters"]:,} parameters.

Held-out accuracy **{m["accuracy"]:.4f}** (keywords only {m["keyword_accuracy"]:.4f}) on
{int(m["test_clips"])} clips.{_non_speech_line(m)}

| class | held-out accuracy |
|---|---|
{rows}

ONNX Runtime vs PyTorch parity: max abs diff {p["max_abs_diff"]:.2e} (atol {p["atol"]:g}) over input shapes
{[c[0] for c in p["cases"]]}. Profile `{card["profile"]}`, seed {card["seed"]}, built in
{card["build_seconds"]:.1f} s.

Limitations: synthetic eSpeak voices are far more uniform than people; expect lower accuracy on real
recordings unless trained with `--data speech_commands:PATH`. Background noise is synthetic too.
"""


def publish_model(*, repo_dir: Path, onnx_path: Path, card: dict) -> Path:
    return publish(repo_dir=repo_dir, name=NAME, onnx_path=onnx_path, config_pbtxt=config_pbtxt(), card=card,
                   card_md=card_markdown(card), labels=list(sd.LABELS))

"""speech family: keyword spotting (Google Speech Commands label set) with a DS-CNN on log-mel features.

Trains on words synthesized with eSpeak NG (``--data synth``, the default; test split = held-out
voices) or on the real Speech Commands folder layout (``--data speech_commands:PATH``). The log-mel
front end is part of the exported graph, so the served model takes raw 16 kHz mono audio
``waveform`` FP32 ``[batch, samples]`` in [-1, 1] (any length; trained on one-second clips) and
returns ``probabilities`` FP32 ``[batch, 12]`` (``labels.txt``). Publishes model ``speech`` and its streaming
form ``speech-stream`` (models/speech_stream.py).

    python -m models.speech --profile default --model-repository model_repository
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models import cache_home, speech_commands, speech_export, speech_stream
from models import speech_data as sd
from models.common import (
    FamilyResult,
    check_profile,
    count_parameters,
    family_parser,
    hyper_overrides,
    optimizer_step,
    set_seed,
    torch_threads,
)
from models.common import recalibrate_batchnorm as common_recalibrate
from models.speech_frontend import LogMel

NAME = "speech"


@dataclass(frozen=True)
class Hyper:
    channels: int
    blocks: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-3
    dropout: float = 0.1
    unknown_ratio: float = 2.0  # _unknown_ clips per epoch, relative to one keyword's count
    # NOTE: one thread by default: on the 2-core machine a 2-thread training step measured slower in
    # wall time than a 1-thread one when idle (0.17 s vs 0.15 s) and 4x slower under load.
    threads: int = 1


HYPER = {
    "tiny": Hyper(channels=16, blocks=2, epochs=2, batch_size=32, lr=5e-3),
    "default": Hyper(channels=48, blocks=4, epochs=10, batch_size=64, lr=3e-3),
}
SYNTH = {
    "tiny": sd.SynthConfig(dialects=("en-us", "en"), train_variants=("m1", "f2", "m4"),
                           test_variants=("m3",), unknown_per_voice=3),
    "default": sd.SynthConfig(dialects=sd.DIALECTS, train_variants=sd.TRAIN_VARIANTS,
                              test_variants=sd.TEST_VARIANTS, keyword_takes=1, unknown_per_voice=8,
                              test_keyword_takes=2),
}


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv then 1x1 pointwise conv, each with BatchNorm and ReLU (the DS-CNN block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.pointwise(F.relu(self.bn1(self.depthwise(x))))))


class KeywordSpotter(nn.Module):
    """waveform ``[batch, samples]`` -> log-mel -> DS-CNN -> global average pool -> class scores.

    Global average pooling over time is what makes any input length valid; the stem's padding
    keeps even a single frame producing an output.
    """

    def __init__(self, *, channels: int, blocks: int, num_classes: int = len(sd.LABELS),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.frontend = LogMel()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, (10, 4), stride=2, padding=(5, 1), bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*(DepthwiseSeparable(channels) for _ in range(blocks)))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def logits(self, waveform: torch.Tensor) -> torch.Tensor:
        feats = self.frontend(waveform)  # [batch, frames, mels]
        # NOTE: per-clip mean removal in the log domain makes the model invariant to input gain.
        feats = feats - feats.mean(dim=(1, 2), keepdim=True)
        x = self.blocks(self.stem(feats[:, None]))
        return self.head(self.dropout(x.mean(dim=(2, 3))))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(waveform), dim=-1)


def train(model: KeywordSpotter, corpus: sd.Corpus, *, hyper: Hyper, aug: sd.Augment, seed: int) -> None:
    """AdamW + one-cycle schedule; every epoch re-composes fresh augmented clips from the utterances."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    clips, labels = sd.compose(corpus.train, rng, noise=corpus.train_noise, aug=aug,
                               unknown_ratio=hyper.unknown_ratio)
    steps_per_epoch = -(-len(labels) // hyper.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hyper.lr,
                                                total_steps=hyper.epochs * steps_per_epoch + 1)
    with tqdm(total=hyper.epochs * steps_per_epoch, desc="speech train", unit="step", leave=False,
              mininterval=1.0) as bar:
        for epoch in range(hyper.epochs):
            if epoch:
                clips, labels = sd.compose(corpus.train, rng, noise=corpus.train_noise, aug=aug,
                                           unknown_ratio=hyper.unknown_ratio)
            model.train()
            x, y = torch.from_numpy(clips), torch.from_numpy(labels)
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), hyper.batch_size):
                idx = order[start:start + hyper.batch_size]
                loss = F.cross_entropy(model.logits(x[idx]), y[idx], label_smoothing=0.05)
                optimizer_step(loss, opt=opt, sched=sched, bar=bar, epoch=epoch + 1)
    recalibrate_batchnorm(model, torch.from_numpy(clips))


def recalibrate_batchnorm(model: KeywordSpotter, clips: torch.Tensor) -> None:
    """Recompute BatchNorm statistics over clean training inputs (see models.common.recalibrate_batchnorm)."""
    common_recalibrate(model, clips, forward=model.logits)


def predict(model: nn.Module, clips: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(clips[i:i + 256])) for i in range(0, len(clips), 256)]).numpy()


def evaluate(model: nn.Module, clips: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], dict]:
    """Held-out accuracy overall, on the ten keywords only, and per class."""
    pred = predict(model, clips).argmax(axis=1)
    keyword = labels >= sd.LABELS.index(sd.KEYWORDS[0])
    per_class = {name: float((pred[labels == i] == i).mean()) for i, name in enumerate(sd.LABELS)
                 if np.any(labels == i)}
    metrics = {"accuracy": float((pred == labels).mean()),
               "keyword_accuracy": float((pred[keyword] == labels[keyword]).mean()),
               "test_clips": float(len(labels))}
    return metrics, per_class


NON_SPEECH_CLIPS = 400  # held-out transient clips (models.speech_data.non_speech_set) the card reports on


def held_out(corpus: sd.Corpus, *, aug: sd.Augment, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out clips and labels (held-out voices over the held-out noise bank), as every build scores them."""
    return sd.compose(corpus.test, np.random.default_rng(seed + 10_007), noise=corpus.test_noise, aug=aug.for_test())


def held_out_non_speech(corpus: sd.Corpus, *, seed: int) -> np.ndarray:
    """Held-out clips of short non-speech sounds over the held-out noise bank (none should get a keyword)."""
    return sd.non_speech_set(np.random.default_rng(seed + 20_011), noise=corpus.test_noise, count=NON_SPEECH_CLIPS)


def evaluate_non_speech(model: nn.Module, corpus: sd.Corpus, *, seed: int) -> dict[str, float]:
    """How often `held_out_non_speech` clips are answered with no keyword."""
    clips = held_out_non_speech(corpus, seed=seed)
    pred = predict(model, clips).argmax(axis=1)
    return {"non_speech_no_keyword": float((pred < sd.LABELS.index(sd.KEYWORDS[0])).mean()),
            "non_speech_clips": float(len(clips))}


def load_corpus(data: str, *, profile: str, seed: int, cache_dir: Path) -> tuple[sd.Corpus, sd.Augment]:
    """``synth`` or ``speech_commands:PATH`` -> utterances plus the augmentation that suits them."""
    if data == "synth":
        return sd.synth_corpus(SYNTH[profile], seed=seed, cache_dir=cache_dir), sd.Augment()
    kind, _, path = data.partition(":")
    if kind == "speech_commands" and path:
        limit = 40 if profile == "tiny" else None
        corpus = speech_commands.load(Path(path), seed=seed, max_per_word=limit)
        # Real clips already fill the second, so shift them (+-100 ms) instead of placing them.
        return corpus, sd.Augment(max_shift=1600, gain_db=(-6.0, 0.0), noise_prob=0.8, snr_db=(0.0, 30.0))
    raise ValueError(f"unknown --data {data!r}: expected 'synth' or 'speech_commands:PATH' "
                     "(a folder with <word>/*.wav, validation_list.txt and testing_list.txt)")


def default_cache_dir() -> Path:
    """Synthesis cache kept across builds when no work dir is given (re-synthesis is the slow part)."""
    return cache_home() / "speech-synth"


def build(*, profile: str, repo_dir: Path, seed: int = 0, work_dir: Path | None = None, data: str = "synth",
          hyper: Hyper | None = None) -> FamilyResult:
    """Train, evaluate on held-out voices, export, parity-check and publish the ``speech`` model."""
    start = time.perf_counter()
    hyper = hyper or HYPER[check_profile(profile)]
    set_seed(seed)
    cache_dir = Path(work_dir) / "speech-synth" if work_dir else default_cache_dir()
    corpus, aug = load_corpus(data, profile=profile, seed=seed, cache_dir=cache_dir)
    model = KeywordSpotter(channels=hyper.channels, blocks=hyper.blocks, dropout=hyper.dropout)
    test_clips, test_labels = held_out(corpus, aug=aug, seed=seed)
    with torch_threads(hyper.threads):
        train(model, corpus, hyper=hyper, aug=aug, seed=seed)
        metrics, per_class = evaluate(model, test_clips, test_labels)
        metrics |= evaluate_non_speech(model, corpus, seed=seed)
    if work_dir:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        parity = speech_export.export_and_check(model, test_clips, onnx_path=Path(tmp) / "model.onnx")
        card = speech_export.model_card(
            corpus=corpus, model=model, metrics=metrics, per_class=per_class, parity=parity, hyper=hyper,
            train_clips=len(corpus.train), build_seconds=time.perf_counter() - start, profile=profile, seed=seed)
        speech_export.publish_model(repo_dir=Path(repo_dir), onnx_path=Path(tmp) / "model.onnx", card=card)
    speech_stream.publish_stream(repo_dir=Path(repo_dir), held_out=test_clips)
    return FamilyResult(NAME, [NAME, speech_stream.NAME], {"accuracy": metrics["accuracy"]}, count_parameters(model),
                        round(time.perf_counter() - start, 2), parity["max_abs_diff"])


def derive(*, repo_dir: Path) -> None:
    """Publish the models derived from a published ``speech`` without training (``speech-stream``)."""
    speech_stream.publish_stream(repo_dir=Path(repo_dir))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = family_parser("speech", __doc__)
    parser.add_argument("--data", default="synth", help="synth | speech_commands:PATH (default: synth)")
    parser.add_argument("--channels", type=int, help="override the profile's DS-CNN width")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for training (default 1)")
    parser.add_argument("--work-dir", type=Path, help="synthesis cache and scratch files "
                        f"(default: cache in {default_cache_dir()})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hyper = replace(HYPER[args.profile], **hyper_overrides(args, "channels", "threads"))
    result = build(profile=args.profile, repo_dir=args.repo, seed=args.seed, work_dir=args.work_dir,
                   data=args.data, hyper=hyper)
    print(f"speech: held-out accuracy {result.metrics['accuracy']:.4f}, {result.parameters:,} parameters, "
          f"parity {result.parity_max_abs_diff:.2e}, {result.build_seconds:.1f} s -> {args.repo / NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

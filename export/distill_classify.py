"""Distilled students of the classification families: a narrower residual CNN and a smaller DS-CNN
keyword spotter, trained on the families' own data pipelines with the teacher's ONNX soft targets.

Students reuse the families' architectures (``models.cnn.ResNetSmall`` at half the width,
``models.speech.KeywordSpotter`` narrower, see ``SPEECH_STUDENT``), so their exported graphs have the teacher's
inputs and outputs and the same preprocessing; they are exported with the families' exporters and parity-checked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.common import check_budget, load_parent
from export.distill_common import (
    LATENCY_BATCH,
    KDSettings,
    StudentResult,
    distill_classifier,
    onnx_teacher,
    side_by_side_latency,
)
from export.heldout import evaluate, load_heldout
from models import cnn, cnn_data, speech, speech_export
from models import speech_data as sd
from models.common import count_parameters, export_onnx, parity_check, set_seed


@dataclass(frozen=True)
class StudentShape:
    """The speech student's DS-CNN relative to its teacher: width fraction and blocks dropped."""

    width: float
    fewer_blocks: int


# NOTE: default-profile history (teacher 48 channels, 4 blocks). Two thirds of the width and one block
# fewer (32 channels, 3 blocks, 12 epochs) ended 5.7 points under the teacher; half width and half the blocks
# (24 channels, 2 blocks) 20 points under. Depth is what the word needs (each block widens the receptive
# field over time), so the student keeps every block and gives up width, trained twice as long.
SPEECH_STUDENT = {"tiny": StudentShape(width=2 / 3, fewer_blocks=1),
                  "default": StudentShape(width=0.75, fewer_blocks=0)}
SETTINGS = {
    "cnn": {"tiny": KDSettings(epochs=1, batch_size=64, lr=1e-2),
            "default": KDSettings(epochs=15, batch_size=64, lr=4e-3)},
    "speech": {"tiny": KDSettings(epochs=1, batch_size=32, lr=5e-3, weight_decay=1e-3),
               "default": KDSettings(epochs=24, batch_size=64, lr=3e-3, weight_decay=1e-3)},
}
LATENCY_REPEATS = {"tiny": 5, "default": 30}


def build(family: str, *, repo_dir: Path, work_dir: Path, profile: str) -> StudentResult:
    start = time.perf_counter()
    parent = load_parent(repo_dir, family)
    set_seed(parent.seed)
    heldout = load_heldout(parent)
    settings = SETTINGS[family][profile]
    train = _train_cnn if family == "cnn" else _train_speech
    student, parity, onnx_path = train(parent, settings=settings, work_dir=work_dir, heldout=heldout)
    metrics = evaluate(parent, onnx_path, heldout)
    teacher_metrics = evaluate(parent, parent.onnx_path, heldout)
    verdict = check_budget(model=family, variant="student", variant_metrics=metrics, fp32_metrics=teacher_metrics)
    latency = side_by_side_latency({"teacher": parent.onnx_path, "student": onnx_path},
                                   heldout.batch(LATENCY_BATCH), repeats=LATENCY_REPEATS[profile])
    details = {"temperature": settings.temperature, "alpha": settings.alpha, "epochs": settings.epochs,
               "lr": settings.lr, "batch_size": settings.batch_size, "parity": parity,
               "teacher": "served FP32 ONNX via ONNX Runtime, log-probabilities as logits",
               "latency_batch": LATENCY_BATCH, "seconds": round(time.perf_counter() - start, 1),
               "speedup": latency["teacher"] / latency["student"], **student.pop("details")}
    return StudentResult(family=family, model=family, onnx_path=onnx_path, metrics=metrics,
                         teacher_metrics=teacher_metrics, parameters=count_parameters(student["model"]),
                         teacher_parameters=int(parent.card["parameters"]), within_budget=verdict.ok,
                         budget=verdict.budget, latency_ms=latency, details=details)


def _train_cnn(parent, *, settings: KDSettings, work_dir: Path, heldout) -> tuple[dict, dict, Path]:
    hyper = cnn.HYPER[parent.profile]
    x_tr, y_tr, x_te, _ = cnn.split(cnn_data.load("digits"), hyper=hyper, seed=parent.seed)
    width = max(2, int(parent.card.get("training", {}).get("width", hyper.width)) // 2)
    student = cnn.ResNetSmall(width=width, num_classes=len(parent.card["labels"]))
    images, labels = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(parent.seed)
    bs = settings.batch_size

    def epochs(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Same augmentation as the teacher's training; the teacher labels each augmented image itself.
        order = torch.randperm(len(images), generator=gen)
        for begin in range(0, len(images), bs):
            idx = order[begin:begin + bs]
            yield cnn_data.augment(images[idx], generator=gen), labels[idx]

    steps = settings.epochs * -(-len(images) // bs)
    losses = distill_classifier(student, epochs=epochs, teacher=onnx_teacher(parent.onnx_path, input_name="image"),
                                settings=settings, steps=steps, desc="distil cnn")
    cnn.recalibrate_batchnorm(student, images)
    path = export_onnx(student, (torch.from_numpy(x_te[:2]),), work_dir / "cnn-student.onnx",
                       input_names=["image"], output_names=["probabilities"],
                       dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}})
    parity = parity_check(student, path, [(x_te[:n],) for n in (1, 3, 17)], atol=1e-4, rtol=1e-3)
    return {"model": student, "details": {"student_width": width, **losses}}, parity, path


def _train_speech(parent, *, settings: KDSettings, work_dir: Path, heldout) -> tuple[dict, dict, Path]:
    hyper = speech.HYPER[parent.profile]
    training = parent.card.get("training", {})
    shape = SPEECH_STUDENT[parent.profile]
    channels = max(4, round(shape.width * int(training.get("channels", hyper.channels))))
    blocks = max(1, int(training.get("blocks", hyper.blocks)) - shape.fewer_blocks)
    corpus, aug = speech.load_corpus("synth", profile=parent.profile, seed=parent.seed,
                                     cache_dir=speech.default_cache_dir())
    student = speech.KeywordSpotter(channels=channels, blocks=blocks, dropout=hyper.dropout)
    rng = np.random.default_rng(parent.seed + 2)
    gen = torch.Generator().manual_seed(parent.seed)
    last: dict[str, torch.Tensor] = {}

    def epochs(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Fresh augmented clips every epoch, composed by the family's own data code.
        clips, labels = sd.compose(corpus.train, rng, noise=corpus.train_noise, aug=aug,
                                   unknown_ratio=hyper.unknown_ratio)
        x, y = torch.from_numpy(clips), torch.from_numpy(labels)
        last["clips"] = x
        order = torch.randperm(len(y), generator=gen)
        for begin in range(0, len(y), settings.batch_size):
            idx = order[begin:begin + settings.batch_size]
            yield x[idx], y[idx]

    probe, _ = sd.compose(corpus.train, np.random.default_rng(parent.seed + 3), noise=corpus.train_noise, aug=aug,
                          unknown_ratio=hyper.unknown_ratio)
    steps = settings.epochs * -(-len(probe) // settings.batch_size)
    losses = distill_classifier(student, epochs=epochs, settings=settings, steps=steps, desc="distil speech",
                                teacher=onnx_teacher(parent.onnx_path, input_name="waveform"))
    speech.recalibrate_batchnorm(student, last["clips"])
    test_clips = np.concatenate([f["waveform"] for f in heldout.feeds])
    path = work_dir / "speech-student.onnx"
    parity = speech_export.export_and_check(student, test_clips, onnx_path=path)
    return {"model": student, "details": {"student_channels": channels, "student_blocks": blocks,
                                          **losses}}, parity, path

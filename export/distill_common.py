"""Shared pieces of knowledge distillation: the loss, the ONNX teacher, the training loop, the result type.

Used by the two students (export/distill_classify.py, export/distill_text.py) and by their dispatcher
export/distill.py; see that module's docstring for the method (Hinton et al.'s loss, log-probabilities
of the served softmax as teacher logits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from export.common import measure_latency, ort_session

LATENCY_BATCH = 32


@dataclass
class StudentResult:
    """One distilled student, evaluated on its teacher's held-out split."""

    family: str
    model: str  # the teacher's model name in the repository
    onnx_path: Path
    metrics: dict[str, float]
    teacher_metrics: dict[str, float]
    parameters: int
    teacher_parameters: int
    within_budget: bool
    budget: str
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50 at LATENCY_BATCH, side by side
    details: dict[str, Any] = field(default_factory=dict)  # training settings, parity, retrieval overlap...

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["onnx_path"] = str(self.onnx_path)
        return out


@dataclass(frozen=True)
class KDSettings:
    epochs: int
    batch_size: int
    lr: float
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (teacher) term; 1 - alpha goes to the hard labels
    weight_decay: float = 5e-4


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, soft, hard): total = alpha * T^2 * KL(p_T(teacher) || p_T(student)) + (1 - alpha) * CE.

    ``soft`` is returned already multiplied by T^2; KL uses batch-mean reduction (the true KL per example).
    """
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"temperature must be > 0 and alpha in [0, 1]; got T={temperature}, alpha={alpha}")
    student_log = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits / temperature, dim=-1)
    soft = F.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True) * temperature**2
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard, soft, hard


def teacher_logits_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Log-probabilities of the served softmax output: logits up to a per-row shift (see module doc)."""
    return np.log(np.clip(probabilities.astype(np.float64), 1e-30, None)).astype(np.float32)


def onnx_teacher(onnx_path: Path, *, input_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function batch -> teacher logits, running the served FP32 ONNX model in ONNX Runtime."""
    session = ort_session(onnx_path, threads=1)
    return lambda batch: teacher_logits_from_probabilities(
        session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0])


def distill_classifier(student: nn.Module, *, epochs: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]],
                       teacher: Callable[[np.ndarray], np.ndarray], settings: KDSettings, steps: int,
                       desc: str) -> dict[str, float]:
    """Train ``student`` (which has ``.logits``) with ``distillation_loss``; ``epochs(e)`` yields the
    (inputs, labels) batches of epoch ``e``. Returns the mean soft/hard terms of the last epoch."""
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    total = steps + 1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=total)
    last: dict[str, list[float]] = {}
    # ``logits`` is the student's own method (ResNetSmall, KeywordSpotter); nn.Module.__getattr__ types it as
    # Tensor | Module.
    logits = cast(Callable[[torch.Tensor], torch.Tensor], student.logits)
    with tqdm(total=steps, desc=desc, unit="step", leave=False, mininterval=1.0) as bar:
        for epoch in range(settings.epochs):
            student.train()
            last = {"soft": [], "hard": []}
            for inputs, labels in epochs(epoch):
                target = torch.from_numpy(teacher(inputs.numpy()))
                loss, soft, hard = distillation_loss(logits(inputs), target, labels,
                                                     temperature=settings.temperature, alpha=settings.alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched.last_epoch + 1 < total:  # epochs of composed clips may differ by a few batches
                    sched.step()
                last["soft"].append(soft.item())
                last["hard"].append(hard.item())
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    student.eval()
    return {f"final_{k}_loss": float(np.mean(v)) for k, v in last.items() if v}


def side_by_side_latency(paths: dict[str, Path], feed: dict[str, np.ndarray], *, repeats: int) -> dict[str, float]:
    """p50 ms of teacher and student at one batch, interleaved (export.common.measure_latency)."""
    batch = len(next(iter(feed.values())))
    with tqdm(total=repeats + 2, desc="latency", unit="round", leave=False) as bar:
        p50 = measure_latency(paths, feeds={batch: feed}, repeats=repeats, progress=bar.update)
    return {name: per[batch] for name, per in p50.items()}

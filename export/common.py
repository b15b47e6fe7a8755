"""Shared API of the optimization passes (used by quantize, fp16, distill, edge and the report).

Public API (stable; export/distill.py and export/edge.py import it):

- ``FAMILY_MODELS``: family -> model names it publishes (``transformer`` publishes two).
- ``ParentModel`` / ``load_parent(repo_dir, name)``: a published FP32 model (dir, onnx path, card, config).
- ``BUDGETS`` / ``STUDENT_BUDGETS`` / ``Budget`` / ``budget_for(model, variant)`` / ``check_budget(model=...,
  variant_metrics=..., fp32_metrics=..., variant=...)``: the accuracy budget of each model's variants (and of
  its distilled student, where that differs), in one place, and its verdict on a variant.
- ``ort_session(path, threads=1)``: a CPU ONNX Runtime session (quiet logs, fixed thread count).
- ``measure_latency(paths, feeds=..., repeats=...)``: p50 latency of several ONNX files measured
  side by side (interleaved round-robin, so machine noise hits every variant alike).
- ``publish_variant(repo_dir=..., parent=..., variant=..., onnx_path=..., card_extra=...)``: publishes
  ``<parent>-<variant>`` (copy of the parent's config renamed, labels and assets copied, model card).
- ``publish_if_within_budget(...)``: the budget check and publication in one step (None when over budget).
- ``file_size_mb(path)``.

Held-out data and evaluation live in ``export.heldout`` (``load_heldout(parent)`` and
``evaluate(parent, onnx_path, heldout, reference=...)``): every variant is evaluated on exactly
the held-out split its FP32 parent was evaluated on when the zoo was built.

Student interface (provided by export/distill.py, consumed by export/optimize.py):
``build_student(family: str, /, *, repo_dir: Path, work_dir: Path, profile: str,
text_options: dict[str, int] | None = None) -> StudentResult | None`` returns a ``StudentResult``
(``onnx_path``: a student ONNX file with the parent's inputs/outputs, plus its held-out metrics, budget
verdict and side-by-side latency), or None when there is no student for ``family``.
"""

from __future__ import annotations

import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.zoo import FAMILY_MODELS
from service.modelrepo.card import read_card, variant_name
from service.modelrepo.layout import CARD_FILENAME, CONFIG_FILENAME, LAYOUT_FILES, model_file
from service.modelrepo.publish import publish
from service.modelrepo.sessions import CPU_ONLY, create_session


@dataclass(frozen=True)
class ParentModel:
    """A published FP32 model of the repository."""

    name: str
    family: str
    model_dir: Path
    onnx_path: Path
    card: dict[str, Any]
    config_text: str

    @property
    def profile(self) -> str:
        return str(self.card.get("profile", "default"))

    @property
    def seed(self) -> int:
        return int(self.card.get("seed", 0))


def load_parent(repo_dir: Path, name: str) -> ParentModel:
    """Read ``<repo_dir>/<name>`` (config.pbtxt, 1/model.onnx, metrics.json)."""
    model_dir = Path(repo_dir) / name
    onnx_path = model_file(model_dir, 1)
    card_path = model_dir / CARD_FILENAME
    for needed in (model_dir / CONFIG_FILENAME, onnx_path, card_path):
        if not needed.is_file():
            raise FileNotFoundError(f"model {name!r}: expected {needed} (build the zoo with `modelserve build`)")
    card = read_card(model_dir)
    family = card.get("family")
    if family not in FAMILY_MODELS or name not in FAMILY_MODELS[family]:
        raise ValueError(f"{card_path}: family {family!r} does not publish model {name!r}; "
                         f"expected one of {FAMILY_MODELS}")
    return ParentModel(name=name, family=family, model_dir=model_dir, onnx_path=onnx_path, card=card,
                       config_text=(model_dir / CONFIG_FILENAME).read_text())


@dataclass(frozen=True)
class Floor:
    """A further target of a budget: ``metric`` (a key of the variant's metrics) must be >= ``min_value``."""

    metric: str
    min_value: float
    label: str  # how verdicts name it


@dataclass(frozen=True)
class Budget:
    """``metric`` may drop by at most ``max_drop`` from FP32, or must be at least ``min_value``; every
    ``Floor`` of ``also`` must hold too."""

    metric: str
    max_drop: float | None = None
    min_value: float | None = None
    label: str = ""  # how verdicts name ``metric`` (default: the metric's key)
    also: tuple[Floor, ...] = ()

    @property
    def name(self) -> str:
        return self.label or self.metric

    def describe(self) -> str:
        main = (f"{self.name} drop <= {self.max_drop:g}" if self.max_drop is not None
                else f"{self.name} >= {self.min_value:g}")
        return ", ".join([main, *(f"{f.label} >= {f.min_value:g}" for f in self.also)])


BUDGETS: dict[str, Budget] = {
    "cnn": Budget("accuracy", max_drop=0.01),
    "speech": Budget("accuracy", max_drop=0.01),
    "transformer-classifier": Budget("accuracy", max_drop=0.01),
    # Embeddings have no labels of their own: the variant must point the same way as the FP32 model.
    "transformer": Budget("cosine_to_fp32", min_value=0.99),
    # hr@10 is the model card's: NCF protocol, held-out item among 99 sampled unseen items (export.heldout).
    "recommender": Budget("hr@10", max_drop=0.01),
}
# Distilled students whose budget differs from their model's variants (the others: BUDGETS). The sentence
# encoder's student is a different, much smaller network, so it trades accuracy for speed by design: the
# issue's targets, measured on the held-out texts against the served FP32 encoder (export.heldout), the
# speed-up side by side at batch 32 (``speedup_b32``: FP32 p50 / student p50).
STUDENT_BUDGETS: dict[str, Budget] = {
    "transformer": Budget("cosine_to_fp32", min_value=0.95, label="mean cosine to teacher",
                          also=(Floor("top10_retrieval_overlap", 0.85, "top-10 overlap"),
                                Floor("speedup_b32", 3.0, "speedup at batch 32"))),
}
STUDENT_VARIANTS = ("student", "student-int8")


def budget_for(model: str, variant: str = "") -> Budget:
    """The budget of ``variant`` of ``model``: STUDENT_BUDGETS for students where listed, else BUDGETS."""
    if variant in STUDENT_VARIANTS and model in STUDENT_BUDGETS:
        return STUDENT_BUDGETS[model]
    return BUDGETS[model]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    value: float
    delta: float
    budget: str
    missed: tuple[str, ...] = ()  # one phrase per target missed, naming it: "top-10 overlap 0.800 < 0.85"

    def as_dict(self) -> dict[str, Any]:
        return {"within_budget": self.ok, "value": self.value, "delta_vs_fp32": self.delta, "budget": self.budget,
                "missed": list(self.missed)}


def _missed(budget: Budget, metrics: dict[str, float], *, value: float, delta: float) -> list[str]:
    missed = []
    if budget.max_drop is not None:
        # NOTE: a tiny epsilon so that a drop of exactly one point (float noise) is not rejected.
        if not (-delta <= budget.max_drop + 1e-9 and np.isfinite(value)):
            missed.append(f"{budget.name} drop {-delta:.4f} > {budget.max_drop:g}")
    elif not (value >= float(budget.min_value or 0.0) and np.isfinite(value)):
        missed.append(f"{budget.name} {value:.3f} < {budget.min_value:g}")
    for floor in budget.also:
        got = metrics.get(floor.metric)
        if got is None:
            missed.append(f"{floor.label} not measured")
        elif not float(got) >= floor.min_value:
            missed.append(f"{floor.label} {float(got):.3f} < {floor.min_value:g}")
    return missed


def check_budget(*, model: str, variant_metrics: dict[str, float], fp32_metrics: dict[str, float],
                 variant: str = "") -> Verdict:
    """Verdict of ``variant``'s held-out metrics against ``budget_for(model, variant)`` (FP32 measured the
    same way; a student's ``speedup_b32`` among its metrics when its budget has that floor)."""
    budget = budget_for(model, variant)
    if budget.metric not in variant_metrics or budget.metric not in fp32_metrics:
        raise KeyError(f"{model}: metric {budget.metric!r} missing (variant {sorted(variant_metrics)}, "
                       f"fp32 {sorted(fp32_metrics)})")
    value, ref = float(variant_metrics[budget.metric]), float(fp32_metrics[budget.metric])
    missed = _missed(budget, variant_metrics, value=value, delta=value - ref)
    return Verdict(ok=not missed, value=value, delta=value - ref, budget=budget.describe(), missed=tuple(missed))


def ort_session(path: Path, *, threads: int = 1, providers: Sequence[str] = CPU_ONLY) -> Any:
    """A session (CPU unless ``providers`` says otherwise) with a fixed intra-op thread count
    (comparable latencies on a shared machine)."""
    return create_session(path, threads=threads, providers=providers)


def latency_samples(paths: dict[str, Path], *, feeds: dict[int, dict[str, np.ndarray]], repeats: int = 20,
                    warmup: int = 2, threads: int = 1, progress: Any = None,
                    providers: Sequence[str] = CPU_ONLY) -> dict[str, dict[int, list[float]]]:
    """Milliseconds per round, variant and batch size, all variants measured in one interleaved loop.

    ``feeds`` maps batch size -> input dict. Each round runs every variant once per batch size, in a
    rotating order, so load from other processes on the shared machine affects all variants alike (and
    sample i of two variants forms a pair: export.int8_measure.ratio_ci). ``progress`` (optional) is
    called with no argument after each round.
    """
    sessions = {name: ort_session(path, threads=threads, providers=providers) for name, path in paths.items()}
    samples: dict[str, dict[int, list[float]]] = {n: {b: [] for b in feeds} for n in sessions}
    names = list(sessions)
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for batch, feed in feeds.items():
                start = time.perf_counter()
                sessions[name].run(None, feed)
                if round_index >= warmup:
                    samples[name][batch].append((time.perf_counter() - start) * 1e3)
        if progress is not None:
            progress()
    return samples


def p50(samples: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    return {n: {b: float(statistics.median(v)) for b, v in per.items()} for n, per in samples.items()}


def measure_latency(paths: dict[str, Path], *, feeds: dict[int, dict[str, np.ndarray]], repeats: int = 20,
                    warmup: int = 2, threads: int = 1, progress: Any = None,
                    providers: Sequence[str] = CPU_ONLY) -> dict[str, dict[int, float]]:
    """p50 milliseconds per variant and batch size of ``latency_samples``."""
    return p50(latency_samples(paths, feeds=feeds, repeats=repeats, warmup=warmup, threads=threads,
                               progress=progress, providers=providers))


def file_size_mb(path: Path) -> float:
    return Path(path).stat().st_size / 1e6


def _renamed_config(config_text: str, *, old: str, new: str) -> str:
    renamed, count = re.subn(r'^name:\s*"[^"]*"', f'name: "{new}"', config_text, count=1, flags=re.M)
    if count != 1:
        raise ValueError(f"config of {old!r} has no top-level name line to rename")
    return renamed


def publish_variant(*, repo_dir: Path, parent: ParentModel, variant: str, onnx_path: Path,
                    card_extra: dict[str, Any]) -> Path:
    """Publish ``<parent>-<variant>``: the parent's config renamed, labels/assets copied, a model card
    (``metrics.json``) with ``family``, ``variant``, ``parent`` plus ``card_extra`` (metrics, deltas,
    budget, kept_fp32...). Returns the model directory. Uses service.modelrepo.publish (atomic)."""
    name = variant_name(parent.name, variant)
    labels_path = parent.model_dir / "labels.txt"
    labels = labels_path.read_text().splitlines() if labels_path.is_file() else None
    card: dict[str, Any] = {key: parent.card[key]
                            for key in ("task", "data", "split", "parameters", "input_spec", "profile", "seed",
                                        "labels") if key in parent.card}
    # NOTE: a variant has no PyTorch model to check parity against; its check is the held-out
    # comparison with the FP32 parent (metrics, deltas, budget), which card_extra carries.
    card["parity"] = {"reference": f"FP32 parent {parent.name!r} on the same held-out data"}
    card["build_seconds"] = 0.0
    card.update({"family": parent.family, "variant": variant, "parent": parent.name, **card_extra})
    if "metrics" not in card:
        raise ValueError(f"{name}: card_extra must carry the variant's held-out 'metrics'")
    with tempfile.TemporaryDirectory() as tmp:
        # NOTE: assets are copied to a temp dir first: publish() may replace the directory they came from.
        assets = {}
        for item in parent.model_dir.iterdir():
            if item.is_file() and item.name not in LAYOUT_FILES:
                assets[item.name] = Path(shutil.copy2(item, Path(tmp) / item.name))
        return publish(repo_dir=Path(repo_dir), name=name, onnx_path=Path(onnx_path),
                       config_pbtxt=_renamed_config(parent.config_text, old=parent.name, new=name),
                       card=card, card_md=_card_markdown(name, card), labels=labels, assets=assets or None)


def publish_if_within_budget(*, repo_dir: Path, parent: ParentModel, variant: str, onnx_path: Path,
                             metrics: dict[str, float], fp32_metrics: dict[str, float],
                             card_extra: dict[str, Any] | None = None) -> Path | None:
    """Publish ``<parent>-<variant>`` only when its held-out ``metrics`` meet the parent's budget
    (FP32 measured the same way in ``fp32_metrics``); returns the model dir, or None (nothing written)."""
    verdict = check_budget(model=parent.name, variant_metrics=metrics, fp32_metrics=fp32_metrics)
    if not verdict.ok:
        return None
    card = {"metrics": metrics, "fp32_metrics": fp32_metrics, "budget": verdict.as_dict(), "kept_fp32": [],
            **(card_extra or {})}
    return publish_variant(repo_dir=repo_dir, parent=parent, variant=variant, onnx_path=onnx_path, card_extra=card)


def _card_markdown(name: str, card: dict[str, Any]) -> str:
    lines = [f"# {name}", "", f"{card['variant']} variant of `{card['parent']}` ({card['family']} family).", ""]
    verdict = card.get("budget")
    if isinstance(verdict, dict):
        lines.append(f"- Budget: {verdict.get('budget')} — value {verdict.get('value'):.4f}, "
                     f"delta vs FP32 {verdict.get('delta_vs_fp32'):+.4f}")
    if card.get("kept_fp32"):
        lines.append(f"- Kept in FP32: {', '.join(map(str, card['kept_fp32']))}")
    for key, value in (card.get("metrics") or {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"

"""The publish gate of ``modelserve optimize``: a pure function of (budget verdict, latencies, device).

A variant is published only if it is within its accuracy budget AND faster than its FP32 parent on the
device it is meant for, at every batch size that matters (1 and 32), both measured side by side in
one interleaved run. FP16 is a GPU variant: without a GPU execution provider it is measured on CPU and
reported, never published. Every decision carries a sentence saying why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from export.common import Verdict
from export.int8_measure import CONFIDENCE, RatioCI
from service.modelrepo.sessions import GPU_PROVIDERS, choose_providers

GATE_BATCHES = (1, 32)
# NOTE: at least 5% faster at each batch size: on the shared 2-core machine smaller differences flip
# between reruns (cnn int8 at batch 32 measured 0.31x, then 0.75x and 0.84x of FP32).
MIN_SPEEDUP = 1.05
# The device each variant is made for (anything not listed: the CPU it was measured on).
TARGET_DEVICE = {"fp16": "GPU"}


@dataclass(frozen=True)
class Device:
    """The execution providers this onnxruntime build offers, best first."""

    providers: tuple[str, ...]

    @property
    def has_gpu(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.providers)

    def describe(self) -> str:
        return ("GPU: " if self.has_gpu else "CPU only: ") + ", ".join(self.providers)


def detect_device() -> Device:
    return Device(tuple(choose_providers()))


@dataclass(frozen=True)
class Decision:
    """Whether to publish a variant, and the sentence that says why."""

    publish: bool
    why: str
    target_device: str
    speedup: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"publish": self.publish, "why": self.why, "target_device": self.target_device,
                "speedup_vs_fp32": {str(b): s for b, s in self.speedup.items()}}


def _speed_text(speedup: dict[int, float], latency: dict[int, float], parent: dict[int, float]) -> str:
    return ", ".join(f"b{b} {speedup[b]:.2f}x ({latency[b]:.3g} vs {parent[b]:.3g} ms)" for b in sorted(speedup))


def decide(*, variant: str, verdict: Verdict | None, latency: dict[int, float] | None,
           parent_latency: dict[int, float] | None, timed_on: str, device: Device,
           batches: Sequence[int] = GATE_BATCHES, ratio_ci: dict[int, RatioCI] | None = None) -> Decision:
    """Publish ``variant`` or not. ``verdict`` is None when the variant was not built; ``latency`` and
    ``parent_latency`` are p50 ms per batch size measured side by side on ``timed_on`` ("CPU"/"GPU");
    ``ratio_ci`` (variant/FP32 latency, per batch size): when given, the whole interval must be below 1."""
    target = TARGET_DEVICE.get(variant, "CPU")
    if verdict is None:
        return Decision(False, "not published: not built", target)
    speedup: dict[int, float] = {}
    timing = "no latency measured"
    if latency is not None and parent_latency is not None and all(
            b in latency and b in parent_latency for b in batches):
        speedup = {b: parent_latency[b] / latency[b] for b in batches}
        timing = _speed_text(speedup, latency, parent_latency)
    have = bool(speedup)
    budget = f"{verdict.budget}: {verdict.value:.4f}, {verdict.delta:+.4f} vs FP32"
    if target == "GPU" and not device.has_gpu:
        return Decision(False, f"not published: a GPU variant and this machine has no GPU execution provider "
                               f"({device.describe()}); measured on CPU: {timing}", target, speedup)
    if target != timed_on:
        return Decision(False, f"not published: made for {target} but timed on {timed_on}", target, speedup)
    if not verdict.ok:
        missed = f"; missed: {', '.join(verdict.missed)}" if verdict.missed else ""
        return Decision(False, f"not published: over its accuracy budget ({budget}{missed})", target, speedup)
    if not have:
        return Decision(False, f"not published: within budget ({budget}) but {timing}", target, speedup)
    slow = [b for b in batches if speedup[b] < MIN_SPEEDUP]
    if slow:
        return Decision(False, f"not published: within budget ({budget}) but not at least {MIN_SPEEDUP:g}x "
                               f"faster than FP32 on {timed_on} at batch {', '.join(map(str, slow))}: {timing}",
                        target, speedup)
    unsure = [b for b in batches if ratio_ci is not None and b in ratio_ci and ratio_ci[b].high >= 1.0]
    if unsure:
        cis = ", ".join(f"b{b} {ratio_ci[b].text()}" for b in unsure)  # type: ignore[index]
        return Decision(False, f"not published: within budget ({budget}) but not faster than FP32 with "
                               f"{CONFIDENCE:.0%} confidence (latency ratio median [CI]: {cis}): {timing}",
                        target, speedup)
    return Decision(True, f"published: within budget ({budget}) and faster than FP32 on {timed_on}: {timing}",
                    target, speedup)

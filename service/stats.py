"""Per model-version statistics in the shape of Triton's statistics extension.

These counters are the single source of truth: `/v2/models/stats` reads them, and the Prometheus
collector in metrics.py exports the same numbers under Triton's metric names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def as_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


FILL_BUCKETS = (0.125, 0.25, 0.5, 0.75, 1.0)


@dataclass
class DispatchStat:
    """Batches that left the queue for one reason, and how full they were (rows / max_batch_size)."""

    count: int = 0
    fill_sum: float = 0.0
    fill_buckets: list[int] = field(default_factory=lambda: [0] * len(FILL_BUCKETS))  # not cumulative

    def add(self, fill: float) -> None:
        self.count += 1
        self.fill_sum += fill
        for i, le in enumerate(FILL_BUCKETS):
            if fill <= le:
                self.fill_buckets[i] += 1
                return


@dataclass
class ModelStats:
    """Counters for one model version. Only the event loop thread writes them."""

    name: str
    version: str
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    failures: dict[str, int] = field(default_factory=dict)
    batches: dict[int, BatchStat] = field(default_factory=dict)
    pending: int = 0
    dispatches: dict[str, DispatchStat] = field(default_factory=dict)  # by reason (batch_planner.DispatchReason)

    def record_execution(self, rows: int, timings: tuple[int, int, int]) -> None:
        self.execution_count += 1
        self.inference_count += rows
        batch = self.batches.setdefault(rows, BatchStat())
        for name, ns in zip(("compute_input", "compute_infer", "compute_output"), timings):
            getattr(batch, name).add(ns)

    def record_dispatch(self, reason: str, fill: float) -> None:
        self.dispatches.setdefault(reason, DispatchStat()).add(fill)

    def record_success(self, *, total_ns: int, queue_ns: int, timings: tuple[int, int, int]) -> None:
        """Per request: Triton attributes each batch's compute time to every request in it."""
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(timings[0])
        self.compute_infer.add(timings[1])
        self.compute_output.add(timings[2])
        self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, *, total_ns: int, reason: str) -> None:
        self.fail.add(total_ns)
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.as_dict(),
                    "compute_infer": b.compute_infer.as_dict(),
                    "compute_output": b.compute_output.as_dict(),
                }
                for size, b in sorted(self.batches.items())
            ],
            # Triton's fields for decoupled models' per-response statistics and the memory a backend reports:
            # no model here is decoupled, and ONNX Runtime reports no per-model allocation, so both are empty
            # (present, as Triton's JSON has them).
            "response_stats": {},
            "memory_usage": [],
        }

"""The bench's model (a small deterministic CNN exported to ONNX) and its in-process ONNX Runtime ceiling.

The ceiling uses the server's own session factory (service/modelrepo/sessions.py), so "% of ceiling" compares
the same ONNX Runtime work with and without the server around it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.modelrepo.sessions import create_session

INPUT_NAME, OUTPUT_NAME = "image", "logits"
INPUT_DIMS = (1, 28, 28)
CHECK_BATCHES = (1, 5, 64)
# Median batch-1 latency of width 80 is ~0.9 ms with 2 intra-op threads on the 2-core dev box (48: ~0.33 ms).
DEFAULT_WIDTH = 80


def build_cnn_onnx(path: Path, *, width: int, seed: int = 0) -> Path:
    """conv-conv-pool-conv-pool-conv-GAP-linear on [N,1,28,28] -> [N,10]; random weights from `seed`.

    See DEFAULT_WIDTH for the latency it gives. Untrained weights are fine: the bench measures serving,
    and conv cost does not depend on the weight values.
    """
    # NOTE: torch (train extra) only to build the bench model; the bench itself needs none
    import torch
    from torch import nn

    from models.common import export_onnx

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    ).eval()
    # NOTE: torch.export specialises a batch of 1, so the example batch is 2 to keep the axis dynamic.
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = (torch.zeros(2, *INPUT_DIMS),)
    export_onnx(model, example, path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes={"input": {0: batch}})
    _check_batches(model, path)
    return path


def _check_batches(model, path: Path) -> None:
    """The exported graph must match eager PyTorch at several batch sizes (a static batch would fail here)."""
    # NOTE: torch (train extra) only to build the bench model; the bench itself needs none
    import torch

    session = ort_session(path)
    rng = np.random.default_rng(0)
    for n in CHECK_BATCHES:
        x = rng.standard_normal((n, *INPUT_DIMS)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-4, rtol=1e-3):
            raise RuntimeError(f"{path}: ONNX output at batch {n} differs from PyTorch "
                               f"(shape {got.shape} vs {want.shape}, max diff {np.abs(got - want).max():.2e})")


def usable_cpus() -> int:
    """Cores this process may run on: os.cpu_count() ignores taskset/cgroup affinity and would oversubscribe."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# `--provider` of the benches -> ONNX Runtime providers, best first (CPU last: the fallback for any node
# a GPU provider does not take).
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def check_provider(provider: str) -> list[str]:
    """The providers for `--provider`; SystemExit naming what this onnxruntime build has when it lacks one."""
    wanted = PROVIDERS[provider]
    missing = [p for p in wanted if p not in ort.get_available_providers()]
    if missing:
        raise SystemExit(f"--provider {provider} needs {missing}; this onnxruntime build has "
                         f"{ort.get_available_providers()} (GPU: pip install 'onnxruntime-gpu[cuda,cudnn]')")
    return wanted


def ort_session(path: Path, *, providers: list[str] | None = None) -> ort.InferenceSession:
    """A session from the one session factory the server uses (service/modelrepo/sessions.py).

    The bench gives the server the same thread count (MODELSERVE_CPU_THREADS), so both sides match.
    """
    return create_session(path, threads=usable_cpus(), providers=providers or PROVIDERS["cpu"])


@dataclass(frozen=True)
class CeilingPoint:
    batch: int
    latency_ms: float  # median per run
    rows_per_s: float  # batch / mean run time
    runs: int


def timed_runs(session, feeds: dict[str, np.ndarray], *, seconds: float, output: str = OUTPUT_NAME) -> np.ndarray:
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        session.run([output], feeds)
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def measure_ceiling(path: Path, *, batches: list[int], seconds_each: float, rounds: int = 2,
                    providers: list[str] | None = None, input_name: str = INPUT_NAME,
                    output_name: str = OUTPUT_NAME) -> list[CeilingPoint]:
    """Back-to-back session.run at each batch size: what ONNX Runtime alone does on these cores.

    Batch sizes are interleaved over `rounds` and each keeps its best round: on a shared machine a burst
    of someone else's work would otherwise land on one batch size and make a different one look best.
    The input is FP32 `[N, *INPUT_DIMS]` (the bench CNN's and the zoo cnn's).
    """
    session = ort_session(path, providers=providers)
    rng = np.random.default_rng(1)
    feeds = {n: {input_name: rng.standard_normal((n, *INPUT_DIMS)).astype(np.float32)} for n in batches}
    for n in batches:
        for _ in range(3):  # first runs allocate arenas and pick kernels
            session.run([output_name], feeds[n])
    best: dict[int, CeilingPoint] = {}
    for _ in range(rounds):
        for n in batches:
            arr = timed_runs(session, feeds[n], seconds=seconds_each / rounds, output=output_name)
            point = CeilingPoint(batch=n, latency_ms=float(np.median(arr) * 1e3),
                                 rows_per_s=float(n / arr.mean()), runs=len(arr))
            if n not in best or point.rows_per_s > best[n].rows_per_s:
                best[n] = point
    return [best[n] for n in batches]

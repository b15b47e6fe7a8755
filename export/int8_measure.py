"""Honest INT8 measurement: the CPU's integer ISA, which ORT kernels ran, and latency ratios with a CI.

- ``cpu_isa``: the x86 flags that decide ORT's INT8 speed (AVX2, AVX-512F, AVX512-VNNI / AVX-VNNI,
  AMX-INT8) or their Arm counterparts (dot product, i8mm, SVE), from ``/proc/cpuinfo``, plus ORT's own
  view of the CPU (its execution-provider device list: vendor).
- ``kernel_counts``: the op types that actually ran, from ORT's profiler (``enable_profiling``), so a
  report shows QLinearConv / ConvInteger / MatMulInteger vs float Conv instead of assuming it.
- ``ratio_ci``: the median of paired variant/FP32 latency ratios (one pair per interleaved round) with a
  bootstrap confidence interval (scipy.stats.bootstrap): a variant is faster only if the whole interval is.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from scipy import stats

from service.modelrepo.sessions import session_options

# x86 flags, then the Arm "Features" names of the same capabilities (asimddp: SDOT/UDOT; i8mm: SMMLA).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")
X86_FLAGS, ARM_FLAGS = ISA_FLAGS[:5], ISA_FLAGS[5:]
CONFIDENCE = 0.95
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul", "QGemm", "NhwcQLinearConv")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model and which of ``ISA_FLAGS`` the first processor lists (x86 ``flags`` or Arm ``Features``)."""
    model, flags = "unknown", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model == "unknown":
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    arch = "arm" if flags & set(ARM_FLAGS) or "asimd" in flags else "x86"
    names = ARM_FLAGS if arch == "arm" else X86_FLAGS
    return {"model": model, "arch": arch, "flags": {f: f in flags for f in names}}


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """``parse_cpuinfo`` of this machine plus ORT's view (CPU vendor from its EP device list)."""
    info = parse_cpuinfo(cpuinfo.read_text() if cpuinfo.exists() else "")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "CPUExecutionProvider"]
    info["ort"] = {"version": ort.__version__,
                   "cpu_vendor": devices[0].device.vendor if devices else "not exposed"}
    return info


def isa_text(info: Mapping[str, Any]) -> str:
    have = [f for f, on in info["flags"].items() if on]
    lacks = [f for f, on in info["flags"].items() if not on]
    return (f"{info['model']} ({info['arch']}): {' '.join(have) or 'none of ' + '/'.join(info['flags'])}"
            + (f"; no {' '.join(lacks)}" if lacks else "")
            + f"; ORT {info['ort']['version']} sees CPU vendor {info['ort']['cpu_vendor']}")


def parse_profile(events: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Per op type, how many nodes ran, from ORT profiler events (``cat == "Node"``, ``*_kernel_time``)."""
    counts: dict[str, int] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name")
        if op:
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def kernel_counts(model_path: Path, feed: Mapping[str, np.ndarray], *, threads: int = 1) -> dict[str, int]:
    """Op types ORT ran for one ``feed`` (after graph optimization: fused and quantized kernels as they ran)."""
    with tempfile.TemporaryDirectory() as tmp:
        # NOTE: its own session, not service.modelrepo.sessions.create_session: profiling is a per-session
        # option that the serving factory must never switch on; the thread settings are the factory's.
        options = session_options(threads=threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        session.run(None, dict(feed))
        events = json.loads(Path(session.end_profiling()).read_text())
    return parse_profile(events)


def kernels_text(counts: Mapping[str, int]) -> str:
    integer = {k: v for k, v in counts.items() if k in INTEGER_KERNELS}
    float_compute = {k: v for k, v in counts.items() if k in ("Conv", "FusedConv", "MatMul", "Gemm", "FusedMatMul")}
    shown = {**integer, **float_compute}
    return ", ".join(f"{k}x{v}" for k, v in shown.items()) or "no Conv/MatMul kernels"


@dataclass(frozen=True)
class RatioCI:
    """Median variant/baseline latency ratio (below 1: faster) and its confidence interval."""

    median: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def text(self) -> str:
        return f"{self.median:.2f} [{self.low:.2f}, {self.high:.2f}]"

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "low": self.low, "high": self.high, "n": self.n,
                "confidence": self.confidence}


def ratio_ci(baseline: Sequence[float], variant: Sequence[float], *, confidence: float = CONFIDENCE,
             resamples: int = 2000, seed: int = 0) -> RatioCI:
    """Bootstrap CI of the median of paired ratios ``variant[i] / baseline[i]`` (round i of an interleaved
    run: both ran under the same machine load). Percentile method: BCa fails on constant samples."""
    if len(baseline) != len(variant) or len(baseline) < 2:
        raise ValueError(f"paired samples: expected two equal-length lists of at least 2, got {len(baseline)} "
                         f"and {len(variant)}")
    ratios = np.asarray(variant, dtype=float) / np.asarray(baseline, dtype=float)
    return median_ci(ratios, confidence=confidence, resamples=resamples, seed=seed)


def median_ci(values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = 2000,
              seed: int = 0) -> RatioCI:
    """The median of ``values`` (at least 2) with its percentile-bootstrap CI (e.g. p50 latency of one variant)."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        raise ValueError(f"a bootstrap CI needs at least 2 values, got {len(data)}")
    median = float(np.median(data))
    if np.ptp(data) == 0:
        return RatioCI(median, median, median, len(data), confidence)
    result = stats.bootstrap((data,), np.median, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return RatioCI(median, float(interval.low), float(interval.high), len(data), confidence)


def ratio_cis(samples: Mapping[str, Mapping[int, Sequence[float]]], *,
              baseline: str = "fp32") -> dict[str, dict[int, RatioCI]]:
    """``ratio_ci`` of every variant against ``baseline`` at every batch size of ``samples``."""
    base = samples[baseline]
    return {name: {b: ratio_ci(base[b], per[b]) for b in per} for name, per in samples.items() if name != baseline}

"""How many CPUs this process may really use: the CPU affinity mask and the cgroup CPU quota.

`os.sched_getaffinity` sees cpusets (taskset, Kubernetes' static CPU manager) but not a CFS quota: a pod with
`limits.cpu: 2` on a 64-core node sees 64 CPUs, and 64 ONNX Runtime threads sharing 2 CPUs of quota get
throttled every period. The quota is in the cgroup filesystem.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(root: Path) -> float | None:
    # cgroup v2: "<quota> <period>" or "max <period>" in cpu.max of the cgroup we are in (a container sees
    # its own cgroup mounted at the root).
    text = _read(root / "cpu.max")
    if text is None:
        return None
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = float(fields[1]) if len(fields) > 1 else 100_000.0
    quota = float(fields[0])
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(root: Path) -> float | None:
    # cgroup v1: cpu.cfs_quota_us is -1 without a limit; the controller is mounted as cpu,cpuacct (or cpu).
    for controller in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        quota_text = _read(root / controller / "cpu.cfs_quota_us")
        period_text = _read(root / controller / "cpu.cfs_period_us")
        if quota_text is None or period_text is None:
            continue
        try:
            quota, period = int(quota_text), int(period_text)
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by the cgroup CPU quota (e.g. 0.5, 2.0), or None when there is no quota or no cgroup."""
    try:
        return _v2_limit(root) if (root / "cpu.max").exists() else _v1_limit(root)
    except (ValueError, IndexError):
        return None


def usable_cpus(root: Path | None = None) -> int:
    """min(CPUs in our affinity mask, the cgroup quota rounded up), at least 1.

    NOTE: rounded up, as the downward API rounds `limits.cpu` (a 1.5-CPU limit gives 2 threads): a thread
    short of the quota wastes more than a thread that is throttled for part of a period.
    """
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(CGROUP_ROOT if root is None else root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)

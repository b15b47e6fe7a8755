"""service.cpuquota on fake cgroup trees: v2 cpu.max, v1 CFS quota, no limit, fractional quotas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service import cpuquota
from service.cpuquota import cgroup_cpu_limit, usable_cpus
from service.settings import ServerSettings, default_cpu_threads


def _v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def _v1(root: Path, quota: int, period: int = 100_000, controller: str = "cpu,cpuacct") -> Path:
    d = root / controller
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.fixture
def many_cpus(monkeypatch):
    """Pretend the affinity mask holds 64 CPUs, as on a big node."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))


def test_v2_no_limit(tmp_path):
    assert cgroup_cpu_limit(_v2(tmp_path, "max 100000")) is None


def test_v2_quota(tmp_path):
    assert cgroup_cpu_limit(_v2(tmp_path, "200000 100000")) == 2.0
    assert cgroup_cpu_limit(_v2(tmp_path / "half", "50000 100000")) == 0.5


def test_v1_quota_and_no_limit(tmp_path):
    assert cgroup_cpu_limit(_v1(tmp_path / "a", 150_000)) == 1.5
    assert cgroup_cpu_limit(_v1(tmp_path / "b", -1)) is None
    assert cgroup_cpu_limit(_v1(tmp_path / "c", 300_000, controller="cpu")) == 3.0


def test_no_cgroup_at_all(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "missing") is None
    assert cgroup_cpu_limit(tmp_path) is None


def test_garbage_is_no_limit(tmp_path):
    assert cgroup_cpu_limit(_v2(tmp_path, "lots")) is None


def test_usable_cpus_takes_the_quota(tmp_path, many_cpus):
    assert usable_cpus(_v2(tmp_path / "two", "200000 100000")) == 2
    assert usable_cpus(_v1(tmp_path / "v1", 250_000)) == 3  # rounded up, as the downward API does
    assert usable_cpus(_v2(tmp_path / "none", "max 100000")) == 64
    assert usable_cpus(tmp_path / "missing") == 64


def test_fractional_quota_gives_one_thread(tmp_path, many_cpus):
    assert usable_cpus(_v2(tmp_path, "50000 100000")) == 1
    assert usable_cpus(_v2(tmp_path / "tiny", "1000 100000")) == 1


def test_affinity_below_quota_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert usable_cpus(_v2(tmp_path, "800000 100000")) == 2


def test_settings_default_uses_the_quota(tmp_path, monkeypatch, many_cpus):
    monkeypatch.setattr(cpuquota, "CGROUP_ROOT", _v2(tmp_path, "300000 100000"))
    assert default_cpu_threads() == 3
    assert ServerSettings().cpu_threads == 3
    assert ServerSettings(cpu_threads=5).cpu_threads == 5

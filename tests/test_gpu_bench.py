"""The one-shot GPU script (loadtests/gpu_bench.py) end to end on CPU, as the brief for GPU-less machines
asks: `--provider cpu --quick` must run every step (ceiling, both server runs, both protocols) and write
its tables; `--provider cuda` on a CPU-only build must stop and say what to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "loadtests.gpu_bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_quick_cpu_run_writes_both_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run("--provider", "cpu", "--quick", "--output", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads((out / "gpu_bench.json").read_text())
    assert [(p["precision"], p["path"], p["batch"]) for p in doc["ceiling"]] == [
        (precision, path, batch) for precision in ("fp32", "fp16") for path in ("run", "iobinding") for batch in (1, 8)]
    assert all(p["rows_per_s"] > 0 and p["gpu_util_mean"] is None for p in doc["ceiling"])
    rows = doc["server"]
    assert [(r["run"], r["protocol"], r["concurrency"]) for r in rows] == [
        (run, p, c) for run in ("fp32", "fp16", "fp32-unbound") for p in ("binary", "grpc") for c in (1, 8)]
    # On CPU the server keeps FP32 even with the variant allowed, and says so in its load line.
    assert {(tuple(r["served"]), r["precision"], r["io_bound_instances"]) for r in rows} == {
        (("cnn/1/model.onnx",), "fp32", 0)}
    assert all(r["ok"] > 0 and r["errors"] == 0 and r["warmup_errors"] == 0 for r in rows)
    markdown = (out / "gpu_bench.md").read_text()
    assert "## In-process ceiling" in markdown and "| fp16 | fp32 | cnn/1/model.onnx | grpc | 8 |" in markdown


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="checks the CPU-only message")
def test_cuda_on_a_cpu_build_says_what_to_install(tmp_path: Path) -> None:
    done = _run("--provider", "cuda", "--output", str(tmp_path))
    assert done.returncode != 0
    assert "needs ['CUDAExecutionProvider']" in done.stderr and "onnxruntime-gpu" in done.stderr

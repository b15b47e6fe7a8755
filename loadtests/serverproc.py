"""Start `modelserve serve` as a subprocess on a free loopback port, for the bench and ad-hoc profiling."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServerProcess:
    url: str  # "127.0.0.1:PORT", the form the load generator takes
    pid: int
    log_path: Path
    grpc_url: str | None = None  # "127.0.0.1:PORT" when started with grpc=True


def free_port() -> int:
    # The port is free when we close the socket; another process could take it before the server binds,
    # which shows up as the server exiting early, reported with its log.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=1.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads), from /proc: the server's share of the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loop_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process's main thread: the server's event loop (ONNX Runtime and the
    executor run on other threads), i.e. the per-request Python work of the one server process."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process and of each of its children (e.g. `--http-workers` front ends), by pid."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(v) for v in children.read_text().split()] if children.exists() else []
    return {str(p): cpu_seconds(p) for p in (pid, *kids)}


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (not idle/iowait) since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    guest = sum(fields[8:10])  # guest time is already counted in user/nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serve(
    repository: Path,
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 120.0,
    command_prefix: list[str] | None = None,
    grpc: bool = False,
    log_level: str = "warning",
    code_root: Path = REPO_ROOT,
    extra_args: list[str] | None = None,
    module: str = "service.cli",
) -> Iterator[ServerProcess]:
    """Run the server until the block ends. `env` adds MODELSERVE_* settings; `command_prefix` wraps the
    command (e.g. py-spy record ... --), in which case `pid` is the wrapper's. `code_root`: the checkout whose
    `service` package runs (another commit's, to compare two versions side by side); `extra_args`: more flags;
    `module`: what `python -m` runs (a wrapper of service.cli such as loadtests.h2_probe)."""
    port = free_port()
    cmd = [*(command_prefix or []), sys.executable, "-m", module, "serve", "--model-repository", str(repository),
           "--http-port", str(port), "--http-address", "127.0.0.1", "--log-level", log_level, *(extra_args or [])]
    url = f"127.0.0.1:{port}"
    grpc_url = None
    if grpc:
        grpc_port = free_port()
        cmd += ["--grpc-port", str(grpc_port)]
        grpc_url = f"127.0.0.1:{grpc_port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=code_root, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(code_root), **(env or {})})
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not _ready(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server on {url} not ready after {ready_timeout_s:.0f} s; see {log_path}")
                time.sleep(0.05)  # poll interval, not a wait for readiness: the loop ends as soon as it answers
            yield ServerProcess(url=url, pid=proc.pid, log_path=log_path, grpc_url=grpc_url)
        finally:
            # SIGINT: uvicorn (and a py-spy wrapper) shut down cleanly and flush what they hold.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""Shared fixtures: a real server (uvicorn in a subprocess) on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, *, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll `condition` until it returns a truthy value or the deadline passes (tests never sleep blindly)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def run_server(repo: Path, *, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
               ready_timeout: float = 90.0, repository: str | None = None) -> Iterator[str]:
    """Start `modelserve serve` on a free loopback port; yield "127.0.0.1:PORT" once /v2/health/live answers
    and every model has finished loading (repository index shows no LOADING). `repository` (e.g. an s3:// URL)
    is served instead of `repo`, whose parent folder still holds the server's log."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-repository", repository or str(repo),
           "--http-port", str(port),
           "--http-address", "127.0.0.1", "--log-level", "warning", *(extra_args or [])]
    log_path = repo.parent / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        url = f"127.0.0.1:{port}"
        # NOTE: one client for every poll: httpx.get() builds a client (and its TLS context) per call, ~20 ms
        # of CPU taken from the starting server 50 times a second.
        poller = httpx.Client(base_url=f"http://{url}", timeout=1.0)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if poller.get("/v2/health/live").status_code != 200:
                    return False
                index = poller.post("/v2/repository/index")
                if index.status_code != 200:  # the repository API is restricted in this test: ask readiness
                    return poller.get("/v2/health/ready").status_code == 200
            except httpx.HTTPError:
                return False
            return all(row.get("state") != "LOADING" for row in index.json())

        try:
            with poller:
                wait_until(ready, timeout=ready_timeout, what=f"server on {url}")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def serve_repository():
    """Factory: `with serve_repository(repo_dir, extra_args=[...]) as url:` runs the real server."""
    return run_server


# The tiny model zoo (all four families, --profile tiny), built once per session.
from tests.zoo_fixtures import tiny_zoo, zoo_server  # noqa: E402, F401

"""`modelserve predict --engine ray --ray-address` on a real two-node Ray cluster (head + worker on loopback).

The nodes run with `ray start --block` as children of the test and are stopped by their process ids: `ray stop
--force` would also stop any other Ray on the machine (other jobs' clusters included).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO_ROOT, free_port, wait_until
from tests.task_media import write_inputs

pytest.importorskip("ray")


# Token authentication, as Ray >= 2.52 clusters run by default; the token is this test module's own.
_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


def _ray_cli() -> str:
    path = Path(sys.executable).with_name("ray")
    return str(path) if path.exists() else (shutil.which("ray") or pytest.skip("the `ray` CLI is not installed"))


def _node_ports() -> list[str]:
    # Two nodes on one host: every per-node port must differ (defaults would collide with each other and with
    # any other Ray on the machine).
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    return [f"--{name}={free_port()}" for name in names]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[str]:
    """A head with 1 CPU and a worker with 2 CPUs; yields the GCS address."""
    logs = tmp_path_factory.mktemp("ray-cluster")
    address = f"127.0.0.1:{free_port()}"
    # Drain timeout 0: a node stops at once on SIGTERM instead of draining for 30 s (nothing here to drain).
    env = {**os.environ, **_AUTH, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    common = ["--block", "--node-ip-address=127.0.0.1", "--object-store-memory=100000000", *(_node_ports())]
    head = [_ray_cli(), "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=1",
            "--include-dashboard=false", f"--ray-client-server-port={free_port()}", *common]
    procs = [subprocess.Popen(head, stdout=open(logs / "head.log", "wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)]
    try:
        wait_until(lambda: _nodes(address) >= 1, timeout=60, interval=0.5, what="Ray head node")
        worker = [_ray_cli(), "start", f"--address={address}", "--num-cpus=2", *(_node_ports()),
                  "--block", "--node-ip-address=127.0.0.1", "--object-store-memory=100000000"]
        procs.append(subprocess.Popen(worker, stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True))
        wait_until(lambda: _nodes(address) >= 2, timeout=60, interval=0.5, what="Ray worker node")
        yield address
    finally:
        for proc in reversed(procs):  # `ray start --block` stops its node's processes on SIGTERM
            os.killpg(proc.pid, signal.SIGTERM)
        # One deadline for all nodes, not one each.
        deadline = time.monotonic() + 10
        for proc in reversed(procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _forget(address)


def _forget(address: str) -> None:
    """Remove Ray's "current cluster" file when it names our stopped head (as `ray stop` does): a later
    `ray.init()` on this machine would otherwise try to join the dead cluster."""
    from ray._common.utils import get_ray_address_file  # NOTE: ray is optional; this module skips without it

    path = Path(get_ray_address_file(None))
    if path.exists() and path.read_text().strip().endswith(":" + address.split(":")[1]):
        path.unlink(missing_ok=True)


def _nodes(address: str) -> int:
    found = subprocess.run([_ray_cli(), "status", f"--address={address}"], capture_output=True, text=True,
                           timeout=30, env={**os.environ, **_AUTH})
    if found.returncode != 0:
        return 0
    section = found.stdout.split("Active:")[-1].split("Pending:")[0]
    return section.count("node_")


def _predict(tiny_zoo: Path, src: Path, out: Path, *extra: str, auth: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "service.cli", "predict", "--model", "cnn", "--input", str(src), "--output",
           str(out), "--model-repository", str(tiny_zoo), "--batch-size", "4", "--part-rows", "3", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(_AUTH if auth is None else auth)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_predict_on_a_cluster_matches_local(tiny_zoo, cluster, tmp_path):
    src = write_inputs(tmp_path / "inputs")["images"]
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert _predict(tiny_zoo, src, local).returncode == 0
    done = _predict(tiny_zoo, src, remote, "--engine", "ray", "--ray-address", cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = pq.read_table(local).to_pylist(), pq.read_table(remote).to_pylist()
    assert [(r["row"], r["id"], r["ok"], r["error"]) for r in a] == [(r["row"], r["id"], r["ok"], r["error"]) for r in b]
    for x, y in zip(a, b):
        if x["ok"]:
            assert [p["label"] for p in x["result"]["predictions"]] == [p["label"] for p in y["result"]["predictions"]]
    # One dataset per job: no actor pool torn down between parts, and no deprecation noise.
    assert "Failed to kill actor" not in done.stderr
    assert "DeprecationWarning" not in done.stderr and "deprecated" not in done.stderr.lower(), done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_unreachable_address_is_one_line(tiny_zoo, tmp_path):
    src = write_inputs(tmp_path / "inputs")["images"]
    done = _predict(tiny_zoo, src, tmp_path / "out.parquet", "--engine", "ray", "--ray-address",
                    f"127.0.0.1:{free_port()}")
    assert done.returncode == 2
    line = next(x for x in done.stderr.splitlines() if x.startswith("modelserve predict:"))
    assert "cannot reach the Ray cluster" in line and "--ray-address" in line, done.stderr
    assert "Traceback" not in done.stderr


def test_missing_token_is_one_line_naming_the_fix(tiny_zoo, cluster, tmp_path):
    src = write_inputs(tmp_path / "inputs")["images"]
    done = _predict(tiny_zoo, src, tmp_path / "out.parquet", "--engine", "ray", "--ray-address", cluster,
                    auth={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-token")})
    assert done.returncode == 2, done.stderr[-3000:]
    line = next(x for x in done.stderr.splitlines() if x.startswith("modelserve predict:"))
    assert "requires token authentication" in line and "RAY_AUTH_TOKEN" in line, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.parquet.parts").exists()

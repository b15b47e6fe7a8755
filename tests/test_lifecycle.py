"""The server's lifecycle: lossless, bounded shutdown (--exit-timeout-secs), header and body timeouts,
strict readiness, port clashes and deterministic release of unloaded models.

Shutdown, timeouts and ports need a real process (signals, sockets): `modelserve serve` in a subprocess,
driven by tritonclient (http.aio and grpc.aio). Readiness and unloading use the in-process Server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import REPO_ROOT, free_port, wait_until
from tests.inprocess import inprocess_server
from tests.onnx_builders import _save, scale_model, slow_model, write_config

SLOW_SIZE = 384  # slow_model's matrix size: y = x ** (2 ** repeats) / SLOW_SIZE
# Enough work that draining the queue outlasts the old fixed budgets (gRPC 5 s, then the models 1 s).
DRAIN_REPEATS = 6
SLOW_CONFIG = ('max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 1000 }\n'
               'instance_group [{ count: 1 kind: KIND_CPU }]\n')


# ---------------------------------------------------------------------------------------------- helpers

@contextmanager
def serving(repo: Path, *, args: list[str] | None = None,
            env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`modelserve serve` on a free port; yields (process, "127.0.0.1:PORT") once live and loaded."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo), "--http-port", str(port),
           "--http-address", "127.0.0.1", "--log-level", "warning", *(args or [])]
    log_path = repo.parent / f"lifecycle-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    url = f"127.0.0.1:{port}"

    def loaded(poller: httpx.Client) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            index = poller.post(f"http://{url}/v2/repository/index").json()
        except httpx.HTTPError:
            return False
        return all(row.get("state") != "LOADING" for row in index)

    try:
        with httpx.Client(timeout=2.0) as poller:  # one client for every poll (see run_server in conftest.py)
            wait_until(lambda: loaded(poller), timeout=90, what=f"server on {url}")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def slow_repo(root: Path, *, repeats: int = DRAIN_REPEATS) -> Path:
    slow_model(root / "slow" / "1" / "model.onnx", size=SLOW_SIZE, repeats=repeats)
    write_config(root / "slow", SLOW_CONFIG)
    return root


def slow_answer(x: np.ndarray, *, repeats: int = DRAIN_REPEATS) -> np.ndarray:
    return x.astype(np.float64) ** (2 ** repeats) / SLOW_SIZE


def slow_stats(url: str) -> tuple[int, int]:
    """(rows executed, requests queued) of the slow model, from Triton's Prometheus metrics."""
    values = {}
    for line in httpx.get(f"http://{url}/metrics", timeout=10).text.splitlines():
        for name in ("nv_inference_count", "nv_inference_pending_request_count"):
            if line.startswith(name + '{model="slow"'):
                values[name] = int(float(line.rsplit(" ", 1)[1]))
    return values["nv_inference_count"], values["nv_inference_pending_request_count"]


def wait_all_received(url: str, total: int, *, batch: int = 8) -> int:
    """Wait until the server holds all `total` requests (executed + queued + at most one running batch), and
    one more batch has completed since (the last senders are then long done). Returns the queue depth."""
    def held() -> tuple[int, int] | None:
        done, queued = slow_stats(url)
        return (done, queued) if done + queued + batch >= total else None

    first_done, _ = wait_until(held, timeout=120, what=f"{total} requests to reach the server")
    _, queued = wait_until(lambda: (s := held()) and s[0] > first_done and s, timeout=120,
                              what="one more batch to complete")
    assert queued > 0, "the queue drained before SIGTERM; the test would not exercise queued requests"
    return queued


async def _http_requests(url: str, xs: np.ndarray) -> list[np.ndarray]:
    client = httpaio.InferenceServerClient(url, conn_limit=len(xs), conn_timeout=300)
    try:
        async def one(x: np.ndarray) -> np.ndarray:
            inp = httpaio.InferInput("x", [1, 1], "FP32")
            inp.set_data_from_numpy(x.reshape(1, 1), binary_data=True)
            return (await client.infer("slow", [inp])).as_numpy("y")

        return await asyncio.gather(*(one(x) for x in xs), return_exceptions=True)
    finally:
        await client.close()


async def _grpc_requests(url: str, xs: np.ndarray) -> list[np.ndarray]:
    client = grpcaio.InferenceServerClient(url)
    try:
        async def one(x: np.ndarray) -> np.ndarray:
            inp = grpcaio.InferInput("x", [1, 1], "FP32")
            inp.set_data_from_numpy(x.reshape(1, 1))
            return (await client.infer("slow", [inp], client_timeout=300)).as_numpy("y")

        return await asyncio.gather(*(one(x) for x in xs), return_exceptions=True)
    finally:
        await client.close()


def _in_background(pool: cf.ThreadPoolExecutor, coro_fn, *args) -> cf.Future:
    return pool.submit(lambda: asyncio.run(coro_fn(*args)))


# ---------------------------------------------------------------------------------------------- shutdown

def test_sigterm_answers_every_request_in_flight_on_http_and_grpc(tmp_path: Path) -> None:
    """A few hundred requests running and queued on both transports: SIGTERM loses none, exit code 0."""
    repo = slow_repo(tmp_path / "models")
    grpc_port = free_port()
    n = 150
    xs_http = np.linspace(0.9, 1.0, n, dtype=np.float32)  # distinct answers: x ** 64 spreads them out
    xs_grpc = np.linspace(1.0, 1.1, n + 1, dtype=np.float32)[1:]
    with serving(repo, args=["--grpc-port", str(grpc_port), "--exit-timeout-secs", "300"]) as (proc, url), \
            cf.ThreadPoolExecutor(2) as pool:
        http_done = _in_background(pool, _http_requests, url, xs_http)
        grpc_done = _in_background(pool, _grpc_requests, f"127.0.0.1:{grpc_port}", xs_grpc)
        queued = wait_all_received(url, 2 * n)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        http_results, grpc_results = http_done.result(timeout=300), grpc_done.result(timeout=300)
        rc = proc.wait(timeout=300)
        print(f"SIGTERM with {queued} queued of {2 * n}: exit {rc} after {time.monotonic() - t0:.1f} s")
    for transport, xs, results in (("http", xs_http, http_results), ("grpc", xs_grpc, grpc_results)):
        lost = [r for r in results if isinstance(r, BaseException)]
        assert not lost, f"{transport}: {len(lost)} of {len(xs)} lost, e.g. {lost[0]!r}"
        got = np.array([r.reshape(-1)[0] for r in results])
        np.testing.assert_allclose(got, slow_answer(xs), rtol=1e-3, err_msg=transport)
    assert rc == 0


def test_readiness_turns_503_at_sigterm_while_requests_drain(tmp_path: Path) -> None:
    repo = slow_repo(tmp_path / "models")
    grpc_port = free_port()
    xs = np.linspace(0.9, 1.1, 40, dtype=np.float32)
    with serving(repo, args=["--grpc-port", str(grpc_port), "--exit-timeout-secs", "300"]) as (proc, url), \
            cf.ThreadPoolExecutor(1) as pool, httpx.Client(base_url=f"http://{url}", timeout=60) as probe:
        grpc_probe = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert probe.get("/v2/health/ready").status_code == 200 and grpc_probe.is_server_ready()
        draining = _in_background(pool, _http_requests, url, xs)
        wait_all_received(url, len(xs))
        proc.send_signal(signal.SIGTERM)
        # The probe's keep-alive connection is still served while the queue drains, and says 503.
        resp = wait_until(lambda: (r := probe.get("/v2/health/ready")).status_code == 503 and r, timeout=30,
                          what="readiness to turn 503")
        assert resp.json() == {"ready": False}
        assert not draining.done(), "the requests finished before the probe; nothing was draining"
        # New connections are refused on HTTP, new RPCs on gRPC.
        wait_until(lambda: _refused(url), timeout=30, what="the HTTP port to stop accepting")
        with pytest.raises(Exception, match=r"(?i)unavailable|refused|shut"):
            grpc_probe.is_server_ready()
        results = draining.result(timeout=300)
        assert proc.wait(timeout=300) == 0
    assert not [r for r in results if isinstance(r, BaseException)]


def _refused(url: str) -> bool:
    try:
        httpx.get(f"http://{url}/v2/health/live", timeout=5)
    except httpx.ConnectError:
        return True
    return False


def test_half_sent_request_and_idle_connection_do_not_delay_exit_past_the_timeout(tmp_path: Path) -> None:
    root = tmp_path / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    exit_timeout = 3.0
    env = {"MODELSERVE_HTTP_BODY_TIMEOUT_SECS": "600"}  # only the exit timeout may end the half-sent body
    with serving(root, args=["--exit-timeout-secs", str(exit_timeout)], env=env) as (proc, url):
        host, port = url.split(":")
        idle, half = socket.create_connection((host, int(port))), socket.create_connection((host, int(port)))
        for sock in (idle, half):  # one full request each first: both connections are accepted and kept alive
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        half.sendall(b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=exit_timeout + 60)  # hung forever before the exit timeout existed
        elapsed = time.monotonic() - t0
        print(f"exit {rc} {elapsed:.1f} s after SIGTERM with a half-sent body and an idle connection")
        idle.close()
        half.close()
    assert rc == 0
    assert elapsed < exit_timeout + 30, f"exit took {elapsed:.1f} s with --exit-timeout-secs {exit_timeout}"


# ---------------------------------------------------------------------------------------------- slow clients

def test_slow_headers_and_stalled_bodies_are_cut_off(tmp_path: Path) -> None:
    root = tmp_path / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    env = {"MODELSERVE_HTTP_HEADER_TIMEOUT_SECS": "1", "MODELSERVE_HTTP_BODY_TIMEOUT_SECS": "1"}
    with serving(root, env=env) as (_, url):
        host, port = url.split(":")
        slow_header = socket.create_connection((host, int(port)))
        silent = socket.create_connection((host, int(port)))
        stalled = socket.create_connection((host, int(port)))
        slow_header.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        stalled.sendall(b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 200\r\n\r\n{\"inputs\": [")
        for sock in (slow_header, silent, stalled):
            sock.settimeout(60)
        for sock in (slow_header, silent):
            answer = _read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408") and b"request headers not received within 1 s" in answer
        answer = _read_until_closed(stalled)
        assert answer.startswith(b"HTTP/1.1 408") and b"request body stalled" in answer, answer
        # A client that sends in time is served as ever.
        assert httpx.get(f"http://{url}/v2/health/live", timeout=10).status_code == 200


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (recv returns b"")."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------- ports

@pytest.mark.parametrize("what,flag", [("HTTP", "--http-port"), ("gRPC", "--grpc-port"),
                                       ("metrics", "--metrics-port")])
def test_port_clash_is_one_line_naming_the_port(tmp_path: Path, what: str, flag: str) -> None:
    root = tmp_path / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    # Another server on the port, listening with SO_REUSEPORT as gRPC servers do: a second gRPC server
    # that also asked for port sharing would bind it too and silently take half the connections.
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    taken = other.getsockname()[1]
    ports = {"--http-port": free_port(), "--grpc-port": free_port(), "--metrics-port": free_port(), flag: taken}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(root),
           "--http-address", "127.0.0.1", "--log-level", "warning"]
    for f, p in ports.items():
        cmd += [f, str(p)]
    try:
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    finally:
        other.close()
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0
    assert lines == [f"modelserve: cannot bind {what} port {taken} on 127.0.0.1: address already in use; "
                     f"stop the other server or pass {flag}"], lines


# ---------------------------------------------------------------------------------------------- readiness

def _broken_repo(root: Path) -> Path:
    scale_model(root / "good" / "1" / "model.onnx")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    return root


async def test_strict_readiness_waits_for_every_model(tmp_path: Path) -> None:
    repo = _broken_repo(tmp_path / "models")
    async with inprocess_server(repo) as (_, client):
        assert (await client.get("/v2/health/live")).status_code == 200
        resp = await client.get("/v2/health/ready")
        assert resp.status_code == 503 and resp.json() == {"ready": False}
    async with inprocess_server(repo, strict_readiness=False) as (_, client):
        assert (await client.get("/v2/health/ready")).status_code == 200


async def test_strict_readiness_follows_explicit_loads_and_unloads(tmp_path: Path) -> None:
    repo = _broken_repo(tmp_path / "models")
    async with inprocess_server(repo, model_control_mode="explicit", load_model=["good"]) as (_, client):
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert (await client.post("/v2/repository/models/broken/load")).status_code == 400
        assert (await client.get("/v2/health/ready")).status_code == 503
        assert (await client.post("/v2/repository/models/broken/unload")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200


@pytest.mark.parametrize("mode", ["none", "poll"])
async def test_empty_repository_is_not_ready(tmp_path: Path, mode: str) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    async with inprocess_server(repo, model_control_mode=mode) as (_, client):
        assert (await client.get("/v2/health/ready")).status_code == 503
    async with inprocess_server(repo, model_control_mode=mode, strict_readiness=False) as (_, client):
        assert (await client.get("/v2/health/ready")).status_code == 200


async def test_ready_turns_false_when_shutdown_begins(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    scale_model(repo / "m" / "1" / "model.onnx")
    async with inprocess_server(repo) as (server, client):
        assert (await client.get("/v2/health/ready")).status_code == 200
        server.core.begin_shutdown()
        assert (await client.get("/v2/health/ready")).status_code == 503


# ---------------------------------------------------------------------------------------------- unloading

def heavy_model(path: Path, *, rows: int = 1024, cols: int = 4096) -> Path:
    """y = x @ W with a 16 MB weight: a leaked session shows in RSS."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])
    w = numpy_helper.from_array(np.random.default_rng(0).random((rows, cols), dtype=np.float32), "w")
    return _save(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "heavy", [x], [y], [w]), path)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def _gc_off() -> Iterator[None]:
    """Only reference counting may free the sessions: the cyclic collector used to be what freed them."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_unload_frees_the_session_without_the_garbage_collector(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    heavy_model(repo / "m" / "1" / "model.onnx")
    async with inprocess_server(repo, model_control_mode="explicit", load_model=["m"]) as (server, client):
        with _gc_off():
            sessions = server.core.model("m").pool.sessions()
            refs = [weakref.ref(s) for s in sessions]
            del sessions
            assert all(r() is not None for r in refs)
            assert (await client.post("/v2/repository/models/m/unload")).status_code == 200
            assert [r() for r in refs] == [None] * len(refs)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
async def test_rss_stays_flat_over_load_unload_cycles(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    heavy_model(repo / "m" / "1" / "model.onnx")  # 16 MB of weights: 50 leaked copies would be 800 MB
    async with inprocess_server(repo, model_control_mode="explicit", warmup=False) as (_, client):
        with _gc_off():
            for cycle in range(50):
                assert (await client.post("/v2/repository/models/m/load")).status_code == 200
                assert (await client.post("/v2/repository/models/m/unload")).status_code == 200
                if cycle == 4:
                    settled = _rss_mb()
            grown = _rss_mb() - settled
    print(f"RSS grew {grown:.0f} MB over cycles 5-50")
    assert grown < 200, f"RSS grew {grown:.0f} MB over 45 load/unload cycles of a 16 MB model"

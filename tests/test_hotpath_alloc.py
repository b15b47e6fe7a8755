"""Per-request work taken off the hot path keeps its answers: infer responses written to the connection in one
write (http_server.respond_at_once) carry what uvicorn's own `send` wrote, the request histograms
(metrics.RequestHistograms) count as prometheus_client's Histogram does, and the batcher hands the next batch to
the model before it wakes the callers of the batch that just ran."""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry, Histogram

from service.batcher import Batcher
from service.errors import BackendError
from service.metrics import RequestHistograms, exposition
from service.modelrepo.config import BatchingPolicy
from tests.conftest import run_server
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, write_config

BINARY_HEADER = orjson.dumps({
    "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}],
    "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
})
JSON_BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
BAD_BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})
X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hotpath_alloc") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    scale_model(root / "alone" / "1" / "model.onnx")
    write_config(root / "alone", "max_batch_size: 8\n")  # no dynamic batching: each request is its own batch
    return root


def _raw_request(body: bytes, *, binary: bool, close: bool = False) -> bytes:
    head = b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: localhost\r\n"
    if binary:
        head += b"Inference-Header-Content-Length: %d\r\n" % len(BINARY_HEADER)
    if close:
        head += b"Connection: close\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _read_answer(sock: socket.socket, buffered: bytes, *,
                 status_line: bytes = b"HTTP/1.1 200 OK") -> tuple[list[tuple[bytes, bytes]], bytes, bytes]:
    """(header lines as (name, value) in order, body, bytes after it) of one HTTP/1.1 answer."""
    data = buffered
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    status, *lines = head.split(b"\r\n")
    assert status == status_line, head
    headers = [(name.strip().lower(), value.strip()) for name, value in (line.split(b":", 1) for line in lines)]
    length = int(dict(headers)[b"content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    return headers, rest[:length], rest[length:]


@pytest.fixture(scope="module")
def direct(repo) -> dict[str, tuple[list[tuple[bytes, bytes]], bytes]]:
    """Answers of the real server (uvicorn, so the direct write) on one connection: keep-alive, then a
    pipelined pair whose second asks to close."""
    binary_body = BINARY_HEADER + X.tobytes()
    answers = {}
    with run_server(repo) as url:
        host, port = url.split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(_raw_request(binary_body, binary=True) + _raw_request(BAD_BODY, binary=False))
            *answers["binary"], left = _read_answer(sock, b"")
            # An error answer still goes through uvicorn's own `send`: the reference for the headers it adds.
            *answers["error"], left = _read_answer(sock, left, status_line=b"HTTP/1.1 400 Bad Request")
            sock.sendall(_raw_request(JSON_BODY, binary=False) + _raw_request(binary_body, binary=True, close=True))
            *answers["json"], left = _read_answer(sock, left)
            *answers["closing"], left = _read_answer(sock, left)
            answers["after"] = ([], left + sock.recv(1))  # b"": closed after the answer it was asked to close
    return answers


def test_answers_written_at_once_carry_uvicorns_headers_then_ours(direct):
    (binary_headers, binary_answer), (json_headers, json_answer) = direct["binary"], direct["json"]
    closing_headers, closing_answer = direct["closing"]
    assert direct["after"] == ([], b"")
    # uvicorn's default headers first (as its `send` wrote them on the error answer), then ours, in the order the
    # ASGI path sends them; no chunked encoding.
    uvicorns = [n for n, _ in direct["error"][0][:2]]
    assert uvicorns == [b"date", b"server"]
    assert [n for n, _ in binary_headers] == [*uvicorns, b"content-type", b"content-length",
                                               b"inference-header-content-length"]
    assert [n for n, _ in json_headers] == [*uvicorns, b"content-type", b"content-length"]
    assert [n for n, _ in closing_headers] == [n for n, _ in binary_headers] + [b"connection"]
    assert dict(closing_headers)[b"connection"] == b"close" and closing_answer == binary_answer
    hlen = int(dict(binary_headers)[b"inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(binary_answer[hlen:], dtype=np.float32).reshape(2, 4), X * 2)
    assert orjson.loads(json_answer)["outputs"][0]["data"] == [2, 4, 6, 8]


async def test_the_asgi_path_answers_byte_for_byte_as_the_direct_write(repo, direct):
    """Under an ASGI server other than uvicorn (here httpx's in-process transport) the answer goes through
    `send`; the body and our headers are the same bytes as the direct write's."""
    direct_headers, direct_body = direct["binary"]
    async with inprocess_server(repo) as (_, client):
        resp = await client.post("/v2/models/scale/infer", content=BINARY_HEADER + X.tobytes(),
                                 headers={"Inference-Header-Content-Length": str(len(BINARY_HEADER))})
    assert resp.status_code == 200
    assert resp.content == direct_body
    ours = dict(direct_headers)
    for name in (b"content-type", b"content-length", b"inference-header-content-length"):
        assert resp.headers[name.decode()].encode() == ours[name], name


def _samples(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_request_histograms_expose_what_prometheus_client_histograms_would():
    """Same values, including ones exactly on a bucket bound and past the last: the same exposition lines."""
    bounds = (0.001, 0.01, 1.0, 16.0)
    values = [0.0, 0.001, 0.0011, 0.01, 0.5, 1.0, 16.0, 17.0, 1e6]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = RequestHistograms("h", "doc", bounds)
    ours.register(fast)
    reference = Histogram("h", "doc", ["model", "version"], registry=theirs, buckets=bounds)
    for model, version in (("a", "1"), ("b", "2")):
        child = fast.child(model, version)
        for v in values[: 5 if model == "a" else None]:
            fast.observe(child, v)
            reference.labels(model, version).observe(v)
    assert exposition(ours).decode() == exposition(theirs).decode()
    assert _samples(exposition(ours).decode(), 'h_bucket{le="+Inf",model="b"')[0].endswith(f" {len(values)}.0")


async def test_request_histograms_count_each_answered_request_once(repo):
    async with inprocess_server(repo) as (_, client):
        for rows in (1, 2, 3):
            body = {"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [1.0] * 4 * rows}]}
            assert (await client.post("/v2/models/alone/infer", json=body)).status_code == 200
        bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        assert (await client.post("/v2/models/alone/infer", json=bad)).status_code == 400
        text = (await client.get("/metrics")).text
    series = '{model="alone",version="1"}'
    sizes = {line.split('le="')[1].split('"')[0]: float(line.split()[-1])
             for line in _samples(text, 'modelserve_batch_size_bucket{le=') if 'model="alone"' in line}
    assert (sizes["1.0"], sizes["2.0"], sizes["4.0"], sizes["+Inf"]) == (1, 2, 3, 3)
    assert _samples(text, f"modelserve_batch_size_sum{series}") == [f"modelserve_batch_size_sum{series} 6.0"]
    for name in ("modelserve_request_latency_seconds", "modelserve_queue_wait_seconds"):
        assert _samples(text, f"{name}_count{series}") == [f"{name}_count{series} 3.0"]  # the 400 is not counted
    (latency_sum,) = _samples(text, f"modelserve_request_latency_seconds_sum{series}")
    assert float(latency_sum.split()[-1]) > 0


class _RecordingExecutor(ThreadPoolExecutor):
    """The batcher's executor, noting each run handed to it (submit is called on the event loop's thread)."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(1)
        self.log = log

    def submit(self, fn, /, *args, **kwargs):
        self.log.append("run")
        return super().submit(fn, *args, **kwargs)


async def test_the_next_batch_is_handed_to_the_model_before_the_last_ones_callers_resume():
    log: list[str] = []
    gate, started = threading.Event(), threading.Event()

    def model(feeds):
        started.set()
        gate.wait(30)
        return {"y": feeds["x"] * 2}, 0, 0

    policy = BatchingPolicy(preferred_batch_sizes=(2,), max_queue_delay_us=60_000_000)  # batches form by size
    b = Batcher(model="m", run=model, executor=_RecordingExecutor(log), policy=policy, max_batch_size=2,
                concurrency=1)
    b.start()

    async def call(value: float) -> np.ndarray:
        result = await b.submit(inputs={"x": np.full((1, 3), value, np.float32)}, rows=1, timeout_s=None)
        log.append("answer")
        return result.outputs["y"]

    first = [asyncio.ensure_future(call(v)) for v in (1, 2)]
    await asyncio.to_thread(started.wait, 30)  # the first batch is running, held at the gate
    second = [asyncio.ensure_future(call(v)) for v in (3, 4)]
    await wait_until_async(lambda: len(b.queue) == 2)
    gate.set()
    answers = await asyncio.wait_for(asyncio.gather(*first, *second), timeout=30)
    assert log == ["run", "run", "answer", "answer", "answer", "answer"]
    for value, y in zip((1, 2, 3, 4), answers):
        np.testing.assert_array_equal(y, np.full((1, 3), 2 * value))
    await b.close(grace_s=1)


async def wait_until_async(condition, *, timeout_s: float = 30.0) -> None:
    """Yield to the event loop until `condition()` holds (the requests are queued synchronously by submit)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        assert loop.time() < end, "condition never held"
        await asyncio.sleep(0)


async def test_a_batch_that_cannot_be_handed_to_the_model_fails_alone_and_collection_goes_on():
    executor = ThreadPoolExecutor(1)
    policy = BatchingPolicy(preferred_batch_sizes=(1,), max_queue_delay_us=60_000_000)
    b = Batcher(model="m", run=lambda feeds: ({"y": feeds["x"] * 2}, 0, 0), executor=executor, policy=policy,
                max_batch_size=2, concurrency=1)
    b.start()
    executor.shutdown()  # the executor refuses the run: submit raises in the collector's step
    with pytest.raises(BackendError, match="inference failed"):
        await asyncio.wait_for(b.submit(inputs={"x": np.ones((1, 3), np.float32)}, rows=1, timeout_s=None), 30)
    b.executor = ThreadPoolExecutor(1)  # the collector is still running: the next request is answered
    result = await asyncio.wait_for(b.submit(inputs={"x": np.ones((1, 3), np.float32)}, rows=1, timeout_s=None), 30)
    np.testing.assert_array_equal(result.outputs["y"], np.full((1, 3), 2.0))
    await b.close(grace_s=1)

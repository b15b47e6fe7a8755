"""V2 infer answered inside the HTTP protocol (service/http_protocol_infer.py, setting `http_protocol_infer`)
behaves as the ASGI route does: the same bytes for every answer, pipelining in order (mixed with ASGI-path
requests), reading paused behind pending answers, writing after a paused writer drains, a client that leaves,
keep-alive timeout, the drain on SIGTERM, metrics and statistics, the access log.

Servers are real uvicorn on loopback ports: `loopback()` runs Server's core + DrainingServer in a thread (so
the test can read the protocol's state), and the drain test runs `modelserve serve` in a subprocess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gzip
import logging
import re
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
import uvloop
from onnx import TensorProto, helper, numpy_helper

from service.http_server import DrainingServer
from service.ports import PortSpec, bind_tcp
from service.server import Server, uvicorn_config
from service.settings import ServerSettings
from tests.conftest import wait_until
from tests.onnx_builders import _save, scale_model, slow_model, write_config
from tests.test_lifecycle import serving, slow_answer, slow_repo, wait_all_received

WIDE = 1 << 20  # floats per row of the `wide` model's output: 4 MiB answers fill the socket's buffers
HEADER = orjson.dumps({
    "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}],
    "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
})
X = np.arange(8, dtype=np.float32).reshape(2, 4)
JSON_BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
SLOW_BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]})
WIDE_BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [3.0]}],
                          "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})


def wide_model(path: Path) -> Path:
    """y[N, WIDE] = x[N, 1] broadcast: a small request with a large answer."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDE])
    ones = numpy_helper.from_array(np.ones((1, WIDE), dtype=np.float32), "ones")
    return _save(helper.make_graph([helper.make_node("Mul", ["x", "ones"], ["y"])], "wide", [x], [y], [ones]), path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("protocol_infer") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    slow_model(root / "slow" / "1" / "model.onnx", size=384, repeats=10)
    write_config(root / "slow", "max_batch_size: 8\n")
    wide_model(root / "wide" / "1" / "model.onnx")
    write_config(root / "wide", "max_batch_size: 1\n")
    return root


@pytest.fixture(scope="module")
def slower_repo(tmp_path_factory) -> Path:
    """`scale` and a model slow enough (~1 s a row) for a client to leave while its request runs."""
    root = tmp_path_factory.mktemp("protocol_infer_slower") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    slow_model(root / "slower" / "1" / "model.onnx", size=384, repeats=200)
    write_config(root / "slower", "max_batch_size: 1\n")
    return root


# ---------------------------------------------------------------------------------------------- helpers

class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Loopback:
    port: int
    http: DrainingServer
    loop: asyncio.AbstractEventLoop
    access_lines: list[str]

    def connections(self) -> list[Any]:
        return list(self.http.server_state.connections)

    @property
    def in_flight(self) -> int:
        return len(getattr(self.http.config.http_protocol_class, "in_flight", ()))

    @property
    def tasks(self) -> int:
        return len(self.http.server_state.tasks)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)


@contextmanager
def loopback(repo: Path, *, keep_alive_s: float = 30, access_log: bool = False, **settings: Any) -> Iterator[Loopback]:
    """The real Server's core and HTTP stack (uvicorn, our protocol, the drain) on a loopback port, in a thread
    with its own uvloop loop, as `modelserve serve` runs them."""
    s = ServerSettings(model_repository=repo, http_host="127.0.0.1", http_port=0, **settings)
    started: cf.Future = cf.Future()
    stop = threading.Event()

    async def main() -> None:
        server = Server(s)
        await server.start()
        config = uvicorn_config(s, server.app)
        config.timeout_keep_alive = keep_alive_s
        http = DrainingServer(config)
        sock = bind_tcp(PortSpec("HTTP", "127.0.0.1", 0, "--http-port"), listen=True)
        access = logging.getLogger("uvicorn.access")
        handler = ListHandler()
        if access_log:  # what a log config that keeps uvicorn's access log does (uvicorn reads it per connection)
            access.addHandler(handler)
        config.load()  # the protocol class (and its in-flight set) exists from here; the socket already listens
        serving_task = asyncio.ensure_future(http.serve(sockets=[sock]))
        loop = asyncio.get_running_loop()
        started.set_result(Loopback(sock.getsockname()[1], http, loop, handler.lines))
        await loop.run_in_executor(None, stop.wait)
        http.deadline, http.should_exit = loop.time() + 10, True
        await serving_task
        access.removeHandler(handler)
        sock.close()
        await server.stop()

    thread = threading.Thread(target=lambda: uvloop.run(main()), daemon=True)
    thread.start()
    try:
        yield started.result(timeout=60)
    finally:
        stop.set()
        thread.join(timeout=60)


def raw(path: str, body: bytes, *, headers: dict[str, str] | None = None, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: localhost", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def binary_request(**headers: str) -> bytes:
    return raw("/v2/models/scale/infer", HEADER + X.tobytes(),
               headers={"Inference-Header-Content-Length": str(len(HEADER)), **headers})


class Reader:
    """Whole HTTP/1.1 answers, one after the other, from one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def _more(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"connection closed with {self.buffer[:200]!r} unread")
        self.buffer += chunk

    def answer(self) -> bytes:
        """One answer's bytes, with the Date header's value (the only one that varies) blanked."""
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, _ = self.buffer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
        while len(self.buffer) < len(head) + 4 + length:
            self._more()
        answer, self.buffer = self.buffer[:len(head) + 4 + length], self.buffer[len(head) + 4 + length:]
        return re.sub(rb"\r\ndate: [^\r]*", b"\r\ndate: -", answer)

    def closed(self) -> bool:
        return self.sock.recv(1) == b"" and not self.buffer


def exchange(lb: Loopback, requests: list[bytes], *, one_write: bool = True) -> list[bytes]:
    with lb.connect() as sock:
        reader = Reader(sock)
        if one_write:
            sock.sendall(b"".join(requests))
            return [reader.answer() for _ in requests]
        out = []
        for request in requests:
            sock.sendall(request)
            out.append(reader.answer())
        return out


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


CASES = {
    "binary": binary_request(),
    "json": raw("/v2/models/scale/infer", JSON_BODY),
    "versioned": raw("/v2/models/scale/versions/1/infer", JSON_BODY),
    "raw binary": raw("/v2/models/scale/infer", X[:1].tobytes(), headers={"Inference-Header-Content-Length": "0"}),
    "404 model": raw("/v2/models/nope/infer", JSON_BODY),
    "404 version": raw("/v2/models/scale/versions/7/infer", JSON_BODY),
    "400 shape": raw("/v2/models/scale/infer", JSON_BODY.replace(b"[1,4]", b"[1,3]")),
    "400 model shape": raw("/v2/models/scale/infer", JSON_BODY.replace(b"[1,4]", b"[1,3]").replace(b",4]", b"]")),
    "400 json": raw("/v2/models/scale/infer", b"{not json"),
    "400 header length": raw("/v2/models/scale/infer", JSON_BODY, headers={"Inference-Header-Content-Length": "x"}),
    "413": raw("/v2/models/scale/infer", b" " * 5000 + JSON_BODY),
    "HTTP/1.0": raw("/v2/models/scale/infer", JSON_BODY, version="1.0"),
    "close": binary_request(Connection="close"),
}


# ---------------------------------------------------------------------------------------------- answers

@pytest.fixture(scope="module")
def answers(repo) -> dict[bool, dict[str, bytes]]:
    """Every case's answer, on its own connection, from a server with the protocol path on and one with it off."""
    out = {}
    for on in (True, False):
        with loopback(repo, http_protocol_infer=on, max_request_bytes=4096) as lb:
            out[on] = {name: exchange(lb, [request])[0] for name, request in CASES.items()}
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_every_answer_is_byte_identical_to_the_asgi_routes(answers, case):
    assert answers[True][case] == answers[False][case]


def test_the_answers_are_what_the_route_promises(answers):
    got = answers[True]
    assert {name: status_of(a) for name, a in got.items()} == {
        "binary": 200, "json": 200, "versioned": 200, "raw binary": 200, "404 model": 404, "404 version": 404,
        "400 shape": 400, "400 model shape": 400, "400 json": 400, "400 header length": 400, "413": 413, "HTTP/1.0": 200, "close": 200}
    assert orjson.loads(body_of(got["json"]))["outputs"][0]["data"] == [2, 4, 6, 8]
    header_len = len(body_of(got["binary"])) - 32
    np.testing.assert_array_equal(np.frombuffer(body_of(got["binary"])[header_len:], np.float32), (X * 2).ravel())
    assert b"connection: close\r\n" in got["close"] and b"connection: close\r\n" in got["HTTP/1.0"]
    assert b"needs 3 elements" in body_of(got["400 shape"]) and b"4096" in body_of(got["413"])
    assert b"expected shape" in body_of(got["400 model shape"])


def test_the_protocol_answers_infer_without_an_asgi_task(slower_repo):
    """A request held in the model (the `slower` model: ~1 s a row, so a loaded CI machine still sees it running)
    is in the protocol's in-flight set, not in uvicorn's tasks; with the setting off it is an ASGI task."""
    for on in (True, False):
        with loopback(slower_repo, http_protocol_infer=on) as lb, lb.connect() as sock:
            sock.sendall(raw("/v2/models/slower/infer", SLOW_BODY) * 3)  # pipelined: the first runs, two wait
            wait_until(lambda: lb.in_flight + lb.tasks == 1, what="the request to be taken")
            assert (lb.in_flight, lb.tasks) == ((1, 0) if on else (0, 1))
            reader = Reader(sock)
            assert [status_of(reader.answer()) for _ in range(3)] == [200] * 3
            wait_until(lambda: lb.in_flight + lb.tasks == 0, what="nothing left in flight")


@pytest.mark.parametrize("setting", [
    {"api_keys": "the-key"},
    {"http_restricted_api": ["inference:infer-key=infer-secret"]},
])
def test_access_refusals_are_byte_identical(repo, setting):
    requests = [binary_request(), binary_request(Authorization="Bearer wrong"),
                binary_request(Authorization="Bearer the-key"), binary_request(**{"infer-key": "infer-secret"}),
                binary_request(**{"infer-key": "no"})]
    got = {}
    for on in (True, False):
        with loopback(repo, http_protocol_infer=on, **setting) as lb:
            got[on] = exchange(lb, requests)
    assert got[True] == got[False]
    expected = [401, 401, 200, 401, 401] if "api_keys" in setting else [403, 403, 403, 200, 403]
    assert [status_of(a) for a in got[True]] == expected


# ---------------------------------------------------------------------------------------------- connection

def test_pipelined_requests_are_answered_in_order_across_both_paths(repo):
    """One write carrying protocol-path infers, ASGI-path requests (a health check, a gzip body) and errors: answered in order, each as the ASGI route answers it alone."""
    gz = raw("/v2/models/scale/infer", gzip.compress(JSON_BODY), headers={"Content-Encoding": "gzip"})
    requests = [CASES["binary"], b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\n\r\n", CASES["404 model"],
                raw("/v2/models/slow/infer", SLOW_BODY), gz, CASES["json"], CASES["400 shape"], CASES["binary"]]
    with loopback(repo, http_protocol_infer=False) as lb:
        alone = exchange(lb, requests, one_write=False)
    with loopback(repo) as lb:
        assert exchange(lb, requests) == alone
    assert [status_of(a) for a in alone] == [200, 200, 404, 200, 200, 200, 400, 200]


def test_reading_pauses_behind_a_pending_answer_and_resumes(slower_repo):
    with loopback(slower_repo) as lb, lb.connect() as sock:
        sock.sendall(raw("/v2/models/slower/infer", SLOW_BODY) + CASES["json"])
        wait_until(lambda: lb.connections() and lb.connections()[0].flow.read_paused,
                   what="reading paused while the first answer is pending")
        reader = Reader(sock)
        assert [status_of(reader.answer()) for _ in range(2)] == [200, 200]
        wait_until(lambda: not lb.connections()[0].flow.read_paused, what="reading resumed")
        sock.sendall(CASES["json"])
        assert status_of(reader.answer()) == 200


def test_answers_wait_for_a_paused_writer_and_arrive_whole(repo):
    """A client that does not read two 4 MiB answers: the second waits (in a task) for the writer to drain,
    then both arrive whole, in order."""
    with loopback(repo) as lb, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.settimeout(30)
        sock.connect(("127.0.0.1", lb.port))
        request = raw("/v2/models/wide/infer", WIDE_BODY)
        sock.sendall(request + request.replace(b'"data":[3.0]', b'"data":[5.0]'))
        wait_until(lambda: lb.connections() and lb.connections()[0].flow.write_paused, what="writer paused")
        reader = Reader(sock)
        first, second = reader.answer(), reader.answer()
    for answer, value in ((first, 3.0), (second, 5.0)):
        assert status_of(answer) == 200
        data = np.frombuffer(body_of(answer)[-4 * WIDE:], np.float32)
        assert data.shape == (WIDE,) and (data == value).all()


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_client_that_leaves_before_its_answer_leaves_nothing_behind(slower_repo, caplog, pipelined):
    """Nothing is written to the closed connection and nothing logged, also when the request running is not the
    connection's latest (pipelined: one answered, the running one, one waiting behind it)."""
    with loopback(slower_repo) as lb:
        with caplog.at_level(logging.WARNING):
            with lb.connect() as sock:
                slower = raw("/v2/models/slower/infer", SLOW_BODY)
                sock.sendall(CASES["json"] + slower + CASES["json"] if pipelined else slower)
                if pipelined:
                    assert status_of(Reader(sock).answer()) == 200
                wait_until(lambda: lb.in_flight == 1 and _queued(lb, "slower") == 0, what="the request running")
            wait_until(lambda: len(lb.connections()) == 0, what="the connection lost")
            assert lb.in_flight == 1, "the request finished before the client left: the test shows nothing"
            wait_until(lambda: lb.in_flight == 0, what="the request given up")
            assert status_of(exchange(lb, [CASES["json"]])[0]) == 200
        assert lb.tasks == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def _queued(lb: Loopback, model: str) -> int:
    """Requests of `model` waiting in its queue (not yet running), from Triton's pending-count metric."""
    with lb.connect() as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        text = body_of(Reader(sock).answer()).decode()
    line = next(line for line in text.splitlines() if line.startswith(f'nv_inference_pending_request_count{{model="{model}"'))
    return int(float(line.rsplit(" ", 1)[1]))


def test_keep_alive_timeout_closes_an_idle_connection_after_a_protocol_answer(repo):
    with loopback(repo, keep_alive_s=0.5) as lb, lb.connect() as sock:
        reader = Reader(sock)
        sock.sendall(CASES["binary"])
        assert status_of(reader.answer()) == 200
        assert reader.closed()  # the server closed it: recv saw the end, not a timeout


def test_access_log_when_kept_is_as_before(repo):
    """With uvicorn's access log kept, requests take the ASGI route as before: the same lines are logged."""
    lines = {}
    for on in (True, False):
        with loopback(repo, access_log=True, http_protocol_infer=on) as lb:
            assert exchange(lb, [CASES["json"], CASES["404 model"]])
            lines[on] = [re.sub(r":\d+ - ", ":PORT - ", line) for line in lb.access_lines]
    assert lines[True] == lines[False]
    assert any('"POST /v2/models/nope/infer HTTP/1.1" 404' in line for line in lines[True])


# ---------------------------------------------------------------------------------------------- accounting

def _counters(lb: Loopback) -> tuple[dict, list[str]]:
    with lb.connect() as sock:
        sock.sendall(b"GET /v2/models/scale/stats HTTP/1.1\r\nHost: localhost\r\n\r\n"
                     b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reader = Reader(sock)
        stats, metrics = body_of(reader.answer()), body_of(reader.answer()).decode()
    doc = orjson.loads(stats)["model_stats"][0]
    counts = {k: doc[k] for k in ("inference_count", "execution_count")}
    counts.update({k: v["count"] for k, v in doc["inference_stats"].items()})
    keep = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
            "nv_inference_exec_count", "nv_inference_request_duration_us_count", "nv_inference_queue_duration_us_count")
    return counts, sorted(line.rsplit(" ", 1)[0] + " " + line.rsplit(" ", 1)[1]
                          for line in metrics.splitlines() if line.startswith(keep) and 'model="scale"' in line)


def test_statistics_and_metrics_count_as_the_asgi_route_does(repo):
    requests = [CASES["binary"], CASES["json"], CASES["400 model shape"], CASES["raw binary"], CASES["404 model"]]
    got = {}
    for on in (True, False):
        with loopback(repo, http_protocol_infer=on) as lb:
            for _ in range(3):
                exchange(lb, requests, one_write=False)
            client = httpclient.InferenceServerClient(f"127.0.0.1:{lb.port}")
            inp = httpclient.InferInput("x", [2, 4], "FP32")
            inp.set_data_from_numpy(X, binary_data=True)
            np.testing.assert_array_equal(client.infer("scale", [inp]).as_numpy("y"), X * 2)
            client.close()
            got[on] = _counters(lb)
    assert got[True] == got[False]
    assert got[True][0]["success"] == 10 and got[True][0]["fail"] == 3


# ---------------------------------------------------------------------------------------------- drain

def test_sigterm_answers_every_request_received_with_connection_close(tmp_path):
    """Raw requests on their own connections, running and queued in the model: after SIGTERM every one is
    answered, those answered during the drain with `connection: close`, every connection is closed, exit 0."""
    repo = slow_repo(tmp_path / "models")
    n = 64  # 48 left 16 queued in one CI run, and both batches were answered before the drain had marked one
    xs = np.linspace(0.9, 1.0, n, dtype=np.float32)
    with serving(repo, args=["--exit-timeout-secs", "300"]) as (proc, url):
        host, port = url.split(":")
        socks = [socket.create_connection((host, int(port)), timeout=300) for _ in range(n)]
        for sock, x in zip(socks, xs, strict=True):
            body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [float(x)]}]})
            sock.sendall(raw("/v2/models/slow/infer", body))
        queued = wait_all_received(url, n)
        proc.send_signal(signal.SIGTERM)
        answers = [Reader(sock).answer() for sock in socks]
        closed = [Reader(sock).closed() for sock in socks]
        assert proc.wait(timeout=300) == 0
        for sock in socks:
            sock.close()
    assert [status_of(a) for a in answers] == [200] * n
    # `queued` was read just before the signal: a batch or two (8 rows each) may finish, answered normally, before
    # the signal lands on a loaded machine; everything still queued then is answered during the drain, marked
    # at the signal (DrainingServer.begin_drain), not at uvicorn's next 0.1 s tick.
    assert sum(b"connection: close\r\n" in a for a in answers) >= max(1, queued - 16) and all(closed)
    got = [orjson.loads(body_of(a))["outputs"][0]["data"][0] for a in answers]
    np.testing.assert_allclose(got, slow_answer(xs).ravel(), rtol=1e-3)


# ---------------------------------------------------------------------------------------------- tracing

def _trace_shapes(path: Path) -> list[tuple[str, tuple, tuple, str]]:
    """Per trace (in the order roots were written): root name, its attributes (timing-free), child span names,
    its status."""
    spans = [orjson.loads(line) for line in path.read_text().splitlines() if line.strip()]
    roots = [s for s in spans if s["parent_id"] is None]
    shapes = []
    for root in roots:
        children = sorted(s["name"] for s in spans
                          if s["context"]["trace_id"] == root["context"]["trace_id"] and s is not root)
        attributes = tuple(sorted((k, str(v)) for k, v in root["attributes"].items() if "time" not in k))
        shapes.append((root["name"], attributes, tuple(children), str(root.get("status"))))
    return shapes


def test_sampled_requests_are_traced_as_on_the_asgi_route(repo, tmp_path):
    shapes = {}
    for on in (True, False):
        trace_file = tmp_path / f"trace-{on}.jsonl"
        with loopback(repo, http_protocol_infer=on, trace_file=trace_file, trace_level=["TIMESTAMPS"],
                      trace_rate=1) as lb:
            answers = exchange(lb, [CASES["binary"], CASES["400 model shape"], CASES["json"]], one_write=False)
            assert [status_of(a) for a in answers] == [200, 400, 200]
            shapes[on] = wait_until(lambda: len(s := _trace_shapes(trace_file)) >= 3 and s,  # noqa: B023
                                    what="three traces written")
    assert shapes[True] == shapes[False]
    assert shapes[True][0][2] == ("compute", "decode", "encode", "queue") and "ERROR" in shapes[True][1][3]

"""Security and protocol edges, round 5 (docs/RELIABILITY.md): each problem found by attacking a real
`modelserve serve` from outside, as a regression test against real subprocess servers over raw sockets (the
HTTP protocol path `http_protocol_infer` on, and off: both must answer alike) and the real tritonclient."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.http import InferenceServerClient as tritonclient_http
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server, wait_until
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, slow_model, string_model, write_config
from tests.test_protocol_infer import Reader, loopback, status_of

LIMIT = 4096  # max_request_bytes of the servers here
BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
INFER = "/v2/models/scale/infer"
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n"
H2C = ["Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA"]


def request(*, path: str = INFER, body: bytes = BODY, headers: list[str] | None = None, length: bool = True,
            method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"] + ([f"Content-Length: {len(body)}"] if length else [])
    return ("\r\n".join(lines + (headers or [])) + "\r\n\r\n").encode() + body


def chunked(body: bytes, *, size: int = 16) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


class Connection:
    """One raw HTTP/1.1 connection: whole answers read one after the other (1xx answers have no body)."""

    def __init__(self, url: str) -> None:
        host, port = url.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.buffer = b""

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"connection closed with {self.buffer[:200]!r} unread")
        self.buffer += chunk

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, _ = self.buffer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:])
        length = 0 if status < 200 else int(headers.get("content-length", "0"))
        while len(self.buffer) < len(head) + 4 + length:
            self._more()
        body = self.buffer[len(head) + 4:len(head) + 4 + length]
        self.buffer = self.buffer[len(head) + 4 + length:]
        return status, headers, body

    def closed(self) -> bool:
        """The server closed the connection (blocks until it does or sends more)."""
        return not self.buffer and self.sock.recv(1) == b""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("security5") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    slow_model(root / "slow" / "1" / "model.onnx")
    write_config(root / "slow", "max_batch_size: 1\n")
    return root


@pytest.fixture(scope="module", params=[True, False], ids=["protocol-path", "asgi-path"])
def server(request: pytest.FixtureRequest, repo: Path) -> Iterator[str]:
    env = {"MODELSERVE_HTTP_PROTOCOL_INFER": str(request.param).lower(), "MODELSERVE_MAX_REQUEST_BYTES": str(LIMIT)}
    with run_server(repo, env=env) as url:
        yield url


@pytest.fixture(scope="module")
def both(repo: Path) -> Iterator[tuple[str, str]]:
    """A server with the protocol path and one without, side by side."""
    env = {"MODELSERVE_MAX_REQUEST_BYTES": str(LIMIT)}
    with run_server(repo, env={**env, "MODELSERVE_HTTP_PROTOCOL_INFER": "true"}) as fast, \
            run_server(repo, env={**env, "MODELSERVE_HTTP_PROTOCOL_INFER": "false"}) as asgi:
        yield fast, asgi


def served(answer: tuple[int, dict[str, str], bytes]) -> list[float]:
    status, _, body = answer
    assert status == 200, body
    return orjson.loads(body)["outputs"][0]["data"]


# ---------------------------------------------------------------------------------------------- Upgrade

@pytest.mark.parametrize("offer", [
    pytest.param((H2C, False), id="h2c"),
    pytest.param((H2C, True), id="h2c-chunked"),
    pytest.param((["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="], False), id="websocket"),
    pytest.param((["Connection: keep-alive, Upgrade", "Upgrade: TLS/1.2"], False), id="tls"),
])
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "body-later"])
def test_an_upgrade_offer_is_declined_and_the_request_served_with_its_body(server, offer, split):
    """curl --http2 (cleartext), Java's HttpClient/RestClient: was 400 "not valid JSON ... zero-length" (the body
    dropped) and every later request on the connection silently lost; now served as HTTP/1.1 (RFC 9110 §7.8)."""
    headers, is_chunked = offer
    body = chunked(BODY) if is_chunked else BODY
    framing = ["Transfer-Encoding: chunked"] if is_chunked else []
    head, _, _ = request(body=body, headers=headers + framing, length=not is_chunked).partition(b"\r\n\r\n")
    with Connection(server) as conn:
        if split:
            conn.send(head + b"\r\n\r\n" + body[:10])
            conn.send(body[10:] + LIVE)
        else:
            conn.send(head + b"\r\n\r\n" + body + LIVE)
        assert served(conn.answer()) == [2, 4, 6, 8]
        assert conn.answer()[0] == 200  # the request after it, on the same connection
        conn.send(request())
        assert served(conn.answer()) == [2, 4, 6, 8]


def test_a_thousand_upgrade_offers_in_one_write_are_all_answered(server):
    """Declined upgrades are undone in a loop (a recursion would overflow on a chunk holding a thousand)."""
    offers = request(method="GET", path="/v2/health/live", body=b"", length=False, headers=H2C)
    with Connection(server) as conn:
        conn.send(offers * 1200 + request())
        assert [conn.answer()[0] for _ in range(1200)] == [200] * 1200
        assert served(conn.answer()) == [2, 4, 6, 8]


def test_an_upgrade_offer_over_the_body_limit_is_still_413(server):
    with Connection(server) as conn:
        conn.send(request(body=b" " * LIMIT + BODY, headers=H2C) + LIVE)
        status, _, body = conn.answer()
        assert status == 413 and str(LIMIT).encode() in body
        assert conn.answer()[0] == 200


# ---------------------------------------------------------------------------------------------- heads

def test_four_thousand_pipelined_requests_in_one_write_are_all_answered(server):
    """Was 431 "headers exceed 65536 bytes" as the FIRST answer, then a reset: every received chunk was counted
    as header bytes when it ended inside a request's head, though it held thousands of complete requests."""
    live = request(method="GET", path="/v2/health/live", body=b"", length=False)
    with Connection(server) as conn:
        conn.send(live * 4000 + request())
        assert [conn.answer()[0] for _ in range(4000)] == [200] * 4000
        assert served(conn.answer()) == [2, 4, 6, 8]


def test_a_refused_head_is_answered_after_the_requests_before_it(server):
    """A request still running, then a head over http_max_header_bytes on the same connection: its answer comes
    first, then the 431 and the close (the 431 was written first, and the running request's answer lost)."""
    slow = request(path="/v2/models/slow/infer",
                   body=orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}))
    with Connection(server) as conn:
        conn.send(slow + b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")
        status, _, body = conn.answer()
        assert status == 200 and orjson.loads(body)["model_name"] == "slow"
        status, headers, body = conn.answer()
        assert (status, headers.get("connection")) == (431, "close") and b"65536" in body
        assert conn.closed()


@pytest.mark.parametrize("size", [70_000, 200_000])
def test_a_head_over_the_bound_is_refused_however_it_is_read(server, size):
    """Was 200 when the whole head arrived in one read (loopback reads are up to 256 KiB), or behind another
    request in the same read: only bytes of reads that ended inside a head were counted. Sent alone and behind
    a complete request; the 431 is read before the close (a plain close with the head unread could reset it)."""
    big = b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    for before in (b"", LIVE):
        with Connection(server) as conn:
            conn.send(before + big)
            if before:
                assert conn.answer()[0] == 200
            status, headers, body = conn.answer()
            assert (status, headers.get("connection")) == (431, "close") and b"65536" in body
            assert conn.closed()


# ---------------------------------------------------------------------------------------------- framing

@pytest.mark.parametrize("codings", [["gzip, chunked"], ["gzip", "chunked"], ["deflate,chunked"]])
def test_transfer_codings_other_than_chunked_are_501_saying_what_is_supported(server, codings):
    """Was 200: httptools decodes only the final `chunked` and ignored `gzip` (a proxy in front that applies it
    would read another body than we do). 400 until round 8, now RFC 9112 §6.1's 501."""
    with Connection(server) as conn:
        conn.send(request(body=chunked(BODY), length=False, headers=[f"Transfer-Encoding: {c}" for c in codings]))
        status, _, body = conn.answer()
        assert status == 501
        assert "only 'chunked'" in orjson.loads(body)["error"] and "Content-Encoding" in orjson.loads(body)["error"]
        conn.send(request())  # the framing was chunked: the connection is still in step
        assert served(conn.answer()) == [2, 4, 6, 8]


def test_chunked_in_any_case_is_still_served(server):
    with Connection(server) as conn:
        conn.send(request(body=chunked(BODY), length=False, headers=["Transfer-Encoding: ChUnKeD"]))
        assert served(conn.answer()) == [2, 4, 6, 8]


@pytest.mark.parametrize(("path", "status"), [(INFER, 413), ("/v2/repository/models/scale/load", 413),
                                            ("/v1/models/scale/predict", 400), ("/v2/models/nope/infer", 413)])
def test_an_answer_before_the_body_arrived_ends_the_connection(server, path, status):
    """A 2 GB Content-Length with one byte sent: the 413 (or a 400 found before reading the body) kept the
    connection, and the server read and dropped whatever the client went on sending, up to 2 GB; now the answer,
    then the end of the stream (a lingering close: the answer is not lost to a reset)."""
    with Connection(server) as conn:
        conn.send(request(path=path, body=b"{", length=False, headers=["Content-Length: 2147483648"]))
        got, _, body = conn.answer()
        assert got == status, body
        if status == 413:
            assert str(LIMIT).encode() in body
        conn.send(b"x" * 100_000)  # more of the body: dropped, never parsed as a request
        assert conn.closed()


def test_a_whole_body_over_the_limit_keeps_the_connection(server):
    """Where the whole body already arrived, nothing is left unread: the 413 keeps the connection."""
    with Connection(server) as conn:
        conn.send(request(body=b" " * LIMIT + BODY) + request())
        status, headers, _ = conn.answer()
        assert status == 413 and "connection" not in headers
        assert served(conn.answer()) == [2, 4, 6, 8]


SMUGGLING = {
    "CL and TE": request(body=chunked(BODY), headers=["Transfer-Encoding: chunked"]),
    "two differing CL": request(headers=[f"Content-Length: {len(BODY) + 1}"]),
    "CL with sign": request(length=False, headers=[f"Content-Length: +{len(BODY)}"]),
    "CL in hex": request(length=False, headers=[f"Content-Length: 0x{len(BODY):x}"]),
    "CL list": request(length=False, headers=[f"Content-Length: {len(BODY)}, {len(BODY)}"]),
    "obs-fold": request(length=False, headers=["Content-Length:", f" {len(BODY)}"]),
    "TE chunked, gzip": request(body=chunked(BODY), length=False, headers=["Transfer-Encoding: chunked, gzip"]),
    "bare LF": request().replace(b"\r\n", b"\n"),
}


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_ambiguous_framing_is_400_and_closed_on_both_paths(server, case):
    with Connection(server) as conn:
        conn.send(SMUGGLING[case] + LIVE)
        status, headers, _ = conn.answer()
        assert (status, headers.get("connection")) == (400, "close")
        assert conn.closed()  # the LIVE after it is never read as a request


FRAMING_HEADERS = ["Content-Length: {n}", "Content-Length: {n}", "Content-Length:  {n} ", "Content-Length: +{n}",
                   "Transfer-Encoding: chunked", "Transfer-Encoding: CHUNKED", "Transfer-Encoding: gzip, chunked",
                   "Transfer-Encoding: identity", "Connection: close", "Connection: Upgrade", "Upgrade: h2c",
                   "Expect: 100-continue", "Content-Encoding: identity"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picked=st.lists(st.sampled_from(FRAMING_HEADERS), max_size=4), as_chunks=st.booleans())
def test_both_paths_answer_any_framing_alike(both, picked, as_chunks):
    """Random mixes of framing headers: the protocol path answers (status, body, kept or closed) as the ASGI route."""
    body = chunked(BODY) if as_chunks else BODY
    raw = request(body=body, length=False, headers=[h.format(n=len(body)) for h in picked])
    outcomes = []
    for url in both:
        with Connection(url) as conn:
            conn.send(raw + LIVE)
            try:
                answers = [conn.answer()]
                while answers[-1][0] < 200:
                    answers.append(conn.answer())
                after = "closed" if answers[-1][1].get("connection") == "close" else conn.answer()[0]
            except EOFError:
                answers, after = [], "closed"
            outcomes.append(([(s, re.sub(rb"\d{4,}", b"N", b)) for s, _, b in answers], after))
    assert outcomes[0] == outcomes[1]
    for status, _ in outcomes[0][0]:
        assert status < 500 or status == 501  # 501: a transfer coding not implemented (RFC 9112 §6.1; round 8)


# ---------------------------------------------------------------------------------------------- access

async def test_metrics_and_v1_liveness_on_the_http_port_are_covered_by_restrictions(repo: Path):
    """/metrics on the HTTP port carries every model's request counts and latencies (the statistics API) and was
    reachable with statistics restricted; GET / answered liveness with health restricted."""
    restricted = ["statistics:stats-key=s3cret", "health:health-key=h"]
    async with inprocess_server(repo, http_restricted_api=restricted) as (_, client):
        refused = await client.get("/metrics")
        assert refused.status_code == 403 and "stats-key" in refused.json()["error"]
        assert "nv_inference" not in refused.text
        allowed = await client.get("/metrics", headers={"stats-key": "s3cret"})
        assert allowed.status_code == 200 and "nv_inference_request_success" in allowed.text
        assert (await client.get("/metrics/")).status_code == 403
        assert (await client.get("/")).status_code == 403
        assert (await client.get("/", headers={"health-key": "h"})).json() == {"status": "alive"}


# ---------------------------------------------------------------------------------------------- resource bombs

MANY = 2**20 + 1  # one more than codec.MAX_STRINGS


@pytest.fixture(scope="module")
def strings_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    root = tmp_path_factory.mktemp("security5_strings") / "models"
    string_model(root / "strings" / "1" / "model.onnx")
    write_config(root / "strings", "max_batch_size: 0\n")
    grpc_port = free_port()
    with run_server(root, extra_args=["--grpc-port", str(grpc_port)]) as url:
        yield url, grpc_port


def _strings_http(url: str, *, binary: bool) -> httpx.Response:
    if binary:
        data = b"\x01\x00\x00\x00a" * MANY
        head = orjson.dumps({"inputs": [{"name": "x", "shape": [MANY, 1], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(data)}}]})
        return httpx.post(f"http://{url}/v2/models/strings/infer", content=head + data, timeout=120,
                          headers={"Inference-Header-Content-Length": str(len(head))})
    doc = {"inputs": [{"name": "x", "shape": [MANY, 1], "datatype": "BYTES", "data": ["a"] * MANY}]}
    return httpx.post(f"http://{url}/v2/models/strings/infer", content=orjson.dumps(doc), timeout=120)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_million_strings_are_413_before_any_is_decoded_over_http(strings_server, binary):
    """10^7 one-byte strings (50 MB binary) held the event loop 60 s, every client waiting, to be decoded one by
    one; the tensor is now refused from its shape."""
    response = _strings_http(strings_server[0], binary=binary)
    assert response.status_code == 413, response.text
    assert f"{MANY} BYTES elements exceed the limit of {MANY - 1}" in response.json()["error"]
    ok = httpx.post(f"http://{strings_server[0]}/v2/models/strings/infer", timeout=30, content=orjson.dumps(
        {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "bc"]}]}))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == ["a", "bc"]


@pytest.mark.parametrize("raw", [True, False], ids=["raw-contents", "typed-contents"])
def test_a_million_strings_are_413_before_any_is_decoded_over_grpc(strings_server, raw):
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="BYTES", shape=[MANY, 1])
    request = pb.ModelInferRequest(model_name="strings", inputs=[tensor])
    if raw:
        request.raw_input_contents.append(b"\x01\x00\x00\x00a" * MANY)
    else:
        request.inputs[0].contents.bytes_contents.extend([b"a"] * MANY)
    with grpc.insecure_channel(f"127.0.0.1:{strings_server[1]}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{MANY} BYTES elements exceed the limit" in info.value.details()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{strings_server[1]}")
    inp = grpcclient.InferInput("x", [2, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"a"], [b"bc"]], dtype=object))
    assert client.infer("strings", [inp]).as_numpy("y").ravel().tolist() == [b"a", b"bc"]


def test_more_strings_than_the_shape_needs_stop_at_the_first_extra(strings_server):
    doc = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "BYTES", "data": ["a"] * 500_000}]}
    response = httpx.post(f"http://{strings_server[0]}/v2/models/strings/infer", content=orjson.dumps(doc), timeout=60)
    assert response.status_code == 400 and "expected 1 strings for inference input 'x', got more" in response.text


# ---------------------------------------------------------------------------------------------- repository API

@pytest.fixture(scope="module")
def explicit_server(repo: Path) -> Iterator[tuple[str, int]]:
    grpc_port = free_port()
    args = ["--model-control-mode", "explicit", "--load-model", "scale", "--grpc-port", str(grpc_port)]
    with run_server(repo, extra_args=args) as url:
        yield url, grpc_port


CONFIG = orjson.dumps({"backend": "onnxruntime", "max_batch_size": 8}).decode()


@pytest.mark.parametrize(("files", "words"), [
    ({"file:1/model.onnx": b"x", "file:1/model.onnx/x": b"y"}, "also the folder of another file override"),
    ({"file:1/a/b": b"x", "file:1/a": b"y"}, "also the folder of another file override"),
    ({"file:1/mo\x00del.onnx": b"x"}, "Invalid file path"),
    ({"file:1/model\n.onnx": b"x"}, "Invalid file path"),
])
def test_file_overrides_that_cannot_be_written_are_400_on_http_and_grpc(explicit_server, repo, files, words):
    """Were 500 with the server's temporary folder in the message (FileExistsError / ValueError: embedded null
    byte), and the HTTP connection closed; the model already loaded keeps serving."""
    url, grpc_port = explicit_server
    http = tritonclient_http(url)
    with pytest.raises(InferenceServerException) as info:
        http.load_model("scale", config=CONFIG, files=files)
    assert info.value.status() == "400" and words in info.value.message()
    assert "modelserve-override" not in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").load_model("scale", config=CONFIG, files=files)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and words in info.value.message()
    assert http.is_model_ready("scale")


async def test_an_unexpected_error_names_its_type_never_its_text(repo: Path, monkeypatch: pytest.MonkeyPatch):
    """The FastAPI routes' last-resort handler sent `internal error: FileExistsError: [Errno 17] File exists:
    '/tmp/modelserve-override-.../scale/1/model.onnx'`: paths and internals; now the type and "see the log"."""
    async with inprocess_server(repo) as (server, _):
        def broken(*_: object, **__: object) -> None:
            raise OSError("/secret/path/of/the/server")

        monkeypatch.setattr(server.core, "server_metadata", broken)
        # As uvicorn does: the answer the app sent stands though Starlette re-raises the error after it.
        transport = httpx.ASGITransport(app=server.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            response = await client.get("/v2")
        assert response.status_code == 500
        assert response.json() == {"error": "internal error (OSError); see the server log"}


# ---------------------------------------------------------------------------------------------- pipelining

def test_a_client_that_pipelines_far_ahead_is_held_to_a_bounded_queue(repo: Path):
    """10,000 requests sent in one go: uvicorn resumed reading at every request started, so all of them were
    parsed and queued as request objects (without reading answers: server RSS +500 MB in 30 s over 4 connections,
    growing); now at most `max_pipelined` (128) plus one received chunk wait, the rest stays in TCP's buffers."""
    total = 10_000
    with loopback(repo) as lb, lb.connect() as sock:
        sender = threading.Thread(target=sock.sendall, args=(request() * total,), daemon=True)
        sender.start()
        conn = wait_until(lambda: lb.connections(), what="the connection")[0]
        reader, longest = Reader(sock), 0
        for i in range(total):
            if i % 500 == 0:
                longest = max(longest, len(conn.pipeline))
            assert status_of(reader.answer()) == 200
        sender.join(timeout=60)
    assert longest <= 128 + (256 * 1024) // len(request()) + 1, longest  # one read (uvloop: 256 KiB) more at most


def test_front_ends_decline_upgrades_and_refuse_other_transfer_codings_too(repo: Path):
    """`--http-workers 2`: the front-end processes run the same protocol; their proxy drops Transfer-Encoding, so
    `gzip, chunked` was forwarded as a plain body (200) there as well."""
    with run_server(repo, extra_args=["--http-workers", "2"]) as url, Connection(url) as conn:
        conn.send(request(headers=H2C) + request(body=chunked(BODY), length=False,
                                                 headers=["Transfer-Encoding: gzip, chunked"]) + request())
        assert served(conn.answer()) == [2, 4, 6, 8]
        status, _, body = conn.answer()
        assert status == 501 and b"only 'chunked'" in body
        assert served(conn.answer()) == [2, 4, 6, 8]

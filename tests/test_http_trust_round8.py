"""HTTP trust edges, round 8 (docs/RELIABILITY.md): what a hostile or unusual client sends the HTTP port (Host,
other HTTP versions, framing and smuggling probes), the metrics port's Host checks, status-line phrases and
OpenAI's error shape, each sent as raw bytes to a real `modelserve serve` (one process, and `--http-workers 2`
front ends, which parse HTTP themselves) started once per worker count."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import openai
import orjson
import pytest

from tests.conftest import free_port, run_server
from tests.onnx_builders import scale_model, write_config
from tests.test_security_round5 import BODY, LIVE, Connection, chunked, request, served

CHUNKED = ["Transfer-Encoding: chunked"]


def head(line: str, *headers: str) -> bytes:
    return ("\r\n".join([line, *headers]) + "\r\n\r\n").encode()


def post(body: bytes, *headers: str, length: bool = False) -> bytes:
    return request(body=body, length=length, headers=list(headers))


GET_LIVE = "GET /v2/health/live HTTP/1.1"
# (id, bytes sent, status, words the message must hold)
REFUSED = [
    ("no-host", head(GET_LIVE), 400, "must carry a Host header"),
    ("two-hosts", head(GET_LIVE, "Host: localhost", "Host: localhost"), 400, "2 Host headers; send exactly one"),
    ("host-bad-port", head(GET_LIVE, "Host: localhost:abc"), 400, "not a valid host name or address"),
    ("host-port-too-big", head(GET_LIVE, "Host: localhost:99999"), 400, "optional port (0-65535)"),
    ("host-not-a-name", head(GET_LIVE, "Host: local host"), 400, "not a valid host name"),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00", 505,
     "prior-knowledge preface"),
    ("http2-line", head("GET /v2/health/live HTTP/2.0", "Host: localhost"), 505, "HTTP/2.0 is not supported"),
    ("http3-line", head("GET /v2/health/live HTTP/3", "Host: localhost"), 505, "HTTP/3.0 is not supported"),
    ("unknown-major", head("GET /v2/health/live HTTP/7.1", "Host: localhost"), 505, "HTTP/7.1 is not supported"),
    ("cl-and-te", post(chunked(BODY), "Content-Length: 5", *CHUNKED), 400, "both Content-Length and Transfer-"),
    ("cl-twice-differ", post(BODY, "Content-Length: 3", length=True), 400, "more than one Content-Length"),
    ("cl-plus", post(BODY, f"Content-Length: +{len(BODY)}"), 400, "plain decimal number"),
    ("cl-inner-space", post(BODY, f"Content-Length: {len(BODY)} {len(BODY)}"), 400, "plain decimal number"),
    ("cl-hex", post(BODY, f"Content-Length: 0x{len(BODY):x}"), 400, "plain decimal number"),
    ("cl-list", post(BODY, f"Content-Length: {len(BODY)},{len(BODY)}"), 400, "plain decimal number"),
    ("te-not-chunked-last", post(BODY, "Transfer-Encoding: chunked, gzip"), 400, "must end with 'chunked'"),
    ("te-unknown-coding", post(chunked(BODY), "Transfer-Encoding: x-custom, chunked"), 501, "only 'chunked' is"),
    ("obs-fold", head(GET_LIVE, "Host: localhost", "X-A: a", " folded"), 400, "obsolete line folding"),
    ("space-before-colon", head(GET_LIVE, "Host : localhost"), 400, "a space before the colon"),
    ("ctl-in-value", head(GET_LIVE, "Host: localhost", "X-A: a\x01b"), 400, "control character"),
    ("nul-in-value", head(GET_LIVE, "Host: localhost", "X-A: a\x00b"), 400, "control character"),
    ("ctl-in-target", head("GET /v2/health/live\x01 HTTP/1.1", "Host: localhost"), 400, "percent-encode"),
    ("bad-chunk-size", post(b"zz\r\nhello\r\n0\r\n\r\n", *CHUNKED), 400, "chunk size is not a hexadecimal"),
    ("chunk-without-crlf", post(b"5\r\nhelloXX0\r\n\r\n", *CHUNKED), 400, "not followed by CRLF"),
    ("long-chunk-extension", post(b"5;" + b"e" * (1 << 20), *CHUNKED), 400, "chunk extensions or trailer"),
    ("long-trailer", post(b"0\r\nX-T: " + b"t" * (1 << 20), *CHUNKED), 400, "chunk extensions or trailer"),
    ("absolute-form-elsewhere", head("GET http://evil.example/v2/health/live HTTP/1.1", "Host: localhost"), 421,
     "'evil.example' is not served here"),
    ("absolute-form-other-scheme", head("GET ftp://localhost/v2/health/live HTTP/1.1", "Host: localhost"), 400,
     "neither '/path' nor 'http://host/path'"),
    ("connect", head("CONNECT example.com:443 HTTP/1.1", "Host: example.com:443"), 501, "not a proxy"),
]
# Refused before any route runs, so the connection is closed (framing may be unsound after them); the 421 and
# the 501 for a coding before `chunked` are the routes' answers to requests whose framing was sound.
CLOSES = {name for name, _, _, _ in REFUSED} - {"absolute-form-elsewhere", "te-unknown-coding"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trust8") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    return root


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "http-workers-2"])
def server(request: pytest.FixtureRequest, repo: Path) -> Iterator[tuple[str, int, int]]:
    """("127.0.0.1:PORT", metrics port, gRPC port) of a loopback server with the default Host rule."""
    metrics, grpc = free_port(), free_port()
    args = ["--metrics-port", str(metrics), "--grpc-port", str(grpc), "--http-workers", str(request.param)]
    with run_server(repo, extra_args=args, env={"MODELSERVE_MAX_REQUEST_BYTES": "4096"}) as url:
        yield url, metrics, grpc


def status_line(conn: Connection) -> bytes:
    """The first line of the next answer, read without consuming the answer."""
    while b"\r\n" not in conn.buffer:
        conn._more()
    return conn.buffer.split(b"\r\n", 1)[0]


def phrase(status: int) -> bytes:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()


@pytest.mark.parametrize("name,data,status,words", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_probe_is_refused_saying_what_was_expected_and_others_are_served(server, name, data, status, words):
    url, _, grpc = server
    with Connection(url) as other, Connection(url) as conn:
        whole = request()
        other.send(whole[:-10])  # another client's request, in flight while the probe is refused
        conn.send(data)
        assert status_line(conn) == phrase(status)
        _, headers, body = conn.answer()
        assert headers["content-type"] == "application/json", body
        message = orjson.loads(body)["error"]
        assert words in message, message
        if status == 505:
            assert "HTTP/1.1 and HTTP/1.0" in message and f"gRPC port, {grpc} here (--grpc-port)" in message
        if name in CLOSES:
            assert headers["connection"] == "close" and conn.closed()
        other.send(whole[-10:])
        assert served(other.answer()) == [2, 4, 6, 8]
    with Connection(url) as fresh:
        fresh.send(request())
        assert served(fresh.answer()) == [2, 4, 6, 8]


@pytest.mark.parametrize("data", [head("GET /v2/health/live HTTP/1.0"),
                                  head("GET http://localhost/v2/health/live HTTP/1.1", "Host: evil.example"),
                                  head("GET HTTP://[::1]:8000/v2/health/live HTTP/1.1", "Host: evil.example"),
                                  head("GET /v2/health/live HTTP/1.1", "Host: localhost:8000"),
                                  head("GET /v2/health/live HTTP/1.1", "Host: [::1]:8000"),
                                  head("OPTIONS * HTTP/1.1", "Host: localhost")],
                         ids=["http10-without-host", "absolute-form-here", "absolute-form-ipv6-upper-scheme",
                              "host-with-port", "ipv6-host", "options-star"])
def test_what_a_client_may_send_is_still_served(server, data):
    """HTTP/1.0 without Host; absolute-form naming this server (its authority replaces Host, RFC 9112 §3.2.2);
    `OPTIONS *` reaches the routes (404 there: no route serves it, and the connection stays in step)."""
    with Connection(server[0]) as conn:
        conn.send(data)
        status, _, body = conn.answer()
        assert status == (404 if data.startswith(b"OPTIONS") else 200), body


@pytest.mark.parametrize("bad", [head(GET_LIVE, "Host: localhost", "X-A: a", " folded"),
                                 post(b"zz\r\n", *CHUNKED), post(b"5;" + b"e" * (1 << 20), *CHUNKED)],
                         ids=["in-the-head", "in-a-body", "chunk-extension"])
def test_a_refusal_comes_after_the_answers_owed_to_requests_before_it(server, bad):
    """uvicorn wrote its 400 at once and closed: the pipelined request before it was never answered."""
    with Connection(server[0]) as conn:
        conn.send(request() + request() + bad + LIVE)
        assert served(conn.answer()) == [2, 4, 6, 8]
        assert served(conn.answer()) == [2, 4, 6, 8]
        status, headers, _ = conn.answer()
        assert (status, headers["connection"]) == (400, "close")
        assert conn.closed()  # the LIVE after it is never read


def test_trailer_fields_are_not_read_as_headers(server):
    """uvicorn appended trailer fields to the request's headers, which routes (and a front end's proxy) read
    after the body: a trailer `Content-Type: text/plain` made a JSON body a form (415)."""
    with Connection(server[0]) as conn:
        conn.send(post(chunked(b"{}")[:-2] + b"Content-Type: text/plain\r\n\r\n", *CHUNKED).replace(
            b"/v2/models/scale/infer", b"/v2/repository/index"))
        status, _, body = conn.answer()
        assert status == 200 and orjson.loads(body)[0]["name"] == "scale", body


def test_every_status_line_carries_its_reason_phrase(server):
    """One table (http.HTTPStatus) for the 404, 405 (with Allow, and a message naming the methods), 413 and 431
    answers besides the refusals above."""
    url, _, _ = server
    probes = [(head("GET /no/such/route HTTP/1.1", "Host: localhost"), 404, "no route for GET /no/such/route"),
              (head("TRACE /v2/health/live HTTP/1.1", "Host: localhost"), 405, "TRACE is not allowed"),
              (post(b"{}", "Content-Length: 999999"), 413, "4096"),
              (head(GET_LIVE, "Host: localhost", "X-Big: " + "a" * 70_000), 431, "65536")]
    for data, status, words in probes:
        with Connection(url) as conn:
            conn.send(data)
            assert status_line(conn) == phrase(status)
            _, headers, body = conn.answer()
            assert words in orjson.loads(body)["error"], body
            if status == 405:
                assert headers["allow"] == "get", headers  # (Connection lowercases header lines)


def _metrics(port: int, data: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    first, _, rest = answer.partition(b"\r\n")
    return first, rest.partition(b"\r\n\r\n")[2]


def test_the_metrics_port_applies_the_main_ports_host_checks(server):
    """DNS rebinding: a loopback metrics port answered any Host (every model's counts, to a rebound page)."""
    url, port, _ = server
    for host, status in [("evil.example", 421), (None, 400), ("localhost:abc", 400)]:
        data = head("GET /metrics HTTP/1.1", *([f"Host: {host}"] if host else []))
        first, body = _metrics(port, data)
        assert first == phrase(status).replace(b"HTTP/1.1", b"HTTP/1.0"), first
        with Connection(url) as conn:  # the same message as the main port's
            conn.send(data.replace(b"/metrics", b"/v2/health/live"))
            assert orjson.loads(body) == orjson.loads(conn.answer()[2])
    for data in [head("GET /metrics HTTP/1.1", "Host: localhost"), head("GET /metrics HTTP/1.0")]:
        first, body = _metrics(port, data)
        assert first == b"HTTP/1.0 200 OK" and b"nv_inference_request_success" in body
    first, body = _metrics(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert first == b"HTTP/1.0 505 HTTP Version Not Supported" and b"serves GET /metrics over HTTP/1.1" in body


def test_the_openai_client_reads_the_servers_message_on_every_v1_error(server):
    """`GET /v1/models/{name}` and routes this server lacks answered KServe's {"error": "..."}: the client raised
    with `body` a string, no `code`; now OpenAI's shape, as /v1/embeddings already had."""
    client = openai.OpenAI(base_url=f"http://{server[0]}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.code == "model_not_found" and "'nope' is not found" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError) as no_route:
        client.chat.completions.create(model="scale", messages=[{"role": "user", "content": "hi"}])
    assert no_route.value.body["message"] == "no route for POST /v1/chat/completions"
    assert no_route.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="scale", input=[[1, 2]])
    assert "token-id arrays are not supported" in bad.value.body["message"] and bad.value.param == "input"
    assert [m.id for m in client.models.list().data] == ["scale"]

"""HTTP trust edges, round 6 (docs/RELIABILITY.md): other HTTP versions, Host names (DNS rebinding), booleans
among JSON numbers and data counts, each checked from outside against real `modelserve serve` subprocesses (the
protocol infer path on and off) with raw sockets, httpx, curl, tritonclient and the openai client."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import orjson
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from onnx import TensorProto
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from service import codec
from service.errors import InvalidInput
from service.settings import ServerSettings
from tests.conftest import REPO_ROOT, run_server
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, write_config
from tests.test_helm_chart import container, env_of, helm, render  # noqa: F401 (helm: the fixture)
from tests.test_security_round5 import BODY, INFER, Connection, request, served

ROUTES = [("GET", "/v2/health/live", b""), ("POST", INFER, BODY), ("GET", "/v2/models/scale", b""),
          ("POST", "/v2/repository/index", b"{}"), ("GET", "/metrics", b""), ("GET", "/no/such/route", b""),
          ("POST", "/v1/embeddings", b'{"model": "scale", "input": "a"}')]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("security6") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    scale_model(root / "iscale" / "1" / "model.onnx", dtype=TensorProto.INT32)
    write_config(root / "iscale", "max_batch_size: 8\n")
    return root


@pytest.fixture(scope="module", params=[True, False], ids=["protocol-path", "asgi-path"])
def server(request: pytest.FixtureRequest, repo: Path) -> Iterator[str]:
    """Bound to 127.0.0.1 (tests.conftest.run_server) with no Host setting: the loopback default."""
    with run_server(repo, env={"MODELSERVE_HTTP_PROTOCOL_INFER": str(request.param).lower()}) as url:
        yield url


def raw(method: str, path: str, body: bytes, *, host: str | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *([f"Host: {host}"] if host is not None else []),
             f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answer(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with Connection(url) as conn:
        conn.send(data)
        return conn.answer()


# ---------------------------------------------------------------------------------------------- versions

@pytest.mark.parametrize("line", ["GET /v2/health/live HTTP/2.0", "GET /v2/health/live HTTP/3.0",
                                  "GET /v2/health/live HTTP/1.2", "GET /v2/health/live HTTP/0.9",
                                  "GET /v2/health/live", f"POST {INFER} HTTP/2.0"])
def test_a_request_line_of_another_version_is_505_then_closed(server, line):
    """HTTP/2.0, HTTP/0.9 and a line without a version were served as HTTP/1.x (200); 1.2 and 3.0 got a plain-text
    400 "Invalid HTTP request received."; now 505 (RFC 9110 §15.6.6) saying what the port speaks, then the close."""
    with Connection(server) as conn:
        conn.send(f"{line}\r\nHost: localhost\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        status, headers, body = conn.answer()
        assert status == 505 and headers["content-type"] == "application/json", body
        message = orjson.loads(body)["error"]
        assert "is not supported" in message and "HTTP/1.1 and HTTP/1.0" in message and "gRPC port" in message
        assert headers["connection"] == "close" and conn.closed()
    assert served(answer(server, request()[:-len(BODY)].replace(b"HTTP/1.1", b"HTTP/1.0") + BODY)) == [2, 4, 6, 8]


def test_a_refused_version_is_answered_after_the_requests_before_it(server):
    with Connection(server) as conn:
        conn.send(request() + b"GET /v2/health/live HTTP/2.0\r\nHost: localhost\r\n\r\n" + request())
        assert served(conn.answer()) == [2, 4, 6, 8]
        assert conn.answer()[0] == 505
        assert conn.closed()  # the request after it is never read


# ---------------------------------------------------------------------------------------------- Host names

@pytest.mark.parametrize("method, path, body", ROUTES, ids=[p for _, p, _ in ROUTES])
def test_a_rebound_host_is_421_on_every_route_and_loopback_names_are_served(server, method, path, body):
    """DNS rebinding: a page whose name was re-pointed at 127.0.0.1 reached every route (Host was not looked at).
    A loopback-bound server now answers only loopback names (and requests without Host, which no browser sends)."""
    # "a b" (not a host name) was 421 too; since round 8 it is RFC 9112 §3.2's 400 (tests/test_http_trust_round8.py)
    for host in ["evil.example", "evil.example:80", "127.0.0.1.nip.io", "localhost.evil.example", "t"]:
        status, headers, text = answer(server, raw(method, path, body, host=host))
        assert status == 421 and headers["content-type"] == "application/json", (host, text)
        doc = orjson.loads(text)
        message = doc["error"]["message"] if path.startswith("/v1/") else doc["error"]  # OpenAI's shape there
        assert "is not served here" in message and "http_allowed_hosts" in message and "--http-allowed-hosts" in message
    port = server.split(":")[1]
    for host in ["localhost", f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.2", f"[::1]:{port}",
                 "app.localhost", "LocalHost.", None]:
        status, _, text = answer(server, raw(method, path, body, host=host))
        assert status != 421, (host, text)


def test_two_host_headers_are_400(server):
    status, _, body = answer(server, request(headers=["Host: evil.example"]))
    assert status == 400 and b"2 Host headers" in body


def test_tritonclient_is_served_and_a_foreign_host_refused(server):
    x = np.array([[1, 2, 3, 4]], np.float32)
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    for url in (server, f"localhost:{server.split(':')[1]}"):
        with httpclient.InferenceServerClient(url) as client:
            assert np.array_equal(client.infer("scale", [inp]).as_numpy("y"), x * 2)
    with httpclient.InferenceServerClient(server) as client, pytest.raises(InferenceServerException) as refused:
        client.infer("scale", [inp], headers={"Host": "evil.example"})
    assert "is not served here" in str(refused.value)


def test_tritonclient_aio_httpx_curl_and_openai_are_served(server):
    import asyncio

    async def aio() -> np.ndarray:
        async with aioclient.InferenceServerClient(server) as client:
            inp = aioclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), np.float32))
            return (await client.infer("scale", [inp])).as_numpy("y")

    assert asyncio.run(aio()).tolist() == [[2, 2, 2, 2]]
    assert httpx.get(f"http://{server}/v2/health/ready").status_code == 200
    refused = httpx.get(f"http://{server}/v2/health/ready", headers={"Host": "evil.example"})
    assert refused.status_code == 421
    curl = shutil.which("curl")
    if curl is not None:
        out = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{server}/v2/health/ready"],
                             capture_output=True, text=True, timeout=30).stdout
        assert out == "200"
    client = openai.OpenAI(base_url=f"http://{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):  # served: the model is not a text model here
        client.embeddings.create(model="nope", input="a")
    rebound = openai.OpenAI(base_url=f"http://{server}/v1", api_key="unused", max_retries=0,
                            default_headers={"Host": "evil.example"})
    with pytest.raises(openai.APIStatusError) as refused_openai:
        rebound.embeddings.create(model="nope", input="a")
    assert refused_openai.value.status_code == 421 and "is not served here" in str(refused_openai.value)


@pytest.fixture(scope="module")
def named_server(repo: Path) -> Iterator[str]:
    with run_server(repo, extra_args=["--http-allowed-hosts", "models.example.com, *.svc.cluster.local"]) as url:
        yield url


def test_configured_names_are_served_and_others_refused_without_listing_them(named_server):
    """Loopback names stay answered (kubectl port-forward, probes); the configured names are never echoed."""
    for host in ["models.example.com", "models.example.com:8000", "MODELS.EXAMPLE.COM.", "modelserve.ml.svc.cluster.local",
                 "localhost", "127.0.0.1"]:
        assert served(answer(named_server, raw("POST", INFER, BODY, host=host))) == [2, 4, 6, 8], host
    for host in ["evil.example", "svc.cluster.local", "example.com", "models.example.com.evil.example"]:
        status, _, body = answer(named_server, raw("POST", INFER, BODY, host=host))
        assert status == 421 and b"example.com" not in body.replace(host.encode(), b""), (host, body)


def test_the_setting_parses_and_refuses_what_it_cannot_match(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MODELSERVE_HTTP_ALLOWED_HOSTS", " a.example , *.B.example,10.0.0.1,[::1]")
    assert ServerSettings().http_allowed_hosts == ["a.example", "*.b.example", "10.0.0.1", "::1"]
    monkeypatch.delenv("MODELSERVE_HTTP_ALLOWED_HOSTS")
    assert ServerSettings().http_allowed_hosts is None
    for bad in ["example.com:8000", "http://example.com", "a/b", "*", ""]:
        if bad == "*":
            assert ServerSettings(http_allowed_hosts=[bad]).http_allowed_hosts == ["*"]
            continue
        with pytest.raises(ValidationError, match=r"allowed host|is empty"):
            ServerSettings(http_allowed_hosts=bad)
    cli = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model-repository", ".",
                          "--http-allowed-hosts", "example.com:8000"], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=120)
    assert cli.returncode != 0 and "without a port" in cli.stderr


async def test_bound_beyond_loopback_any_host_is_served_unless_configured(repo: Path):
    """Today's behaviour for 0.0.0.0 (containers, the chart) is kept: no list, every Host answered."""
    async with inprocess_server(repo, http_host="0.0.0.0") as (_, client):
        assert (await client.get("/v2/health/live", headers={"Host": "anything.example"})).status_code == 200
    async with inprocess_server(repo, http_host="0.0.0.0", http_allowed_hosts=["models.example.com"]) as (_, client):
        assert (await client.get("/v2/health/live", headers={"Host": "models.example.com"})).status_code == 200
        refused = await client.get("/v2/health/live", headers={"Host": "anything.example"})
        assert refused.status_code == 421
    async with inprocess_server(repo) as (_, client):  # tests.inprocess binds 127.0.0.1
        assert (await client.get("/v2/health/live", headers={"Host": "anything.example"})).status_code == 421


def test_front_ends_check_the_host_themselves(repo: Path):
    """`--http-workers 2`: the front ends decode infer themselves and proxy the rest with their own Host, so the
    model process never sees the client's: the rule runs in the front end."""
    with run_server(repo, extra_args=["--http-workers", "2"]) as url:
        for method, path, body in ROUTES[:2]:
            status, _, text = answer(url, raw(method, path, body, host="evil.example"))
            assert status == 421 and b"is not served here" in text, text
            assert answer(url, raw(method, path, body, host="localhost"))[0] == 200


def test_the_chart_sets_the_names_and_its_probes_send_a_host_always_answered(helm):  # noqa: F811
    default = container(render(helm))
    assert "MODELSERVE_HTTP_ALLOWED_HOSTS" not in env_of(render(helm))
    assert "httpHeaders" not in default["readinessProbe"]["httpGet"]
    docs = render(helm, sets=("server.httpAllowedHosts={models.example.com,*.svc.cluster.local}",))
    assert env_of(docs)["MODELSERVE_HTTP_ALLOWED_HOSTS"]["value"] == "models.example.com,*.svc.cluster.local"
    ServerSettings(http_allowed_hosts=env_of(docs)["MODELSERVE_HTTP_ALLOWED_HOSTS"]["value"])  # the server takes it
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(docs)[probe]["httpGet"]["httpHeaders"] == [{"name": "Host", "value": "localhost"}]


# ---------------------------------------------------------------------------------------------- JSON data

@pytest.mark.parametrize("model, shape, data, bad", [
    ("scale", [1, 4], [1, 2, 3, True], "element 3 is true"),
    ("scale", [1, 4], [[1.5, False, 2, 3]], "element 1 is false"),
    ("iscale", [2, 4], [[1, 2, 3, 4], [5, 6, 7, True]], "element 7 is true"),
    ("iscale", [1, 4], [False, 0, 1, 2], "element 0 is false"),
])
def test_a_boolean_among_json_numbers_is_400(server, model, shape, data, bad):
    """Was 200: numpy reads [1, 2, 3, true] as [1, 2, 3, 1] (only an all-boolean list was refused)."""
    datatype = "FP32" if model == "scale" else "INT32"
    doc = {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}
    r = httpx.post(f"http://{server}/v2/models/{model}/infer", content=orjson.dumps(doc), timeout=60)
    assert r.status_code == 400, r.text
    assert bad in r.json()["error"] and "true and false are BOOL values" in r.json()["error"]
    numbers = [[1 if isinstance(v, bool) else v for v in (row if isinstance(row, list) else [row])]
               for row in (data if isinstance(data[0], list) else [data])]
    doc["inputs"][0]["data"] = numbers
    assert httpx.post(f"http://{server}/v2/models/{model}/infer", content=orjson.dumps(doc), timeout=60).status_code == 200


def test_a_flat_list_of_the_wrong_count_is_refused_before_numpy_reads_it(monkeypatch: pytest.MonkeyPatch):
    """The count of a flat list (tritonclient's form) is its length: 2,000,000 numbers for shape [1, 4] were
    first read into an array (a second on the event loop for a 30 MB body) to be counted."""

    def not_read(*_: object, **__: object) -> None:
        raise AssertionError("numpy read the values")

    monkeypatch.setattr(codec.np, "asarray", not_read)
    with pytest.raises(InvalidInput, match=r"shape \[1, 4\] needs 4 elements, 'data' has 2000000"):
        codec.from_values([0.5] * 2_000_000, name="x", datatype="FP32", shape=[1, 4])


def test_absurd_shapes_and_counts_are_refused_saying_what_was_expected(server):
    """A flat list whose count is wrong was read by numpy first, so a nested element among them got "not a list of
    FP32 values with a regular shape" instead of the count; shapes were (and are) refused before the data."""
    data: list = list(range(1000))
    for shape, status, words, values in [
            ([10**12], 400, "exceeds 2147483647", data), ([10**5, 10**5], 413, "needs 40000000000 bytes", data),
            ([1, 4], 400, "needs 4 elements, 'data' has 1000", data),
            ([1, 4], 400, "needs 4 elements, 'data' has 3", [1, [2, 3], 4])]:
        doc = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": values}]}
        r = httpx.post(f"http://{server}{INFER}", content=orjson.dumps(doc), timeout=60)
        assert r.status_code == status and words in r.json()["error"], r.text

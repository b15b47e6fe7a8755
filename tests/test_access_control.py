"""Access control through a real server process and the real tritonclient (http, grpc, http.aio): restricted
APIs (Triton's --http-restricted-api / --grpc-restricted-protocol), bearer API keys for inference, the JSON-only
rule of the control routes, start-up rejection of a bad spec, and the exposed-repository warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from service.access import classify_grpc, classify_http
from tests.conftest import REPO_ROOT, free_port, run_server
from tests.onnx_builders import scale_model

ADMIN = {"admin-key": "admin-secret"}
META = {"meta-key": "meta-secret"}
GRPC_ADMIN = {"triton-grpc-protocol-admin-key": "admin-secret"}
GRPC_HEALTH = {"triton-grpc-protocol-health-key": "health-secret"}
API_KEYS = "key-one,key-two"


def _repo(root: Path) -> Path:
    scale_model(root / "scale" / "1" / "model.onnx")
    scale_model(root / "spare" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """HTTP: model-repository + statistics need admin-key, metadata + model-config need meta-key (health stays
    open: the fixture polls it). gRPC: model-repository + statistics need admin-key, health needs health-key.
    Inference needs one of two API keys on both."""
    repo = _repo(tmp_path_factory.mktemp("access") / "models")
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port), "--model-control-mode", "explicit", "--load-model", "*",
            "--http-restricted-api", "model-repository,statistics:Admin-Key=admin-secret",
            "--http-restricted-api", "metadata,model-config:meta-key=meta-secret",
            "--grpc-restricted-protocol", "model-repository,statistics:admin-key=admin-secret",
            "--grpc-restricted-protocol", "health:health-key=health-secret"]
    with run_server(repo, extra_args=args, env={"MODELSERVE_API_KEYS": API_KEYS}) as url:
        yield url, f"127.0.0.1:{grpc_port}"


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(server[0])
    yield client
    client.close()


@pytest.fixture
def grpc_client(server):
    client = grpcclient.InferenceServerClient(server[1])
    yield client
    client.close()


def _http_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_http_restricted_apis_need_their_header(http, server):
    denied = _http_error(lambda: http.get_model_repository_index())
    assert denied.status() == "403"
    assert "model-repository" in denied.message() and "admin-key" in denied.message()
    assert "admin-secret" not in denied.message()
    assert _http_error(lambda: http.get_inference_statistics("scale")).status() == "403"
    assert _http_error(lambda: http.get_model_metadata("scale", headers=ADMIN)).status() == "403"  # other key
    assert _http_error(lambda: http.get_model_config("scale", headers={"admin-key": "wrong"})).status() == "403"

    assert {m["name"] for m in http.get_model_repository_index(headers=ADMIN)} == {"scale", "spare"}
    assert http.get_inference_statistics("scale", headers=ADMIN)["model_stats"][0]["name"] == "scale"
    assert http.get_model_metadata("scale", headers=META)["inputs"][0]["name"] == "x"
    assert http.get_model_config("scale", headers=META)["name"] == "scale"
    # Unrestricted here: health, and /docs is in no API group; /metrics on the HTTP port is statistics (round 5).
    assert http.is_server_live() and http.is_model_ready("scale")
    assert httpx.get(f"http://{server[0]}/docs").status_code == 200
    assert httpx.get(f"http://{server[0]}/metrics").status_code == 403
    assert httpx.get(f"http://{server[0]}/metrics", headers=ADMIN).status_code == 200


def test_grpc_restricted_protocols_need_triton_metadata(grpc_client):
    for call in (grpc_client.get_model_repository_index, grpc_client.is_server_live,
                 lambda: grpc_client.get_inference_statistics("scale", headers={"admin-key": "admin-secret"})):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "triton-grpc-protocol-" in info.value.message() and "secret" not in info.value.message()

    assert {m.name for m in grpc_client.get_model_repository_index(headers=GRPC_ADMIN).models} == {"scale", "spare"}
    assert grpc_client.get_inference_statistics("scale", headers=GRPC_ADMIN).model_stats[0].name == "scale"
    assert grpc_client.is_server_live(headers=GRPC_HEALTH)
    assert grpc_client.is_model_ready("scale", headers=GRPC_HEALTH)
    assert grpc_client.get_model_metadata("scale").name == "scale"  # metadata is restricted on HTTP only


def _infer_http(http, headers=None):
    x = httpclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4), binary_data=True)
    return http.infer("scale", [x], headers=headers)


def test_http_inference_needs_one_of_the_api_keys(http, server):
    for headers in (None, {"Authorization": "Bearer key-three"}, {"Authorization": "Basic key-one"}):
        error = _http_error(lambda h=headers: _infer_http(http, h))
        assert error.status() == "401" and "Bearer" in error.message() and "key-one" not in error.message()
    for key in ("key-one", "key-two"):
        result = _infer_http(http, {"Authorization": f"Bearer {key}"})
        assert result.as_numpy("y").tolist() == [[0, 2, 4, 6]]

    raw = httpx.post(f"http://{server[0]}/v2/models/scale/infer", json={"inputs": []})
    assert raw.status_code == 401 and raw.headers["www-authenticate"] == "Bearer" and "error" in raw.json()
    wrong = httpx.post(f"http://{server[0]}/v2/models/scale/infer", headers={"Authorization": "Bearer nope"},
                       json={"inputs": []})
    assert wrong.status_code == 401 and "invalid_token" in wrong.headers["www-authenticate"]
    # The task routes are inference too: refused before the route, answered by it with a key.
    for path in ("/v1/models/scale/predict", "/v1/models/scale:predict"):
        assert httpx.post(f"http://{server[0]}{path}", json={"instances": [1]}).status_code == 401
        keyed = httpx.post(f"http://{server[0]}{path}", json={"instances": [1]},
                           headers={"Authorization": "Bearer key-two"})
        assert keyed.status_code not in (401, 403) and "error" in keyed.json()


def test_grpc_inference_needs_one_of_the_api_keys(grpc_client):
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    for headers in (None, {"authorization": "Bearer key-zero"}):
        with pytest.raises(InferenceServerException) as info:
            grpc_client.infer("scale", [x], headers=headers)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    for key in ("key-one", "key-two"):
        result = grpc_client.infer("scale", [x], headers={"authorization": f"Bearer {key}"})
        assert result.as_numpy("y").tolist() == [[2, 2, 2, 2]]


def _state(http, name: str) -> str:
    return {m["name"]: m.get("state") for m in http.get_model_repository_index(headers=ADMIN)}[name]


def test_control_routes_refuse_form_posts_and_keep_tritonclient_working(http, server):
    base = f"http://{server[0]}/v2/repository/models/spare"
    posts = [httpx.post(f"{base}/unload", headers=ADMIN, data={"parameters": "x"}),  # urlencoded form
             httpx.post(f"{base}/unload", headers=ADMIN, files={"f": b"{}"}),  # multipart form
             httpx.post(f"{base}/unload", headers={**ADMIN, "Content-Type": "text/plain"}, content=b"{}"),
             httpx.post(f"{base}/unload", headers=ADMIN, content=b"not json")]  # no Content-Type, not JSON
    for response in posts:
        assert response.status_code == 415, response.text
        assert "Content-Type: application/json" in response.json()["error"]
    assert _state(http, "spare") == "READY"

    http.unload_model("spare", headers=ADMIN)  # tritonclient.http sends no Content-Type
    assert _state(http, "spare") != "READY"
    http.load_model("spare", headers=ADMIN)
    assert _state(http, "spare") == "READY"
    explicit = httpx.post(f"{base}/load", headers=ADMIN, json={})
    assert explicit.status_code == 200


async def test_aio_client_control_routes_work(server):
    """tritonclient.http.aio (aiohttp) labels the same JSON bodies application/octet-stream."""
    client = aiohttpclient.InferenceServerClient(server[0])
    try:
        await client.unload_model("spare", headers=ADMIN)
        states = {m["name"]: m.get("state") for m in await client.get_model_repository_index(headers=ADMIN)}
        assert states["spare"] != "READY"
        await client.load_model("spare", headers=ADMIN)
        assert await client.is_model_ready("spare")
    finally:
        await client.close()


def _serve_fails(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    repo = _repo(tmp_path / "models")
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo),
                           "--http-port", str(free_port()), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "expected"), [
    (["--http-restricted-api", "model-repo:admin-key=top-secret"],
     ["'model-repo:admin-key=<value>'", "unknown API 'model-repo'", "valid APIs: health,", "model-repository"]),
    (["--grpc-restricted-protocol", "model-repository=top-secret"],
     ["'model-repository=<value>' is malformed", "<api>[,<api>...]:<key>=<value>", "statistics"]),
    (["--http-restricted-api", "health,metadata:k=top-secret", "--http-restricted-api", "health:j=top-secret"],
     ["API 'health' is already restricted", "at most one spec"]),
])
def test_bad_restriction_spec_stops_start_up(tmp_path, args, expected):
    done = _serve_fails(tmp_path, *args)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(part in lines[0] for part in expected), done.stderr
    assert "top-secret" not in done.stderr  # the value is a shared secret


def test_warns_when_model_repository_is_exposed_unrestricted(tmp_path):
    """HTTP on every address without a model-repository restriction warns; restricted gRPC there does not."""
    repo = _repo(tmp_path / "models")
    grpc_port = free_port()
    args = ["--http-address", "0.0.0.0", "--grpc-port", str(grpc_port),
            "--grpc-restricted-protocol", "model-repository:admin-key=admin-secret"]
    with run_server(repo, extra_args=args) as url:
        log = (repo.parent / f"server-{url.rsplit(':', 1)[1]}.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "model-repository API" in line]
    assert len(warnings) == 1 and "HTTP on 0.0.0.0" in warnings[0], log
    assert "admin-secret" not in log


@pytest.mark.parametrize(("method", "path", "api"), [
    ("GET", "/v2/health/live", "health"), ("GET", "/v2/health/ready", "health"),
    ("GET", "/v2/models/m/versions/3/ready", "health"), ("GET", "/v2", "metadata"),
    ("GET", "/v2/models/m", "metadata"), ("GET", "/v1/models", "metadata"), ("GET", "/v1/models/m", "metadata"),
    ("GET", "/v2/models/m/config", "model-config"), ("POST", "/v2/models/m/versions/1/infer", "inference"),
    ("POST", "/v1/models/m/predict", "inference"), ("POST", "/v1/models/m:predict", "inference"),
    ("POST", "/v2/models/m/generate", "inference"), ("POST", "/v2/repository/index", "model-repository"),
    ("POST", "/v2/repository/models/m/unload", "model-repository"), ("GET", "/v2/models/stats", "statistics"),
    ("GET", "/v2/models/m/versions/1/stats", "statistics"), ("GET", "/v2/systemsharedmemory/status", "shared-memory"),
    ("GET", "/v2/trace/setting", "trace"), ("POST", "/v2/logging", "logging"),
    ("GET", "/metrics", "statistics"), ("GET", "/", "health"), ("GET", "/docs", None), ("GET", "/openapi.json", None),
])
def test_every_route_belongs_to_triton_s_api_group(method, path, api):
    assert classify_http(method, path) == api


@pytest.mark.parametrize(("method", "api"), [
    ("ServerLive", "health"), ("ModelReady", "health"), ("ServerMetadata", "metadata"),
    ("ModelConfig", "model-config"), ("ModelInfer", "inference"), ("ModelStatistics", "statistics"),
    ("RepositoryModelLoad", "model-repository"), ("RepositoryIndex", "model-repository"),
])
def test_every_grpc_method_belongs_to_triton_s_protocol_group(method, api):
    assert classify_grpc(f"/inference.GRPCInferenceService/{method}") == api

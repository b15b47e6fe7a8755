"""Triton compatibility, round 5: the standard gRPC health service, statistics parity and Triton's command-line
flags, each mismatch found against Triton's docs and sources and shown here through a real server and the
real clients (docs/RELIABILITY.md "Triton compatibility, round 5")."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.server import Server
from service.settings import ServerSettings
from tests.conftest import REPO_ROOT, free_port, run_server, wait_until
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, write_config
from tests.test_helm_chart import CI_VALUES, container, deployment_environment, helm, render  # noqa: F401

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton_round5") / "repo"
    scale_model(repo / "good" / "1" / "model.onnx")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    return repo


def _explicit(*models: str, **extra) -> dict:
    return {"grpc_port": free_port(), "model_control_mode": "explicit", "load_model": list(models),
            "warmup": False, **extra}


# ---------------------------------------------------------------------------------------------- gRPC health


async def _check(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
        return reply.status


async def test_health_check_is_the_server_readiness_under_any_service_name(repo):
    # Triton answers grpc.health.v1 Check from TRITONSERVER_ServerIsReady and ignores the service name.
    settings = _explicit("good")
    async with inprocess_server(repo, **settings):
        for service in ("", "inference.GRPCInferenceService", "grpc.health.v1.Health", "anything"):
            assert await _check(settings["grpc_port"], service) == SERVING
    settings = _explicit("good", "broken")  # strict readiness: a model asked for failed to load
    async with inprocess_server(repo, **settings):
        assert await _check(settings["grpc_port"]) == NOT_SERVING
        assert await _check(settings["grpc_port"], "inference.GRPCInferenceService") == NOT_SERVING


async def test_health_watch_follows_readiness_and_ends_when_the_server_drains(repo):
    settings = _explicit("good", exit_timeout_secs=600.0)
    server = Server(ServerSettings(model_repository=repo, http_host="127.0.0.1", **settings))
    await server.start()
    transport = httpx.ASGITransport(app=server.app)
    async with (httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as client,
                grpc.aio.insecure_channel(f"127.0.0.1:{settings['grpc_port']}") as channel):
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="x"))
        # NOTE: iterate, not stream.read(): grpc.aio's read() answers EOF once the call is done, even with
        # messages still unread (the drain's last NOT_SERVING arrives with the end of the stream).
        replies = aiter(stream)
        assert (await anext(replies)).status == SERVING
        # A load that fails makes the server not ready (strict readiness); no Check is needed to see it.
        assert (await client.post("/v2/repository/models/broken/load")).status_code >= 400
        assert (await anext(replies)).status == NOT_SERVING
        assert (await client.post("/v2/repository/models/broken/unload")).status_code == 200
        assert (await anext(replies)).status == SERVING
        # Draining: the stream sends NOT_SERVING and ends, so it does not hold the 600 s exit timeout. The
        # server stops gRPC only once the stream has ended (service/grpc_drain.py): before, grpc.aio was
        # stopped as the stream wrote, and the NOT_SERVING was missing in 1 of ~10 runs.
        stopping = asyncio.ensure_future(server.stop())
        assert [reply.status async for reply in replies] == [NOT_SERVING]
        assert await stream.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, timeout=60)


async def test_health_check_obeys_the_restricted_health_protocol(repo):
    # Triton files Check under the "health" category of --grpc-restricted-protocol.
    settings = _explicit("good", grpc_restricted_protocol=["health:admin-key=secret"])
    async with (inprocess_server(repo, **settings),
                grpc.aio.insecure_channel(f"127.0.0.1:{settings['grpc_port']}") as channel):
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.Check(health_pb2.HealthCheckRequest())
        assert "expecting header 'triton-grpc-protocol-admin-key'" in denied.value.details()
        key = (("triton-grpc-protocol-admin-key", "secret"),)
        assert (await stub.Check(health_pb2.HealthCheckRequest(), metadata=key)).status == SERVING


def test_health_through_http_worker_front_ends(repo):
    # With --http-workers the front ends own the public gRPC port: Check is forwarded as any unary RPC, Watch
    # (server-streaming) by its own forwarder.
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port), "--http-workers", "2", "--model-control-mode", "explicit",
            "--load-model", "good"]

    async def ask() -> tuple[int, int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            check = await stub.Check(health_pb2.HealthCheckRequest(service="x"), timeout=30)
            stream = stub.Watch(health_pb2.HealthCheckRequest())
            first = await asyncio.wait_for(anext(aiter(stream)), 30)
            stream.cancel()
            return check.status, first.status

    with run_server(repo, extra_args=args, env={"MODELSERVE_WARMUP": "false"}):
        assert asyncio.run(ask()) == (SERVING, SERVING)


def test_chart_grpc_probes_ask_the_health_service_on_the_grpc_port(helm):  # noqa: F811
    # The rendered manifests are validated against Kubernetes 1.29 / 1.33 / latest by tests/test_helm_chart.py
    # (ci/grpc-probes-values.yaml is one of its configurations).
    docs = render(helm, CI_VALUES["grpc-probes-values"])
    c = container(docs)
    env = deployment_environment(docs)
    grpc_port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
    assert str(grpc_port) == env["MODELSERVE_GRPC_PORT"]
    for kind in ("startupProbe", "readinessProbe"):
        assert c[kind]["grpc"] == {"port": grpc_port} and "httpGet" not in c[kind]
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"  # gRPC health is readiness, as Triton's
    defaults = container(render(helm))
    assert defaults["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready" and "grpc" not in defaults["readinessProbe"]


# ---------------------------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def stats_server(repo):
    """A real server holding `good` (batching) and `fixed` (max_batch_size 0) for the statistics checks."""
    scale_model(repo / "fixed" / "1" / "model.onnx")
    write_config(repo / "fixed", "max_batch_size: 0\n")
    grpc_port, metrics_port = free_port(), free_port()
    args = ["--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--model-control-mode", "explicit",
            "--load-model", "good", "--load-model", "fixed"]
    with run_server(repo, extra_args=args, env={"MODELSERVE_WARMUP": "false"}) as http_url:
        yield SimpleNamespace(http=httpclient.InferenceServerClient(http_url),
                              grpc=grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"),
                              metrics=f"http://127.0.0.1:{metrics_port}/metrics")


def _infer(client, module, model: str, rows: int) -> None:
    x = np.ones((rows, 4), np.float32)
    tensor = module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client.infer(model, [tensor])


def _metric(url: str, name: str, model: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            # prometheus_client's parser names a counter's samples <name>_total; the exposition has no suffix
            if sample.name in (name, f"{name}_total") and sample.labels.get("model") == model:
                return sample.value
    raise AssertionError(f"{name} for {model!r} not exposed")


def test_statistics_carry_tritons_response_stats_and_memory_usage_fields(stats_server):
    _infer(stats_server.http, httpclient, "good", 2)
    stat = stats_server.http.get_inference_statistics("good")["model_stats"][0]
    # Triton's JSON has both, empty for a model that is not decoupled and reports no memory.
    assert stat["response_stats"] == {} and stat["memory_usage"] == []
    assert stat["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
    assert stat["inference_stats"]["cache_miss"] == {"count": 0, "ns": 0}
    grpc_stat = stats_server.grpc.get_inference_statistics("good").model_stats[0]
    assert grpc_stat.inference_stats.cache_miss.count == 0 and len(grpc_stat.memory_usage) == 0
    assert dict(grpc_stat.response_stats) == {}


def test_request_duration_metric_counts_successes_only_as_tritons(stats_server):
    # Triton adds to nv_inference_request_duration_us in UpdateSuccess only; a failure counts in
    # nv_inference_request_failure, not in the duration (dashboards divide it by the success count).
    _infer(stats_server.grpc, grpcclient, "good", 1)
    with pytest.raises(InferenceServerException):
        _infer(stats_server.grpc, grpcclient, "good", 0)  # 0 rows: refused
    stat = stats_server.http.get_inference_statistics("good")["model_stats"][0]["inference_stats"]
    assert stat["fail"]["count"] >= 1 and stat["fail"]["ns"] >= 1000  # the old sum would differ
    duration = _metric(stats_server.metrics, "nv_inference_request_duration_us", "good")
    after = stats_server.http.get_inference_statistics("good")["model_stats"][0]["inference_stats"]
    assert after == stat  # nothing ran between the two reads
    assert duration == stat["success"]["ns"] // 1000


def test_a_model_without_batching_counts_one_inference_per_request(stats_server):
    # Triton counts max(1, request batch size): 0 for a model without a batch dimension, so one per request.
    before = stats_server.http.get_inference_statistics("fixed")["model_stats"][0]
    _infer(stats_server.http, httpclient, "fixed", 3)
    _infer(stats_server.grpc, grpcclient, "fixed", 5)
    stat = stats_server.http.get_inference_statistics("fixed")["model_stats"][0]
    assert stat["inference_count"] - before["inference_count"] == 2
    assert stat["execution_count"] - before["execution_count"] == 2
    assert {b["batch_size"] for b in stat["batch_stats"]} == {1}
    assert _metric(stats_server.metrics, "nv_inference_count", "fixed") == stat["inference_count"]


# ---------------------------------------------------------------------------------------------- Triton's flags


def _serve_exits(repo, *args: str) -> str:
    """`modelserve serve` with these flags must exit non-zero at start; its stderr."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo), "--http-port",
           str(free_port()), "--http-address", "127.0.0.1", "--log-level", "warning", *args]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MODELSERVE_WARMUP": "false"})
    assert done.returncode != 0, done.stdout + done.stderr
    return done.stderr


@pytest.mark.parametrize("args,expected", [
    # argparse used to keep the last one silently
    (["--model-repository", "/tmp/other"], "one model repository is served, got 2"),
    (["--model-store", "/tmp/other"], "one model repository is served, got 2"),  # Triton's older name
    (["--model-control-mode", "explicit", "--load-model", "*", "--load-model", "good"],
     "'*' (every model) must be the only load_model"),
    (["--backend-config", "tensorflow,version=2"], "this server runs ONNX Runtime only"),
    (["--backend-config", "onnxruntime,enable-global-threadpool=1"],
     "setting 'enable-global-threadpool' is not supported; supported: ['default-max-batch-size']"),
    (["--allow-http", "false"], "allow_http=false leaves nothing to serve"),
    # Triton's --exit-on-error: a model that fails at start-up stops the server, naming it and why
    (["--model-control-mode", "explicit", "--load-model", "good", "--load-model", "broken",
      "--exit-on-error=true"], "model(s) failed to load and exit_on_error is set"),
])
def test_triton_flags_refused_or_failing_say_why(repo, args, expected):
    assert expected in _serve_exits(repo, *args)


def test_disable_auto_complete_config_needs_a_complete_config(repo):
    out = _serve_exits(repo, "--model-control-mode", "explicit", "--load-model", "good",
                       "--disable-auto-complete-config", "--exit-on-error", "true")
    assert "good: model 'good': auto-complete is disabled" in out and "['x']" in out


async def test_without_auto_complete_a_complete_config_serves_unbatched(repo):
    write_config(repo / "complete", 'input [{ name: "x" data_type: TYPE_FP32 dims: [-1, 4] }]\n'
                 'output [{ name: "y" data_type: TYPE_FP32 dims: [-1, 4] }]\n')
    scale_model(repo / "complete" / "1" / "model.onnx")
    settings = _explicit("complete", "good", strict_readiness=False)
    async with inprocess_server(repo, disable_auto_complete_config=True, **settings) as (_, client):
        index = {row["name"]: row for row in (await client.post("/v2/repository/index")).json()}
        assert index["complete"]["state"] == "READY"
        assert index["good"]["state"] == "UNAVAILABLE" and "auto-complete is disabled" in index["good"]["reason"]
        config = (await client.get("/v2/models/complete/config")).json()
        assert config["max_batch_size"] == 0 and "dynamic_batching" not in config  # not read from the graph


def test_triton_switches_resolve_onto_the_ports():
    assert ServerSettings(allow_grpc=True).grpc_port == 8001  # Triton's gRPC port when none is given
    assert ServerSettings(allow_grpc=True, grpc_port=9001).grpc_port == 9001
    assert ServerSettings(allow_grpc=False, grpc_port=9001).grpc_port is None
    assert ServerSettings(allow_metrics=False, metrics_port=9002).metrics_port is None
    assert ServerSettings(backend_config=["default-max-batch-size=4"]).default_max_batch_size == 4


def test_id_backend_config_and_allow_metrics_through_the_clients(repo):
    grpc_port, metrics_port = free_port(), free_port()
    args = ["--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--allow-metrics=false",
            "--id", "triton-compat", "--backend-config", "onnxruntime,default-max-batch-size=4",
            "--strict-model-config=false", "--model-control-mode", "explicit", "--load-model", "good"]
    with run_server(repo, extra_args=args, env={"MODELSERVE_WARMUP": "false"}) as url:
        http, grpc_ = httpclient.InferenceServerClient(url), grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert http.get_server_metadata()["name"] == "triton-compat"
        assert grpc_.get_server_metadata().name == "triton-compat"
        assert http.get_model_config("good")["max_batch_size"] == 4
        assert grpc_.get_model_config("good").config.max_batch_size == 4
        assert httpx.get(f"http://{url}/metrics", timeout=10).status_code == 404
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)


def test_allow_http_false_serves_grpc_only(repo):
    grpc_port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo), "--http-port",
           str(http_port), "--http-address", "127.0.0.1", "--grpc-port", str(grpc_port), "--allow-http=false",
           "--model-control-mode", "explicit", "--load-model", "good", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "MODELSERVE_WARMUP": "false"})
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")

        def ready() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                return client.is_server_ready()
            except InferenceServerException:
                return False

        wait_until(ready, timeout=90, what="gRPC ready")
        _infer(client, grpcclient, "good", 1)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------------- perf_analyzer


async def test_control_bodies_labelled_as_curl_labels_them_are_json_unless_a_browser_sent_them(repo):
    # perf_analyzer --shared-memory system over HTTP failed here: Triton's C++ client (libcurl) labels its JSON
    # bodies application/x-www-form-urlencoded, and control routes answered 415.
    region = shm.create_shared_memory_region("r5_region", "/r5_region", 64)
    curl = {"Content-Type": "application/x-www-form-urlencoded"}
    register = orjson.dumps({"key": "/r5_region", "offset": 0, "byte_size": 64})
    try:
        async with inprocess_server(repo, allow_client_shm=True, **_explicit("good")) as (_, client):
            answer = await client.post("/v2/systemsharedmemory/region/r5/register", headers=curl, content=register)
            assert answer.status_code == 200, answer.text
            status = (await client.get("/v2/systemsharedmemory/region/r5/status")).json()
            assert status[0]["name"] == "r5" and status[0]["byte_size"] == 64
            # perf_analyzer's next failure: an output written to a region came back with "parameters" but no
            # "binary_data_size", which Triton's C++ client requires of any output that has parameters.
            infer = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
                     "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r5",
                                                              "shared_memory_byte_size": 16}}]}
            answer = await client.post("/v2/models/good/infer", json=infer)
            assert answer.status_code == 200, answer.text
            out = answer.json()["outputs"][0]
            assert out == {"name": "y", "datatype": "FP32", "shape": [1, 4]}  # Triton's: no data, no parameters
            assert shm.get_contents_as_numpy(region, np.float32, [1, 4]).tolist() == [[2, 4, 6, 8]]
            unload = await client.post("/v2/repository/models/good/unload", headers=curl, content=b"{}")
            assert unload.status_code == 200, unload.text
            # The same request from a web page (browsers always send Origin) is still refused: the CSRF guard.
            browser = {**curl, "Origin": "http://evil.example"}
            answer = await client.post("/v2/repository/models/good/load", headers=browser, content=b"{}")
            assert answer.status_code == 415 and "Content-Type: application/json" in answer.json()["error"]
            form = await client.post("/v2/repository/models/good/load", headers=curl, content=b"parameters=x")
            assert form.status_code == 415  # a real form body is not JSON
    finally:
        shm.destroy_shared_memory_region(region)

"""Triton compatibility, round 5: the standard gRPC health service, statistics parity and Triton's command-line
flags, each mismatch found against Triton's docs and sources and shown here through a real server and the
real clients (docs/RELIABILITY.md "Triton compatibility, round 5")."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.server import Server
from service.settings import ServerSettings
from tests.conftest import free_port
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model
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
    async with (httpx.AsyncClient(transport=transport, base_url="http://modelserve", timeout=60) as client,
                grpc.aio.insecure_channel(f"127.0.0.1:{settings['grpc_port']}") as channel):
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="x"))
        assert (await stream.read()).status == SERVING
        # A load that fails makes the server not ready (strict readiness); no Check is needed to see it.
        assert (await client.post("/v2/repository/models/broken/load")).status_code >= 400
        assert (await stream.read()).status == NOT_SERVING
        assert (await client.post("/v2/repository/models/broken/unload")).status_code == 200
        assert (await stream.read()).status == SERVING
        # Draining: NOT_SERVING, then the stream ends, so it does not hold the 600 s exit timeout.
        stopping = asyncio.ensure_future(server.stop())
        assert (await stream.read()).status == NOT_SERVING
        while (reply := await stream.read()) is not grpc.aio.EOF:
            assert reply.status == NOT_SERVING
        assert await stream.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, timeout=60)


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

"""Round 4, deployment from outside: what the rendered chart points at exists on a real server.

The chart (defaults and every option on) is rendered with helm; a real `modelserve serve` runs with the
Deployment's own MODELSERVE_* environment (ports moved to free ones); every probe's path is asked on the
port the probe names, and the ServiceMonitor's path on the port it scrapes.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.conftest import free_port, run_server
from tests.test_helm_chart import CI_VALUES, container, deployment_environment, helm, one, render  # noqa: F401

PORT_SETTINGS = {"http": "MODELSERVE_HTTP_PORT", "grpc": "MODELSERVE_GRPC_PORT", "metrics": "MODELSERVE_METRICS_PORT"}


@pytest.mark.parametrize("values", ["defaults", "all-on-values"])
def test_probes_and_the_scrape_path_answer_on_a_server_run_as_the_chart_runs_it(helm, tiny_zoo, values,  # noqa: F811
                                                                                 tmp_path):
    docs = render(helm, *((CI_VALUES[values],) if values in CI_VALUES else ()))
    c = container(docs)
    env = deployment_environment(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for name, setting in PORT_SETTINGS.items():  # each named port is the one the server is told to listen on
        assert str(ports[name]) == env[setting], (name, ports, env)
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p["port"] for p in probes.values()} == {"http"}
    service = one(docs, "Service", "modelserve")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["metrics"] == "metrics"
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    scrape = monitors[0]["spec"]["endpoints"][0] if monitors else {"port": "metrics", "path": "/metrics"}

    metrics_port, grpc_port = free_port(), free_port()
    local = {k: v for k, v in env.items() if k.startswith("MODELSERVE_") and k != "MODELSERVE_MODEL_REPOSITORY"}
    local.update(MODELSERVE_METRICS_PORT=str(metrics_port), MODELSERVE_GRPC_PORT=str(grpc_port),
                 MODELSERVE_REPOSITORY_CACHE_DIR="")
    local = {k: v for k, v in local.items() if v}
    # One family (cnn) shows what the probes and the scrape answer; loading the whole zoo only costs time.
    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_zoo / "cnn", repo / "cnn")
    with run_server(repo, env=local) as url:
        for kind, probe in probes.items():
            assert httpx.get(f"http://{url}{probe['path']}", timeout=10).status_code == 200, kind
        assert scrape["port"] == "metrics"
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}{scrape['path']}", timeout=10)
        assert scraped.status_code == 200 and "nv_inference_request_success" in scraped.text

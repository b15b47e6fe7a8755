"""helm/kserve: the ClusterServingRuntime and example InferenceService parse and carry what KServe needs.

No KServe CRD schema ships with kubernetes-validate, so the required fields are checked here by hand; the
runtime's arguments are fed to the server's own CLI parser and settings.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from service.settings import ServerSettings

KSERVE = Path(__file__).resolve().parent.parent / "helm" / "kserve"


def _load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KSERVE / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def test_cluster_serving_runtime():
    runtime = _load("clusterservingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ClusterServingRuntime"
    assert runtime["metadata"]["name"]
    spec = runtime["spec"]
    assert {"name": "onnx", "version": "1", "autoSelect": True, "priority": 2} in spec["supportedModelFormats"]
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container" and container["image"]
    args = container["args"]
    assert args[args.index("--model-repository") + 1] == "/mnt/models"
    assert container["ports"][0]["containerPort"] == int(args[args.index("--http-port") + 1])
    assert container["securityContext"]["runAsNonRoot"] is True


def test_runtime_args_are_accepted_by_the_server():
    args = _load("clusterservingruntime.yaml")["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    settings = ServerSettings(
        model_repository=flags["--model-repository"], http_port=int(flags["--http-port"]),
        grpc_port=int(flags["--grpc-port"]), metrics_port=int(flags["--metrics-port"]),
    )
    assert str(settings.model_repository) == "/mnt/models"


def test_inference_service_uses_the_runtime():
    isvc = _load("inferenceservice.yaml")
    runtime = _load("clusterservingruntime.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].split("://")[0] in {"s3", "gs", "pvc", "https", "azure", "hf", "oci"}

"""The image run as the chart runs it with `modelRepository.url=s3://...`: the server mirrors the bucket itself.

A moto S3 server on this machine (reached from the container at the bridge's gateway address) holds the zoo's cnn;
the chart is rendered with the URL and a credentials Secret, whose keys are given to the container as `envFrom`
would; the cache emptyDir is a tmpfs at its mount path. Checked: the server gets ready, answers a tritonclient
infer, and the model files are in the cache volume, not anywhere else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import boto3
import numpy as np
import tritonclient.http as httpclient
from moto.server import ThreadedMotoServer

from loadtests.image_run import Checks, engine_out, find_helm, free_port, pod_run, render_chart, start, wait_ready

BUCKET = "modelserve-image-check"


def _upload(models: Path, *, endpoint: str, model: str) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    for path in sorted((models / model).rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"models/{path.relative_to(models)}")


def _host_address(engine: str) -> str:
    """This machine's address on the engine's default bridge. NOTE: an IP, not host.containers.internal: moto
    reads a dotted host name as a virtual-hosted bucket ("host") and answers that the bucket does not exist."""
    fmt = "{{range .Subnets}}{{.Gateway}}{{end}}" if engine == "podman" else "{{range .IPAM.Config}}{{.Gateway}}{{end}}"
    network = "podman" if engine == "podman" else "bridge"
    return engine_out(engine, "network", "inspect", network, "--format", fmt).stdout.strip() or "172.17.0.1"


def check_s3(checks: Checks, *, engine: str, image: str, models: Path, model: str = "cnn") -> None:
    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=port, verbose=False)
    server.start()
    name = "modelserve-image-check-s3"
    try:
        _upload(models, endpoint=f"http://127.0.0.1:{port}", model=model)
        docs = render_chart(find_helm(), f"modelRepository.url=s3://{BUCKET}/models",
                            "modelRepository.credentialsSecret=modelserve-s3")
        host_ports = {n: free_port() for n in ("http", "grpc", "metrics")}
        secret = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{_host_address(engine)}:{port}"}
        run = pod_run(docs, models=models, host_ports=host_ports, secret_env=secret)
        start(engine, name, run, image)
        ready = wait_ready(f"http://127.0.0.1:{host_ports['http']}/v2/health/ready", timeout_s=300,
                           engine=engine, name=name)
        logs = engine_out(engine, "logs", name)
        if not checks.add("s3:// repository (chart url + credentials Secret): ready", ready is not None,
                          f"{ready:.1f} s" if ready is not None else (logs.stdout + logs.stderr)[-800:]):
            return
        data = np.zeros((1, 1, 28, 28), np.float32)
        with httpclient.InferenceServerClient(f"127.0.0.1:{host_ports['http']}") as client:
            inp = httpclient.InferInput("image", list(data.shape), "FP32")
            inp.set_data_from_numpy(data)
            got = client.infer(model, [inp]).as_numpy("probabilities")
        cache = run.env["MODELSERVE_REPOSITORY_CACHE_DIR"]
        listed = engine_out(engine, "exec", name, "find", cache, "-name", "model.onnx").stdout.split()
        checks.add("s3:// repository: infer answers, the model mirrored into the cache volume",
                   got is not None and got.shape == (1, 10) and bool(listed), {"cache": cache, "found": listed})
    finally:
        engine_out(engine, "rm", "-f", name)
        server.stop()

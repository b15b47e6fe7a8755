"""Check a built server image from outside, run the way the Helm chart runs it (podman or docker).

    python -m loadtests.image_check --image modelserve:r5 --models ZOO [--engine podman] [--out image_check.json]

ZOO is a model repository with the default zoo's `cnn` (a copy of a `modelserve build` output); it is mounted
read-only where the chart mounts a PersistentVolumeClaim. Checks, each printed PASS/FAIL with its detail:
image size; installed distributions = requirements/server-<variant>.lock + modelserve (no test or training
packages); start as the chart does (loadtests/image_run.py) until the startup probe's path answers; each
probe's path on its port; tritonclient http and grpc infer; a /v1 task route; /metrics on the metrics port;
the image's own HEALTHCHECK; what a start writes (a second run with a writable root, `diff`: only /tmp);
then `stop` during a stream of requests (loadtests/image_drain.py): none lost, exit 0 within the chart's
terminationGracePeriodSeconds, and the logs say what happened; the experimental --http-workers 2 gets
ready; and the chart's s3:// repository mode against a moto server (loadtests/image_s3.py). Exit status 1 if
any check failed.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

from loadtests.image_drain import stop_under_load
from loadtests.image_run import REPO_ROOT, Checks, PodRun, chart_pod_run, engine_out, start, wait_ready
from loadtests.image_s3 import check_s3

# Distributions that must never be in the server image (training, tests, packaging tools).
FORBIDDEN = {"torch", "pytest", "hypothesis", "scikit-learn", "pip", "setuptools", "wheel", "ray", "pyarrow",
             "openai", "locust", "ruff", "mypy", "tritonclient-http", "geventhttpclient"}
DISTS_SCRIPT = ("import importlib.metadata as m, json; print(json.dumps(sorted({(d.metadata['Name'], d.version) "
                "for d in m.distributions()})))")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_versions(variant: str) -> dict[str, str]:
    text = (REPO_ROOT / "requirements" / f"server-{variant}.lock").read_text()
    return {_norm(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}


def check_image(checks: Checks, *, engine: str, image: str, variant: str) -> None:
    size = int(engine_out(engine, "image", "inspect", image, "--format", "{{.Size}}").stdout.strip() or 0)
    checks.add("image size", size > 0, f"{size / 1e6:.0f} MB")
    out = engine_out(engine, "run", "--rm", "--read-only", "--entrypoint", "python", image, "-c", DISTS_SCRIPT)
    if not checks.add("list installed distributions", out.returncode == 0, out.stderr.strip()[-300:] or "ok"):
        return
    installed = {_norm(n): v for n, v in json.loads(out.stdout)}
    lock = lock_versions(variant)
    extra = sorted(set(installed) - set(lock) - {"modelserve"})
    missing = sorted(set(lock) - set(installed))
    differ = sorted(f"{n} {installed[n]} (lock {lock[n]})" for n in set(lock) & set(installed)
                    if installed[n] != lock[n])
    checks.add("installed = lock + modelserve", not (extra or missing or differ),
               {"installed": len(installed), "extra": extra, "missing": missing, "version differs": differ})
    checks.add("no test/train/packaging distributions", not FORBIDDEN & set(installed),
               sorted(FORBIDDEN & set(installed)) or "none of " + ", ".join(sorted(FORBIDDEN)))


def check_serving(checks: Checks, *, run: PodRun, ports: dict[str, int], engine: str, name: str) -> None:
    http = f"127.0.0.1:{ports['http']}"
    for kind, probe in run.probes.items():
        got = httpx.get(f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}", timeout=5).status_code
        checks.add(f"{kind} {probe['path']} on port {probe['port']}", got == 200, got)
    data = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
    with httpclient.InferenceServerClient(http) as client:
        inp = httpclient.InferInput("image", list(data.shape), "FP32")
        inp.set_data_from_numpy(data, binary_data=True)
        got = client.infer("cnn", [inp]).as_numpy("probabilities")
        checks.add("tritonclient.http infer cnn", got is not None and got.shape == (2, 10), getattr(got, "shape", None))
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    try:
        inp = grpcclient.InferInput("image", list(data.shape), "FP32")
        inp.set_data_from_numpy(data)
        got = grpc.infer("cnn", [inp]).as_numpy("probabilities")
        checks.add("tritonclient.grpc infer cnn", got is not None and got.shape == (2, 10), getattr(got, "shape", None))
    finally:
        grpc.close()
    png = io.BytesIO()
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(png, format="PNG")
    resp = httpx.post(f"http://{http}/v1/models/cnn/predict", files={"file": ("digit.png", png.getvalue())}, timeout=30)
    checks.add("POST /v1/models/cnn/predict (PNG)", resp.status_code == 200, f"{resp.status_code} {resp.text[:120]}")
    scraped = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5)
    success = re.search(r'^nv_inference_request_success\{[^}]*model="cnn"[^}]*\} (\S+)', scraped.text, re.M)
    checks.add("/metrics on the metrics port counts the infers", success is not None and float(success[1]) >= 3,
               success[0] if success is not None else f"{scraped.status_code}, no cnn success counter")
    hc = engine_out(engine, "healthcheck", "run", name) if engine == "podman" else None
    checks.add("image HEALTHCHECK passes", hc is None or hc.returncode == 0,
               "docker: see docker inspect" if hc is None else (hc.stdout + hc.stderr).strip() or "healthy")


def _diff(engine: str, name: str) -> list[str]:
    return [p for p in engine_out(engine, "diff", name).stdout.split() if p.startswith("/")]


def _baseline_diff(engine: str, image: str) -> set[str]:
    """What `diff` shows for a container of the image that only sleeps (the engine's own /etc/hosts mounts)."""
    name = "modelserve-image-check-baseline"
    engine_out(engine, "rm", "-f", name)
    engine_out(engine, "run", "-d", "--name", name, "--entrypoint", "sleep", image, "60")
    try:
        return set(_diff(engine, name))
    finally:
        engine_out(engine, "rm", "-f", *(["-t", "0"] if engine == "podman" else []), name)


def check_writes(checks: Checks, *, engine: str, image: str, run: PodRun, ports: dict[str, int]) -> None:
    """A run with a writable root and no /tmp volume: after start and one infer, `diff` lists what it wrote."""
    name = "modelserve-image-check-writes"
    args, skip = [], False
    for a in run.args:  # drop the read-only root and the tmpfs volumes; keep everything else
        if skip:
            skip = False
        elif a == "--tmpfs":
            skip = True
        elif not a.startswith("--read-only"):
            args.append(a)
    start(engine, name, PodRun(args=args, ports=run.ports, probes=run.probes, grace_s=run.grace_s,
                               pre_stop=run.pre_stop, cmd=run.cmd), image)
    try:
        ready = wait_ready(f"http://127.0.0.1:{ports['http']}/v2/health/ready", timeout_s=300, engine=engine, name=name)
        if ready is not None:
            httpx.post(f"http://127.0.0.1:{ports['http']}/v2/models/cnn/infer", timeout=30, json={"inputs": [
                {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]})
        paths = _diff(engine, name)
        outside = sorted(set(paths) - _baseline_diff(engine, image) - {"/tmp"})
        outside = [p for p in outside if not p.startswith("/tmp/")]
        checks.add("a start and an infer write only under /tmp", ready is not None and not outside,
                   {"written": paths[:20], "outside /tmp": outside[:20]})
        telemetry = [p for p in paths if "Microsoft/DeveloperTools" in p or p.endswith(".ses")]
        checks.add("no onnxruntime telemetry files (device id, event cache)", ready is not None and not telemetry,
                   telemetry[:5] or "none")
    finally:
        engine_out(engine, "rm", "-f", name)


def check_http_workers(checks: Checks, *, engine: str, image: str, run: PodRun, ports: dict[str, int]) -> None:
    """The experimental --http-workers front ends start in the image too (they import more than the server)."""
    name = "modelserve-image-check-workers"
    start(engine, name, PodRun(args=run.args, ports=run.ports, probes=run.probes, grace_s=run.grace_s,
                               pre_stop=run.pre_stop, cmd=[*run.cmd, "--http-workers", "2"]), image)
    try:
        ready = wait_ready(f"http://127.0.0.1:{ports['http']}/v2/health/ready", timeout_s=300, engine=engine, name=name)
        logs = engine_out(engine, "logs", name)
        checks.add("--http-workers 2 gets ready", ready is not None,
                   f"{ready:.1f} s" if ready is not None else (logs.stdout + logs.stderr)[-600:])
    finally:
        engine_out(engine, "rm", "-f", name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", required=True)
    ap.add_argument("--models", required=True, type=Path, help="model repository with the zoo's cnn")
    ap.add_argument("--engine", default="podman")
    ap.add_argument("--variant", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--out", type=Path, default=Path("image_check.json"))
    a = ap.parse_args()
    checks, name = Checks(), "modelserve-image-check"
    check_image(checks, engine=a.engine, image=a.image, variant=a.variant)
    run, ports = chart_pod_run(models=a.models.resolve())
    start(a.engine, name, run, a.image)
    try:
        startup = run.probes["startupProbe"]
        ready_s = wait_ready(f"http://127.0.0.1:{ports[startup['port']]}{startup['path']}", timeout_s=600,
                             engine=a.engine, name=name)
        if checks.add("starts as the chart runs it (startup probe 200)", ready_s is not None,
                      f"{ready_s:.1f} s" if ready_s is not None else engine_out(a.engine, "logs", name).stderr[-2000:]):
            check_serving(checks, run=run, ports=ports, engine=a.engine, name=name)
            check_stop(checks, engine=a.engine, name=name, run=run, ports=ports)
    finally:
        engine_out(a.engine, "rm", "-f", name)
    check_writes(checks, engine=a.engine, image=a.image, run=run, ports=ports)
    check_http_workers(checks, engine=a.engine, image=a.image, run=run, ports=ports)
    check_s3(checks, engine=a.engine, image=a.image, models=a.models.resolve())
    a.out.write_text(json.dumps(checks.results, indent=2, default=str))
    failed = [r["check"] for r in checks.results if not r["ok"]]
    print(f"{len(checks.results) - len(failed)}/{len(checks.results)} checks passed; results in {a.out}")
    sys.exit(1 if failed else 0)


def check_stop(checks: Checks, *, engine: str, name: str, run: PodRun, ports: dict[str, int]) -> None:
    report = stop_under_load(engine=engine, name=name, http_url=f"127.0.0.1:{ports['http']}",
                             grpc_url=f"127.0.0.1:{ports['grpc']}", pre_stop=run.pre_stop, grace_s=run.grace_s)
    lost = report["outcomes"].get("lost", 0)
    checks.add("the chart's preStop command runs in the image", report["pre_stop_exit_code"] in (None, 0),
               {"command": report["pre_stop"], "exit code": report["pre_stop_exit_code"]})
    checks.add("stop during a stream of requests: none lost", lost == 0 and report["after_sigterm"].get("ok", 0) > 0,
               report)
    checks.add("exit code 0 within terminationGracePeriodSeconds",
               report["exit_code"] == "0" and report["sigterm_to_exit_s"] < report["kill_after_s"],
               {k: report[k] for k in ("exit_code", "sigterm_to_exit_s", "kill_after_s", "grace_s")})
    logs = engine_out(engine, "logs", name)
    text = logs.stdout + logs.stderr
    said = [line for line in text.splitlines() if re.search(r"SIGTERM|stopped|exit timeout|drain", line)]
    ok = any("SIGTERM" in s for s in said) and any("stopped" in s for s in said)
    checks.add("logs say what happened on SIGTERM", ok, said[-6:])


if __name__ == "__main__":
    main()

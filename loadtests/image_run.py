"""Run the image the way the Helm chart's Deployment runs it, with podman or docker.

The chart is rendered with helm (`existingClaim` on, so the model repository is a read-only volume at the
chart's mount path, as a PersistentVolumeClaim would be) and its pod spec is turned into `run` flags: the
user and group, the read-only root filesystem, dropped capabilities, no privilege escalation, the emptyDir
volumes as tmpfs mounts of their size limit, the container's environment (the downward-API CPU count taken
from the rendered resources, as the kubelet would), each named container port published on loopback, and the
probes, preStop command and termination grace period kept for the checks. Nothing here reads the Dockerfile:
what the image does differently from the chart shows up as a failed check.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "helm" / "modelserve"


@dataclass
class PodRun:
    """What `podman run` needs to run the chart's container, and what the checks compare against."""

    args: list[str]                        # flags for `run`, before the image
    ports: dict[str, int]                  # container port name -> container port
    probes: dict[str, dict]                # startupProbe/readinessProbe/livenessProbe -> httpGet
    grace_s: int                           # terminationGracePeriodSeconds
    pre_stop: list[str]                    # the preStop exec command
    cmd: list[str] = field(default_factory=list)  # the container's args, after the image
    env: dict[str, str] = field(default_factory=dict)
    models_path: str = "/models"


def find_helm() -> str:
    """helm from $HELM, the repo's .venv (make helm), next to this Python, or PATH."""
    for candidate in (os.environ.get("HELM"), REPO_ROOT / ".venv" / "bin" / "helm",
                      Path(sys.executable).parent / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SystemExit("helm not found: run `make helm` or set HELM=/path/to/helm")


def render_chart(helm: str, *sets: str) -> list[dict]:
    args = [helm, "template", "rel", str(CHART), "--namespace", "serving"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _cpu_count(quantity: str) -> str:
    """The downward API's value of a CPU quantity with divisor 1: rounded up to whole CPUs."""
    q = str(quantity)
    return str(math.ceil(int(q[:-1]) / 1000 if q.endswith("m") else float(q)))


def _env(container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item.get("valueFrom", {}).get("resourceFieldRef")
        if ref is None:
            raise ValueError(f"env {item['name']}: only values and resourceFieldRef are supported here")
        kind, resource = ref["resource"].split(".", 1)
        env[item["name"]] = _cpu_count(container["resources"][kind][resource])
    return env


def _security_args(pod: dict, sc: dict) -> list[str]:
    merged = {**pod.get("securityContext", {}), **sc}
    args = ["--user", f"{merged['runAsUser']}:{merged['runAsGroup']}"]
    if merged.get("fsGroup") is not None:
        args += ["--group-add", str(merged["fsGroup"])]
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if sc.get("privileged"):
        raise ValueError("the chart asks for a privileged container")
    return args


def _volume_args(pod: dict, container: dict, models: Path) -> list[str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    args = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "1Gi").replace("Gi", "g").replace("Mi", "m")
            # NOTE: an emptyDir is writable by the pod's fsGroup; a sticky world-writable tmpfs is the closest.
            args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=1777"]
        elif "persistentVolumeClaim" in volume:
            args += ["-v", f"{models}:{mount['mountPath']}:ro"]
        else:
            raise ValueError(f"volume {mount['name']}: only emptyDir and persistentVolumeClaim are supported")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_run(docs: list[dict], *, models: Path, host_ports: dict[str, int],
            secret_env: dict[str, str] | None = None) -> PodRun:
    """The `run` flags for the rendered Deployment's one container; host_ports maps port names to loopback ports,
    secret_env is what the container's `envFrom` Secrets hold."""
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    if container.get("envFrom") and secret_env is None:
        raise ValueError(f"the container takes env from {container['envFrom']}: pass secret_env")
    env = {**(secret_env or {}), **_env(container)}  # as Kubernetes: `env` wins over `envFrom`
    args = _security_args(pod, container.get("securityContext", {}))
    args += _volume_args(pod, container, models)
    memory = container.get("resources", {}).get("limits", {}).get("memory")
    if memory:
        args += ["--memory", memory.replace("Gi", "g").replace("Mi", "m")]
    for name, value in env.items():
        args += ["-e", f"{name}={value}"]
    ports = {p["name"]: int(p["containerPort"]) for p in container["ports"]}
    for name, port in ports.items():
        args += ["-p", f"127.0.0.1:{host_ports[name]}:{port}"]
    if container.get("command"):
        args += ["--entrypoint", json.dumps(container["command"])]
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if m.get("readOnly")]
    return PodRun(args=args, ports=ports, probes=probes, grace_s=int(pod["terminationGracePeriodSeconds"]),
                  pre_stop=pre_stop, env=env, cmd=[str(a) for a in container.get("args", [])],
                  models_path=mounts[0] if mounts else env["MODELSERVE_MODEL_REPOSITORY"])


class Checks:
    def __init__(self) -> None:
        self.results: list[dict] = []

    def add(self, name: str, ok: bool, detail: object) -> bool:
        self.results.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        return bool(ok)


def engine_out(engine: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([engine, *args], capture_output=True, text=True, timeout=timeout, check=False)


def start(engine: str, name: str, run: PodRun, image: str) -> None:
    engine_out(engine, "rm", "-f", name)
    out = engine_out(engine, "run", "-d", "--name", name, *run.args, image, *run.cmd)
    if out.returncode != 0:
        raise SystemExit(f"{engine} run failed: {out.stderr}")


def wait_ready(url: str, *, timeout_s: float, engine: str, name: str) -> float | None:
    """Seconds until GET url answers 200, or None (the container exited or the time ran out)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        if engine_out(engine, "inspect", name, "--format", "{{.State.Running}}").stdout.strip() != "true":
            return None
        time.sleep(0.5)
    return None


def chart_pod_run(*, models: Path, helm: str | None = None) -> tuple[PodRun, dict[str, int]]:
    """Render the chart with the repository as a volume and return the run flags and the loopback ports."""
    docs = render_chart(helm or find_helm(), "modelRepository.existingClaim=models")
    names = ("http", "grpc", "metrics")
    host_ports = {name: free_port() for name in names}
    return pod_run(docs, models=models, host_ports=host_ports), host_ports

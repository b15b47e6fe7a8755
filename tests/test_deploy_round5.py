"""Round 5, the container and the chart as a user runs them: the checks that need no podman.

`make image-check` (loadtests/image_check.py) builds and runs the image; CI has no podman, so what can be
checked from the sources is checked here: the Dockerfile's ENTRYPOINT, CMD and ENV start a real server whose
ports answer and on which the image's own HEALTHCHECK command passes (and fails while not ready); the
chart runs the image as the image expects (user, writable paths, model path, ports, telemetry off, grace
period); the podman flags image_check derives from the chart; and the lock files the image installs from
hold every distribution the server can import.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tomllib
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from loadtests.image_run import pod_run
from tests.conftest import free_port, wait_until
from tests.test_helm_chart import container, helm, render  # noqa: F401
from tests.test_lifecycle import serving, slow_answer, slow_repo, wait_all_received

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCKS = {v: REPO_ROOT / "requirements" / f"server-{v}.lock" for v in ("cpu", "gpu")}


def dockerfile_final_stage() -> dict:
    """ENV, USER, EXPOSE, HEALTHCHECK, ENTRYPOINT and CMD of the Dockerfile's last stage."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text())
    stage: dict = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            stage = {"ENV": {}, "CMD": [], "ENTRYPOINT": [], "EXPOSE": set()}
        elif word == "ENV":
            stage["ENV"].update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
        elif word in ("ENTRYPOINT", "CMD"):
            stage[word] = json.loads(rest)
        elif word == "HEALTHCHECK":
            stage[word] = json.loads(rest[rest.index("CMD ") + 4:])
        elif word == "EXPOSE":
            stage[word] = {int(p) for p in rest.split()}
        elif word == "USER":
            stage[word] = rest.strip()
    return stage


@contextmanager
def serve_as_the_image_does(repo: Path, *, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`modelserve serve` with the image's ENTRYPOINT + CMD (the console script's module) and the given env."""
    stage = dockerfile_final_stage()
    assert stage["ENTRYPOINT"][0] == "modelserve"
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["modelserve"] == "service.cli:main"
    cmd = [sys.executable, "-m", "service.cli", *stage["ENTRYPOINT"][1:], *stage["CMD"]]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def image_env(repo: Path) -> dict[str, str]:
    """The Dockerfile's MODELSERVE_* / ORT_* environment with the ports moved to free loopback ones."""
    env = {k: v for k, v in dockerfile_final_stage()["ENV"].items() if k.startswith(("MODELSERVE_", "ORT_"))}
    env.update(MODELSERVE_MODEL_REPOSITORY=str(repo), MODELSERVE_HTTP_HOST="127.0.0.1",
               MODELSERVE_HTTP_PORT=str(free_port()), MODELSERVE_GRPC_PORT=str(free_port()),
               MODELSERVE_METRICS_PORT=str(free_port()))
    return env


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK command as Docker runs it (exec form), with `python` this interpreter."""
    cmd = dockerfile_final_stage()["HEALTHCHECK"]
    assert cmd[0] == "python"
    return subprocess.run([sys.executable, *cmd[1:]], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=30)


def test_the_image_entrypoint_and_env_serve_every_port_and_its_healthcheck_passes(tiny_zoo):
    env = image_env(tiny_zoo)
    with serve_as_the_image_does(tiny_zoo, env=env) as proc:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
            return healthcheck(env).returncode == 0

        wait_until(healthy, timeout=120, interval=0.5, what="the image's HEALTHCHECK to pass")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{env['MODELSERVE_GRPC_PORT']}")
        try:
            assert grpc.is_server_ready()
        finally:
            grpc.close()
        scraped = httpx.get(f"http://127.0.0.1:{env['MODELSERVE_METRICS_PORT']}/metrics", timeout=10)
        assert scraped.status_code == 200 and "nv_inference_request_success" in scraped.text


def test_the_image_healthcheck_fails_while_the_server_is_not_ready(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()  # strict readiness (the image's default): an empty repository is live but not ready
    env = image_env(empty)
    with serve_as_the_image_does(empty, env=env) as proc:
        port = env["MODELSERVE_HTTP_PORT"]

        def live() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(live, timeout=60, interval=0.2, what="the server to be live")
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 503
        result = healthcheck(env)
        assert result.returncode != 0, result
    assert healthcheck(env).returncode != 0  # and with nothing listening at all


def test_the_chart_runs_the_image_as_the_image_expects(helm):  # noqa: F811
    docs = render(helm)
    stage = dockerfile_final_stage()
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    sc, env = c["securityContext"], {e["name"]: e.get("value") for e in c["env"]}
    uid, gid = stage["USER"].split(":")
    assert (str(sc["runAsUser"]), str(sc["runAsGroup"])) == (uid, gid)
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    for name in ("TMPDIR", "HOME", "XDG_CACHE_HOME"):  # every place the server or its libraries write
        assert any(env[name] == w or env[name].startswith(w + "/") for w in writable), (name, env[name], writable)
    assert env["MODELSERVE_MODEL_REPOSITORY"] == stage["ENV"]["MODELSERVE_MODEL_REPOSITORY"]
    assert env["ORT_DISABLE_TELEMETRY"] == stage["ENV"]["ORT_DISABLE_TELEMETRY"] == "1"
    assert {p["containerPort"] for p in c["ports"]} == stage["EXPOSE"]
    assert {int(stage["ENV"][f"MODELSERVE_{n.upper()}_PORT"]) for n in ("http", "grpc", "metrics")} == stage["EXPOSE"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "/v2/health/ready" in " ".join(stage["HEALTHCHECK"])
    drain = int(env["MODELSERVE_EXIT_TIMEOUT_SECS"]) + int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain


def test_image_check_runs_the_container_with_the_charts_restrictions(helm, tmp_path):  # noqa: F811
    docs = render(helm, sets=("modelRepository.existingClaim=models",))
    run = pod_run(docs, models=tmp_path, host_ports={"http": 1, "grpc": 2, "metrics": 3})
    flags = " ".join(run.args)
    for expected in ("--user 10001:10001", "--read-only --read-only-tmpfs=false", "--cap-drop ALL",
                     "--security-opt no-new-privileges", "--tmpfs /tmp:rw,size=1g", f"-v {tmp_path}:/models:ro",
                     "-e MODELSERVE_CPU_THREADS=2", "-e ORT_DISABLE_TELEMETRY=1", "--memory 4g",
                     "-p 127.0.0.1:1:8000", "-p 127.0.0.1:2:8001", "-p 127.0.0.1:3:8002"):
        assert expected in flags, (expected, flags)
    assert run.grace_s == 40 and run.pre_stop == ["sleep", "5"] and run.cmd == []


TELEMETRY_SCRIPT = """
import sys, numpy as np, onnx, onnx.helper as h, onnxruntime as ort
graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g",
                     [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
    None, {"x": np.ones(1, np.float32)})
"""
CI_MARKERS = ("CI", "GITHUB_ACTIONS", "TF_BUILD", "BUILD_BUILDID", "GITLAB_CI", "JENKINS_URL", "BUILDKITE")


def _onnxruntime_writes(tmp_path: Path, name: str, extra_env: dict[str, str]) -> list[str]:
    home, work = tmp_path / name / "home", tmp_path / name / "work"
    home.mkdir(parents=True)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (*CI_MARKERS, "ORT_DISABLE_TELEMETRY")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), TMPDIR=str(work), **extra_env)
    subprocess.run([sys.executable, "-c", TELEMETRY_SCRIPT], cwd=work, env=env, check=True, timeout=120)
    return sorted(str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).rglob("*") if p.is_file())


def test_the_images_telemetry_opt_out_stops_onnxruntime_writing_a_device_id(tmp_path):
    control = _onnxruntime_writes(tmp_path, "control", {})
    if not any("deviceid" in p for p in control):
        pytest.skip(f"this onnxruntime wrote no device id even without the opt-out (CI detected?): {control}")
    opt_out = dockerfile_final_stage()["ENV"]["ORT_DISABLE_TELEMETRY"]
    assert _onnxruntime_writes(tmp_path, "opted-out", {"ORT_DISABLE_TELEMETRY": opt_out}) == []


def test_image_check_gives_an_object_storage_pod_its_secret_and_cache_volume(helm, tmp_path):  # noqa: F811
    docs = render(helm, sets=("modelRepository.url=s3://bucket/models", "modelRepository.credentialsSecret=creds"))
    with pytest.raises(ValueError, match="pass secret_env"):
        pod_run(docs, models=tmp_path, host_ports={"http": 1, "grpc": 2, "metrics": 3})
    run = pod_run(docs, models=tmp_path, host_ports={"http": 1, "grpc": 2, "metrics": 3},
                  secret_env={"AWS_ACCESS_KEY_ID": "k", "MODELSERVE_MODEL_REPOSITORY": "overridden by env"})
    flags = " ".join(run.args)
    assert "--tmpfs /cache:rw,size=10g" in flags and "-e AWS_ACCESS_KEY_ID=k" in flags
    assert run.env["MODELSERVE_MODEL_REPOSITORY"] == "s3://bucket/models"
    assert run.env["MODELSERVE_REPOSITORY_CACHE_DIR"] == "/cache"


# --- SIGTERM with gRPC streams open (podman stop during a stream lost the requests in flight at the exit timeout)

def test_sigterm_ends_open_grpc_streams_once_they_answered_every_request_they_took(tmp_path):
    repo = slow_repo(tmp_path / "models")
    grpc_port, n = free_port(), 48  # enough that the queue cannot drain before SIGTERM on a loaded machine
    xs = np.linspace(0.9, 1.0, n, dtype=np.float32)
    answers: dict[str, float] = {}
    ended: list[InferenceServerException] = []

    def callback(result, error) -> None:
        if error is not None:
            ended.append(error)
        else:
            answers[result.get_response().id] = float(result.as_numpy("y").reshape(-1)[0])

    with serving(repo, args=["--grpc-port", str(grpc_port), "--exit-timeout-secs", "600"]) as (proc, url):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        client.start_stream(callback=callback)
        for i, x in enumerate(xs):
            inp = grpcclient.InferInput("x", [1, 1], "FP32")
            inp.set_data_from_numpy(np.array([[x]], np.float32))
            client.async_stream_infer("slow", [inp], request_id=str(i))
        wait_all_received(url, n)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)  # the stream no longer holds the server until the 600 s exit timeout
        wait_until(lambda: ended, timeout=30, what="the stream to end")
        client.stop_stream()
        client.close()
    assert rc == 0
    assert sorted(answers, key=int) == [str(i) for i in range(n)], "every request on the stream is answered"
    np.testing.assert_allclose([answers[str(i)] for i in range(n)], slow_answer(xs), rtol=1e-3)
    assert "UNAVAILABLE" in str(ended[0].status()) and "shutting down" in ended[0].message()


# --- the lock files hold every distribution the server can import -------------------------------------------

FIRST_PARTY = {"service", "models", "export", "loadtests", "tests"}
NOT_INSTALLED_HERE = {"pynvml": ["nvidia-ml-py"]}  # GPU-only; not in the test environment


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(module, required) for each absolute import: required unless inside a function or a try/except ImportError."""
    def walk(node: ast.AST, optional: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            inner = optional or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(child, ast.Try) and any("ImportError" in ast.unparse(h.type or ast.Name("x"))
                                                   for h in child.handlers))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                yield from ((a.name, not inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module, not inner
            yield from walk(child, inner)
    yield from walk(ast.parse(path.read_text()), False)


def _server_modules() -> dict[str, Path]:
    """service modules reachable from `modelserve serve` and the modules it starts with `python -m`."""
    roots = ["service.cli", *re.findall(r'"-m", "(service\.[\w.]+)"', "".join(
        p.read_text() for p in (REPO_ROOT / "service").rglob("*.py")))]
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        path = REPO_ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = REPO_ROOT / name.replace(".", "/") / "__init__.py"
        if name in seen or not path.exists():
            continue
        seen[name] = path
        parts = name.split(".")
        for i in range(1, len(parts)):
            todo.append(".".join(parts[:i]))  # importing a.b.c runs a and a.b first
        todo += [m for m, _ in _imports(path) if m.split(".")[0] == "service"]
        todo += [f"{m}.{a.name}" for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and (m := node.module or "") .startswith("service")
                 for a in node.names]
    return seen


def _lock(path: Path) -> set[str]:
    return {re.sub(r"[-_.]+", "-", m).lower() for m in re.findall(r"^([A-Za-z0-9_.\-]+)==", path.read_text(), re.M)}


def _extras() -> set[str]:
    optional = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!\[; ]", spec)[0]).lower()
            for specs in optional.values() for spec in specs}


def test_the_lock_files_hold_every_distribution_the_server_can_import():
    modules = _server_modules()
    assert {"service.cli", "service.server", "service.frontend", "service.http_app"} <= set(modules)
    providers = importlib.metadata.packages_distributions()
    locks = {v: _lock(p) for v, p in LOCKS.items()}
    locks["gpu"] |= {"onnxruntime"}  # onnxruntime-gpu provides the onnxruntime module
    extras, problems = _extras(), []
    for path in sorted(modules.values()):
        for module, required in _imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in FIRST_PARTY:
                continue
            # An optional module not installed here is looked up by its own name (pyspng -> the `png` extra).
            found = providers.get(top) or NOT_INSTALLED_HERE.get(top) or ([] if required else [top])
            dists = {re.sub(r"[-_.]+", "-", d).lower() for d in found}
            if top == "google":  # a namespace: the distribution is the one holding the submodule
                dists = {"protobuf"} if module.startswith("google.protobuf") else dists
            where = f"{path.relative_to(REPO_ROOT)}: import {module}"
            if not dists:
                problems.append(f"{where}: no installed distribution provides it")
            elif required and not all(dists & lock for lock in locks.values()):
                problems.append(f"{where}: {sorted(dists)} missing from a lock file (image install would fail)")
            elif not required and not (dists & (locks["cpu"] | locks["gpu"] | extras)):
                problems.append(f"{where}: {sorted(dists)} neither in a lock file nor in a pyproject extra")
    assert not problems, "\n".join(problems)

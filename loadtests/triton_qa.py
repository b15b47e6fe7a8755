"""Run Triton's own QA unittest files and tritonclient's example clients, unchanged, against modelserve.

    python -m loadtests.triton_qa --qa-dir ~/triton-server/qa --examples-dir ~/triton-client/src/python/examples \
        --out triton_qa.json

For each QA file: write the model repository it expects (loadtests/triton_qa_models.py, our own ONNX graphs
under Triton's QA model names), start a real `modelserve serve` on 127.0.0.1:8000 (HTTP) and :8001 (gRPC) with
the flags Triton's test.sh gives that file, run the file with unittest (loadtests/triton_qa_runner.py) in a
copy of its folder, stop the server. Each example client is run as a script against a server holding Triton's
example models; exit status 0 (and "PASS" printed, where the script prints it) is a pass. Prints a table (file, cases, passed, failed, skipped) and the failure
reasons grouped, and writes both as JSON. The QA files hard-code ports 8000/8001, so those must be free on
loopback (on a shared machine, run it in its own network namespace: `unshare -rn sh -c 'ip link set lo up &&
python -m loadtests.triton_qa ...'`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loadtests import triton_qa_models as qm
from loadtests.triton_qa_report import Row, grouped_reasons, render

REPO_ROOT = Path(__file__).resolve().parent.parent
HTTP_PORT, GRPC_PORT = 8000, 8001


@dataclass(frozen=True)
class Suite:
    """One QA file, the repository and server flags it expects, and the cases that cannot run here (why)."""

    path: str  # relative to --qa-dir
    build: Callable[[Path], None]
    server_args: tuple[str, ...] = ()
    deselect: dict[str, str] = field(default_factory=dict)
    not_runnable: str = ""  # the whole file cannot run against another server, and why
    classes: tuple[str, ...] = ()  # only these TestCase classes (test.sh runs some classes with other flags)
    env: dict[str, str] = field(default_factory=dict)  # the environment test.sh gives the file
    variant: str = ""  # names a second run of one file with other env/flags

    @property
    def label(self) -> str:
        parts = [*self.classes, *([self.variant] if self.variant else [])]
        return self.path + (f" ({', '.join(parts)})" if parts else "")


def _http_repo(repo: Path) -> None:
    qm.add_identity_models(repo)
    qm.add_simple_models(repo)


def _aio_repo(total: int) -> Callable[[Path], None]:
    def build(repo: Path) -> None:
        qm.add_simple_models(repo)
        qm.add_fillers(repo, total=total)
    return build


def _infer_repo(repo: Path) -> None:
    qm.add_infer_models(repo)
    qm.add_infer_ensembles(repo)


_INFER_ENV = {"BACKENDS": "onnx", "ENSEMBLES": "1", "TRITON_SERVER_CPU_ONLY": "1",
              "TEST_SYSTEM_SHARED_MEMORY": "0", "TEST_CUDA_SHARED_MEMORY": "0"}

SUITES = [
    Suite("L0_http/http_test.py", _http_repo,
          deselect={"test_loading_large_invalid_model": "builds a 2 GiB model and a ~3 GB JSON body in the client "
                    "(about 12 GB of client memory); --include-heavy runs it"}),
    Suite("L0_http/http_restricted_api_test.py", qm.add_simple_models, classes=("RestrictedAPITest",),
          server_args=("--http-restricted-api", "model-repository:admin-key=admin-value",
                       "--http-restricted-api", "inference,metadata:infer-key=infer-value")),
    Suite("L0_http/python_http_aio_test.py", _aio_repo(7), ("--allow-client-shm", "true")),
    Suite("L0_grpc/python_grpc_aio_test.py", _aio_repo(8), ("--allow-client-shm", "true")),
    Suite("L0_grpc/python_unit_test.py", qm.add_simple_models, classes=("GrpcTest",)),
    Suite("L0_grpc/python_unit_test.py", qm.add_simple_models, classes=("RestrictedProtocolTest",),
          server_args=("--grpc-restricted-protocol", "model-repository:admin-key=admin-value",
                       "--grpc-restricted-protocol", "inference,health:infer-key=infer-value")),
    Suite("L0_input_validation/input_validation_test.py", qm.add_input_validation_models),
    # test.sh runs infer_test.py once per backend list; only ONNX here (the other backends' models are not ONNX),
    # on CPU, with the simple_/sequence_/fan_ ensemble wrappers (ENSEMBLES=1), as it is and again with every
    # tensor in system shared memory (test.sh's TEST_SYSTEM_SHARED_MEMORY=1 pass).
    Suite("L0_infer/infer_test.py", _infer_repo, env=_INFER_ENV),
    Suite("L0_infer/infer_test.py", _infer_repo, ("--allow-client-shm", "true"), variant="system shm",
          env={**_INFER_ENV, "TEST_SYSTEM_SHARED_MEMORY": "1"}),
    Suite("L0_input_validation/input_shape_validation_test.py", qm.add_input_validation_models,
          not_runnable="starts /opt/tritonserver/bin/tritonserver itself (and needs torch for its TorchScript model)"),
]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


@contextmanager
def serve(repo: Path, *, args: tuple[str, ...], log: Path, ready_timeout: float = 120.0) -> Iterator[None]:
    """`modelserve serve` on 127.0.0.1:8000/8001 until every model is loaded (or the server gives up)."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo),
           "--http-address", "127.0.0.1", "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT),
           "--log-level", "warning", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + ready_timeout
            while _get(f"http://127.0.0.1:{HTTP_PORT}/v2/health/live") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start ({' '.join(cmd)}):\n{log.read_text()[-2000:]}")
                time.sleep(0.2)  # polling a subprocess we started; nothing to wait on but the port
            while _get(f"http://127.0.0.1:{HTTP_PORT}/v2/health/ready") != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _stage(qa_dir: Path, rel: str, work: Path) -> Path:
    """Copy the file's folder and qa/common into `work` (the tests write test_results.txt beside themselves)."""
    src = qa_dir / rel
    dest_dir = work / "qa" / src.parent.name
    if not dest_dir.exists():
        shutil.copytree(src.parent, dest_dir, ignore=shutil.ignore_patterns("models", "*.log"))
    common = work / "qa" / "common"
    if not common.exists() and (qa_dir / "common").is_dir():
        shutil.copytree(qa_dir / "common", common, ignore=shutil.ignore_patterns("*.pbtxt", "*.onnx"))
    return dest_dir / src.name


def _pythonpath() -> str:
    """The repository first, then the caller's PYTHONPATH (e.g. where tritonclient[cuda]'s cuda-bindings live: the
    2021 infer_util.py imports tritonclient's CUDA shm module whenever system shm is on)."""
    return os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)


def run_suite(suite: Suite, *, qa_dir: Path, work: Path, heavy: bool, timeout: float) -> Row:
    if not (qa_dir / suite.path).is_file():
        return Row(suite.label, note="file not found under --qa-dir")
    if suite.not_runnable:
        return Row(suite.label, note=f"not run: {suite.not_runnable}")
    name = (suite.path.replace("/", "_").removesuffix(".py") + "".join(f"_{c}" for c in suite.classes)
            + (f"_{suite.variant.replace(' ', '_')}" if suite.variant else ""))
    repo = work / "repos" / name
    repo.mkdir(parents=True)
    suite.build(repo)
    test_file = _stage(qa_dir, suite.path, work)
    out = work / f"{name}.json"
    deselect = {} if heavy else suite.deselect
    cmd = [sys.executable, "-m", "loadtests.triton_qa_runner", "--file", str(test_file), "--out", str(out),
           *[f"--deselect={k}={v}" for k, v in deselect.items()], *[f"--only-class={c}" for c in suite.classes]]
    with serve(repo, args=suite.server_args, log=work / f"{name}.server.log"):
        with open(work / f"{name}.client.log", "wb") as log:
            try:
                subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                               env={**os.environ, **suite.env, "PYTHONPATH": _pythonpath()})
            except subprocess.TimeoutExpired:
                return Row(suite.label, note=f"timed out after {timeout:.0f} s")
    if not out.is_file():
        return Row(suite.label, note=f"runner wrote no results; see {work / f'{name}.client.log'}")
    return Row.from_outcomes(suite.label, json.loads(out.read_text()))


def run_examples(examples_dir: Path, *, work: Path, timeout: float) -> list[Row]:
    """Each example client is one case: run as a script (its defaults: localhost:8000 / :8001), rc 0 passes."""
    from loadtests.triton_qa_examples import GROUPS, NOT_RUN  # NOTE: only needed with --examples-dir

    stage = work / "examples"
    shutil.copytree(examples_dir, stage)
    rows, listed = [], set(NOT_RUN)
    for i, group in enumerate(GROUPS):
        repo = work / "repos" / f"examples_{i}"
        repo.mkdir(parents=True)
        group.build(repo)
        outcomes: dict[str, dict] = {}
        with serve(repo, args=group.server_args, log=work / f"examples_{i}.server.log"):
            for script, args in group.cases:
                listed.add(script)
                outcomes[" ".join((script, *args))] = _run_example(stage, script, args=args, timeout=timeout)
        rows.append(Row.from_outcomes(group.name, outcomes))
    skipped = {s: {"outcome": "skipped", "detail": f"not run: {why}"} for s, why in NOT_RUN.items()
               if (stage / s).is_file()}
    skipped.update({p.name: {"outcome": "skipped", "detail": "not run: not in the harness's list"}
                    for p in sorted(stage.glob("*.py")) if p.name not in listed})
    rows.append(Row.from_outcomes("examples not run", skipped))
    return rows


def _run_example(stage: Path, script: str, *, args: tuple[str, ...], timeout: float) -> dict:
    if not (stage / script).is_file():
        return {"outcome": "skipped", "detail": "not in --examples-dir"}
    try:
        proc = subprocess.run([sys.executable, script, *args], cwd=stage, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": "error", "detail": f"timed out after {timeout:.0f} s"}
    # Examples that print "PASS" print it only on success, some after exiting 0 on a failed check: ask for it.
    wants_pass = "PASS" in (stage / script).read_text()
    if proc.returncode == 0 and (not wants_pass or "PASS" in proc.stdout):
        return {"outcome": "passed", "detail": ""}
    why = "" if proc.returncode else "FAILED: exited 0 without printing PASS\n"
    return {"outcome": "failed", "detail": (proc.stdout + proc.stderr)[-1500:] + "\n" + why}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qa-dir", type=Path, help="a Triton server checkout's qa/ folder")
    parser.add_argument("--examples-dir", type=Path, help="tritonclient's src/python/examples folder")
    parser.add_argument("--out", type=Path, default=Path("triton_qa.json"), help="JSON report")
    parser.add_argument("--only", action="append", default=[], help="run only QA files whose path contains this")
    parser.add_argument("--include-heavy", action="store_true", help="also run cases that need ~12 GB of memory")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per QA file (per example: /10)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (repositories, logs)")
    args = parser.parse_args(argv)
    if not args.qa_dir and not args.examples_dir:
        parser.error("give --qa-dir, --examples-dir or both")
    work = Path(tempfile.mkdtemp(prefix="triton_qa_"))
    rows: list[Row] = []
    try:
        for suite in SUITES if args.qa_dir else []:
            if args.only and not any(o in suite.path for o in args.only):
                continue
            rows.append(run_suite(suite, qa_dir=args.qa_dir.resolve(), work=work, heavy=args.include_heavy,
                                  timeout=args.timeout))
            print(render([rows[-1]], header=len(rows) == 1), flush=True)
        if args.examples_dir:
            rows += run_examples(args.examples_dir.resolve(), work=work, timeout=args.timeout / 10)
    finally:
        print(f"work folder: {work}" if args.keep else "", end="")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + render(rows, header=True, total=True))
    print(grouped_reasons(rows))
    args.out.write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

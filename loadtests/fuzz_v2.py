"""Property-based fuzzing of V2 inference through a real server, with an oracle:
`python -m loadtests.fuzz_v2 --examples N [--zoo MODEL_REPOSITORY]`.

Hypothesis draws requests (loadtests/fuzz_v2_cases.py) for the fuzz models (loadtests/fuzz_v2_models.py) and,
with --zoo, the zoo's models; each is sent as HTTP JSON (flat or nested data), HTTP binary and gRPC (typed or
raw contents), and once more per transport with a framing attack only that transport can carry
(loadtests/fuzz_v2_wire.py). Every answer must be the outputs an in-process ONNX Runtime run of the same model
gives, or a 4xx / INVALID_ARGUMENT with a message; never a 5xx, UNKNOWN or INTERNAL, never a hang or a dropped
connection; the three transports must agree. Not part of the test suite (tests/test_fuzz_round5.py runs a few
dozen examples of the same properties).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import httpx
import hypothesis
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from loadtests.fuzz_v2_cases import Case, Spec, cases, expected, spec_from_config
from loadtests.fuzz_v2_models import build_fuzz_models
from loadtests.fuzz_v2_tasks import fuzz_tasks, task_models
from loadtests.fuzz_v2_wire import (
    BINARY_ATTACKS,
    GRPC_ATTACKS,
    GRPC_CODE,
    JSON_ATTACKS,
    Answer,
    read_grpc,
    read_http,
    to_binary,
    to_grpc,
    to_json,
)
from loadtests.serverproc import serve

INFER = "/inference.GRPCInferenceService/ModelInfer"
REFUSALS = {"400", "404", "413", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}


@dataclass
class Target:
    """A running server: an HTTP client and a gRPC ModelInfer callable (timeouts bound every call: a hang fails)."""

    http: httpx.Client
    channel: grpc.Channel
    timeout_s: float = 30.0
    infer: object = None
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.infer = self.channel.unary_unary(INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                              response_deserializer=pb.ModelInferResponse.FromString)

    def post(self, model: str, body: bytes, headers: dict[str, str] | None = None) -> Answer:
        try:
            resp = self.http.post(f"/v2/models/{model}/infer", content=body, headers=headers or {},
                                  timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            return Answer("lost", f"{type(exc).__name__}: {exc}")
        return read_http(resp.status_code, resp.content, resp.headers)

    def grpc(self, request: pb.ModelInferRequest) -> Answer:
        try:
            return read_grpc(self.infer(request, timeout=self.timeout_s))  # type: ignore[operator]
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            name = "lost" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name
            return Answer(name, exc.details() or "")  # type: ignore[attr-defined]


def specs_from_server(http: httpx.Client, repo: Path, *, strict: bool) -> dict[str, Spec]:
    """Every READY model's spec, its ONNX file the highest version's model.onnx under `repo`."""
    out = {}
    for row in http.post("/v2/repository/index").json():
        if row.get("state") != "READY" or row["name"] in out:
            continue
        config = http.get(f"/v2/models/{row['name']}/config").json()
        versions = sorted((p for p in (repo / row["name"]).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        path = versions[-1] / (config.get("default_model_filename") or "model.onnx")
        if config.get("platform", "onnxruntime_onnx") == "onnxruntime_onnx" and path.exists():
            out[row["name"]] = spec_from_config(config, path=path, strict=strict)
    return out


def _as_bytes(x: object) -> bytes:
    return x.encode() if isinstance(x, str) else bytes(x)  # type: ignore[call-overload]


def _same(got: np.ndarray, want: np.ndarray, *, exact: bool) -> bool:
    if got.shape != want.shape:
        return False
    if want.dtype == object:
        return [_as_bytes(x) for x in got.reshape(-1)] == [_as_bytes(x) for x in want.reshape(-1)]
    if exact or want.dtype.kind not in "fc":
        return bool(np.array_equal(got.astype(want.dtype), want, equal_nan=want.dtype.kind == "f"))
    return bool(np.allclose(got.astype(want.dtype), want, rtol=1e-4, atol=1e-2, equal_nan=True))


def judge(answer: Answer, want: dict[str, np.ndarray] | None, *, may_refuse: bool, exact: bool) -> str | None:
    """What is wrong with one answer (None: nothing)."""
    if answer.status == "ok":
        if want is None:
            return "answered a request a correct server refuses"
        if set(answer.outputs or {}) != set(want):
            return f"outputs {sorted(answer.outputs or {})}, expected {sorted(want)}"
        bad = [n for n in want if not _same((answer.outputs or {})[n], want[n], exact=exact)]
        return (f"wrong values in {bad[0]!r}: got {(answer.outputs or {})[bad[0]]!r:.150}, expected "
                f"{want[bad[0]]!r:.150}") if bad else None
    if answer.status not in REFUSALS:
        return f"{answer.status}: {answer.message[:300]}"
    if not answer.message.strip():
        return f"{answer.status} without a message"
    if want is not None and not may_refuse:
        return f"refused a valid request: {answer.status} {answer.message[:300]}"
    return None


def _outcome(answer: Answer) -> str:
    """HTTP and gRPC outcomes on one scale ('ok', 'INVALID_ARGUMENT', ...)."""
    return GRPC_CODE.get(int(answer.status), answer.status) if answer.status.isdigit() else answer.status


def check_case(target: Target, case: Case, spec: Spec, choice: dict) -> list[str]:
    """Send the case over every transport (clean, then attacked); the problems found, each one line."""
    want = expected(case, spec)
    may_refuse = case.mutation == "parameters" or not spec.strict
    exact = False  # floats within a tolerance: a batch's reductions may run in another order
    problems = []
    clean = {"json": target.post(case.model, to_json(case, nested=choice["nested"], binary_out=choice["out"])[0]),
             "binary": target.post(case.model, *to_binary(case)[:2]),
             "grpc": target.grpc(to_grpc(case, use_raw=choice["raw"])[0])}
    for transport, answer in clean.items():
        target.counts[f"{transport}:{answer.status}"] += 1
        problem = judge(answer, want, may_refuse=may_refuse, exact=exact)
        if problem:
            problems.append(f"{transport}: {problem}")
    outcomes = {t: "ok" if a.status == "ok" else _outcome(a) for t, a in clean.items()}
    if len(set(outcomes.values())) > 1:
        problems.append(f"transports disagree: {outcomes}")
    body, applied = to_json(case, nested=choice["nested"], attack=choice["json"])
    attacked = [("json+" + choice["json"], applied, lambda: target.post(case.model, body))]
    bbody, headers, bapplied = to_binary(case, attack=choice["binary"])
    attacked.append(("binary+" + choice["binary"], bapplied, lambda: target.post(case.model, bbody, headers)))
    request, gapplied = to_grpc(case, use_raw=choice["raw"], attack=choice["grpc"])
    attacked.append(("grpc+" + choice["grpc"], gapplied, lambda: target.grpc(request)))
    for label, was_applied, send in attacked:
        answer = send()
        target.counts[f"{label.split('+')[0]}-attack:{answer.status}"] += 1
        lenient = may_refuse or was_applied or label == "grpc+odd_parameters"
        problem = judge(answer, None if was_applied else want, may_refuse=lenient, exact=exact)
        if problem:
            problems.append(f"{label}: {problem}")
    return [f"{case.model} [{case.mutation}] {p}" for p in problems]


choices = st.fixed_dictionaries({"nested": st.booleans(), "raw": st.booleans(), "out": st.booleans(),
                                 "json": st.sampled_from(JSON_ATTACKS),
                                 "binary": st.sampled_from(BINARY_ATTACKS), "grpc": st.sampled_from(GRPC_ATTACKS)})


def fuzz(target: Target, specs: dict[str, Spec], *, examples: int, seed: int | None) -> list[str]:
    """Run `examples` hypothesis examples; every problem found (hypothesis does not stop at the first)."""
    found: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(specs), choice=choices)
    def run(case: Case, choice: dict) -> None:
        found.extend(check_case(target, case, specs[case.model], choice))

    (hypothesis.seed(seed)(run) if seed is not None else run)()
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.fuzz_v2", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=500)
    p.add_argument("--zoo", type=Path, help="a model repository whose models are fuzzed too (copied)")
    p.add_argument("--tasks", type=int, default=0, help="task-route examples too (/v1 predict, :predict, "
                   "/v1/embeddings), for the task models (--zoo)")
    p.add_argument("--seed", type=int, help="hypothesis seed (default: derandomized)")
    p.add_argument("--code-root", type=Path, help="run the server from another checkout (before/after)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fuzz_v2_") as tmp:
        repo = build_fuzz_models(Path(tmp) / "repo")
        zoo = set()
        for model in sorted(args.zoo.iterdir()) if args.zoo else []:
            if (model / "config.pbtxt").exists():
                shutil.copytree(model, repo / model.name)
                zoo.add(model.name)
        extra = {"code_root": args.code_root} if args.code_root else {}
        with serve(repo, log_path=Path(tmp) / "server.log", grpc=True, **extra) as server:
            with httpx.Client(base_url=f"http://{server.url}", timeout=60) as http, \
                    grpc.insecure_channel(server.grpc_url or "") as channel:
                specs = specs_from_server(http, repo, strict=True)
                specs = {n: replace(s, strict=n not in zoo) for n, s in specs.items()}
                target = Target(http, channel)
                t0 = time.monotonic()
                problems = fuzz(target, specs, examples=args.examples, seed=args.seed) if args.examples else []
                if args.tasks:
                    problems += fuzz_tasks(http, task_models(http), examples=args.tasks, seed=args.seed,
                                           counts=target.counts)
                elapsed = time.monotonic() - t0
    print(f"{args.examples} + {args.tasks} examples, {sum(target.counts.values())} requests to {len(specs)} models in "
          f"{elapsed:.0f} s; load average {[round(x, 2) for x in load_before]} -> "
          f"{[round(x, 2) for x in os.getloadavg()]}")
    for key, n in sorted(target.counts.items()):
        print(f"  {key:40} {n}")
    for problem in dict.fromkeys(problems):
        print("PROBLEM", problem)
    print(f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

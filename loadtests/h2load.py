"""The serving cells driven by h2load (nghttp2's C load generator) instead of the Python one.

On a 2-core box the load generator shares the cores with the server. The aiohttp generator spends ~250-350
CPU-us per request (25-45 % of the box at concurrency 32), which the server then cannot have, so its rows/s
measure client + server. Triton measures its server with perf_analyzer (C++) for the same reason. h2load
(Debian's `nghttp2-client`, `make tools`) speaks HTTP/1.1 (`--h1`: V2 JSON and binary) and h2c (gRPC: the
5-byte length-prefixed ModelInferRequest with `content-type: application/grpc`), closed loop, one request in
flight per connection, so `-c N -m 1` is concurrency N, as the Python generator's N workers.

What it cannot do, and how that is covered: it sends one body file per run (the Python generator cycles 8
distinct bodies), and it does not read bodies or gRPC trailers. So every cell is checked from the server's
side: its statistics must count one success per request h2load completed (a gRPC error is an HTTP 200 with
`grpc-status` in the trailers, which h2load would count as a success), no failure, and every HTTP status
in h2load's per-request log must be 2xx; one answer per cell is also decoded and checked before it runs.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from loadtests.generator import LevelResult, Target
from loadtests.grpcload import check_grpc_response
from loadtests.payloads import HEADER_LENGTH, EncodedRequest, ModelInfo, check_response

GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
_FINISHED = re.compile(r"finished in ([\d.]+)(s|ms|us),")
_DONE = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")


def available() -> str | None:
    """The h2load executable, or None (install it with `make tools`: Debian's nghttp2-client)."""
    return shutil.which("h2load")


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: a 0 (uncompressed) flag byte, 4-byte big-endian length, the bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def command(target: Target, *, protocol: str, body_file: Path, headers: dict[str, str], concurrency: int,
            seconds: float | None = None, requests: int | None = None, log_file: Path | None = None) -> list[str]:
    """The h2load command line for one cell: a duration (`-D`) or a request count (`-n`)."""
    exe = available()
    if exe is None:
        raise RuntimeError("h2load not found: install Debian's nghttp2-client (`make tools`)")
    cmd = [exe, "-c", str(concurrency), "-m", "1", "-t", "1", "-d", str(body_file)]
    cmd += ["-D", f"{seconds:g}"] if seconds is not None else ["-n", str(requests or concurrency)]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    if protocol == "grpc":
        if target.grpc_url is None:
            raise ValueError("protocol 'grpc' needs Target.grpc_url (the server's gRPC host:port)")
        cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers", f"http://{target.grpc_url}{GRPC_PATH}"]
    else:
        cmd += ["--h1", *(x for k, v in headers.items() for x in ("-H", f"{k}: {v}")), f"{target.model_path()}/infer"]
    return cmd


def _body(req: EncodedRequest, protocol: str) -> bytes:
    return grpc_frame(req.body) if protocol == "grpc" else req.body


def _stats(target: Target) -> dict:
    with urllib.request.urlopen(f"{target.model_path()}/stats", timeout=30) as resp:
        return json.load(resp)


def _counts(doc: dict) -> tuple[int, int]:
    """(success, fail) request counts over the versions in a statistics document."""
    stats = [m.get("inference_stats", {}) for m in doc.get("model_stats", [])]
    return (sum(int(s.get("success", {}).get("count", 0)) for s in stats),
            sum(int(s.get("fail", {}).get("count", 0)) for s in stats))


def check_one(target: Target, *, info: ModelInfo, protocol: str, req: EncodedRequest) -> None:
    """Send the cell's body once through the real client path and decode the answer: h2load reads none."""
    problem: str | None
    if protocol == "grpc":
        import grpc  # NOTE: only here; the HTTP cells need no gRPC stack

        assert target.grpc_url is not None
        with grpc.insecure_channel(target.grpc_url) as channel:
            call = channel.unary_unary(GRPC_PATH, request_serializer=None, response_deserializer=None)
            try:
                problem = check_grpc_response(call(req.body, timeout=30), info=info, rows=req.rows)
            except grpc.RpcError as exc:
                problem = f"{exc.code()}: {exc.details()}"
    else:
        http = urllib.request.Request(f"{target.model_path()}/infer", data=req.body, headers=req.headers)
        try:
            with urllib.request.urlopen(http, timeout=30) as resp:
                problem = check_response(resp.read(), header_length=resp.headers.get(HEADER_LENGTH), info=info,
                                         rows=req.rows)
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code}: {exc.read()[:300]!r}"
    if problem:
        raise RuntimeError(f"{protocol} answer to the h2load body is wrong: {problem}")


def _run(cmd: list[str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, h2load's CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0 or not _DONE.search(out.stdout):
        raise RuntimeError(f"h2load failed ({out.returncode}): {out.stderr.strip()[-500:] or out.stdout[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out.stdout, wall, cpu


def parse_log(path: Path) -> tuple[list[float], dict[int, int]]:
    """h2load's --log-file: per request, start (us since epoch), HTTP status, duration (us), tab-separated.
    Returns (latencies in seconds, count per status)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        status = int(parts[1])
        statuses[status] = statuses.get(status, 0) + 1
        latencies.append(int(parts[2]) / 1e6)
    return latencies, statuses


def _elapsed(out: str, wall: float) -> float:
    """h2load's own clock over the requests it counts (the wall time adds its start and connection set-up)."""
    finished = _FINISHED.search(out)
    return float(finished.group(1)) / {"s": 1, "ms": 1e3, "us": 1e6}[finished.group(2)] if finished else wall


def measure_level(target: Target, *, info: ModelInfo, protocol: str, concurrency: int, req: EncodedRequest,
                  seconds: float, cpu_probes: dict[str, Any] | None = None, check: bool = True) -> LevelResult:
    """One cell: answer checked, warm-up (which also sizes the run), statistics snapshot, ~`seconds` of load.

    The measured run is a request count (`-n`), not a duration (`-D`): at the end of a duration h2load closes
    its connections with requests in flight, which the server rightly counts as failed (the client went away),
    so a count sized from the warm-up's rate lets every request finish and be counted on both sides.
    `check=False` skips the one decoded answer (tests use it to show that errors are counted anyway)."""
    if check:
        check_one(target, info=info, protocol=protocol, req=req)
    result = LevelResult(protocol=protocol, concurrency=concurrency, rows_per_request=req.rows, requested=0)
    with tempfile.TemporaryDirectory(prefix="modelserve-h2load-") as tmp:
        body = Path(tmp) / "body.bin"
        body.write_bytes(_body(req, protocol))
        log = Path(tmp) / "requests.log"
        warm_n = max(4 * concurrency, 64)
        out, wall, _ = _run(command(target, protocol=protocol, body_file=body, headers=req.headers,
                                    concurrency=concurrency, requests=warm_n))
        rate = warm_n / max(_elapsed(out, wall), 1e-3)
        n = max(int(rate * seconds), 4 * concurrency)
        n -= n % concurrency  # h2load gives each connection n / c requests
        result.stats_before = _stats(target)
        probes = cpu_probes or {}
        start = {name: probe() for name, probe in probes.items()}
        out, wall, cpu = _run(command(target, protocol=protocol, body_file=body, headers=req.headers,
                                      concurrency=concurrency, requests=n, log_file=log))
        result.probe_cpu_s = {name: probe() - start[name] for name, probe in probes.items()}
        latencies, statuses = parse_log(log)
    m = _DONE.search(out)
    assert m is not None  # _run checked it
    done, succeeded = int(m.group(3)), int(m.group(4))
    ok_before, fail_before = _counts(result.stats_before)
    # The server may count a request's success just after writing its answer: give the last ones a moment.
    deadline = time.monotonic() + 2.0
    while True:
        result.stats_after = _stats(target)
        if _counts(result.stats_after)[0] - ok_before >= done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    result.requested = int(m.group(1))
    result.elapsed_s = _elapsed(out, wall)
    result.client_cpu_s = cpu
    result.latencies_s = latencies
    ok_after, fail_after = _counts(result.stats_after)
    server_ok, server_fail = ok_after - ok_before, fail_after - fail_before
    # Requests h2load counted done but the server did not count as answered (a gRPC error hides in trailers).
    unanswered = max(0, done - server_ok)
    bad_status = sum(n for s, n in statuses.items() if not 200 <= s < 300)
    for kind, n in (("not a success on the server", unanswered), ("server-side failure", server_fail),
                    ("non-2xx status", bad_status), ("h2load failed/errored", done - succeeded)):
        if n:
            result.errors[kind] += n
            result.error_samples.append(f"{kind}: {n} (statuses {statuses})")
    result.ok = max(0, min(done, server_ok) - bad_status)
    return result


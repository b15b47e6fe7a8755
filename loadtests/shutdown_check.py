"""What every caller gets when SIGTERM arrives: `python -m loadtests.shutdown_check [--rounds N] [--http-workers 2]`.

A real `modelserve serve` (HTTP + gRPC, every request traced to a file) serves `scale` (y = 2x, 20 ms batching
window) to many callers at once: tritonclient grpc.aio (concurrent calls on one channel), tritonclient grpc
(sync, threads), tritonclient http.aio (keep-alive), raw HTTP/1.1 connections that pipeline requests, gRPC
ModelStreamInfer streams and grpc.health.v1 Watch streams. Once some requests are answered the server gets
SIGTERM; the callers go on until it has exited.

Each call ends one way: OK with its own answer, OK with a wrong one, UNAVAILABLE / 503 "shutting down", refused
before reaching the server (connection refused, or the channel already told to go away), CANCELLED, or some
other error. The trace file says which requests were computed (their ids, with the batch they ran in), so a
call that ended in an error although its request ran is found: the caller cannot tell whether it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from loadtests.lo_capture import LoCapture
from loadtests.serverproc import REPO_ROOT, free_port
from tests.onnx_builders import scale_model, write_config

WINDOW = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n"


def build_models(root: Path) -> Path:
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", WINDOW)
    return root


@dataclass
class Outcomes:
    """Calls by transport and outcome; ids of calls that ended in an error (to hold against the trace)."""

    counts: Counter = field(default_factory=Counter)
    errored_ids: dict[str, str] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, transport: str, request_id: str, got: object, want: np.ndarray) -> None:
        right = isinstance(got, np.ndarray) and np.array_equal(got, want)
        with self.lock:
            self.counts[(transport, "OK right" if right else "OK WRONG")] += 1
            self.answered += 1

    def error(self, transport: str, request_id: str, kind: str, message: str) -> None:
        if kind == "refused at connect":
            time.sleep(0.002)  # the server is gone: no need to count thousands of these
        with self.lock:
            self.counts[(transport, kind)] += 1
            self.errored_ids[request_id] = f"{transport} {kind}: {message[:120]}"
            self.examples.setdefault(f"{transport} {kind}", message[:200])


def classify(code: str, message: str) -> str:
    """One word for how a failed call ended."""
    text = message.lower()
    if "shutting down" in text:
        return f"{code} shutting down"
    if code in ("UNAVAILABLE", "OSError") and any(w in text for w in (
            "connection refused", "failed to connect", "connect failed", "cannot connect")):
        return "refused at connect"
    return code


def _x(client_no: int, i: int) -> np.ndarray:
    return (client_no * 1_000_000 + i * 4 + np.arange(4, dtype=np.float32)).reshape(1, 4)


def _input(module, x: np.ndarray):
    inp = module.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


async def grpc_aio_caller(no: int, url: str, out: Outcomes, done: asyncio.Event, client) -> None:
    i = 0
    while not done.is_set():
        rid, x = f"ga{no}-{i}", _x(no, i)
        i += 1
        try:
            result = await client.infer("scale", [_input(grpcaio, x)], request_id=rid)
        except InferenceServerException as exc:
            code = str(exc.status()).replace("StatusCode.", "")
            out.error("grpc.aio", rid, classify(code, exc.message() or ""), exc.message() or "")
            continue
        out.ok("grpc.aio", rid, result.as_numpy("y"), 2 * x)


def grpc_sync_caller(no: int, url: str, out: Outcomes, done: threading.Event) -> None:
    client = grpcclient.InferenceServerClient(url)
    i = 0
    try:
        while not done.is_set():
            rid, x = f"gs{no}-{i}", _x(no, i)
            i += 1
            try:
                result = client.infer("scale", [_input(grpcclient, x)], request_id=rid)
            except InferenceServerException as exc:
                code = str(exc.status()).replace("StatusCode.", "")
                out.error("grpc sync", rid, classify(code, exc.message() or ""), exc.message() or "")
                continue
            out.ok("grpc sync", rid, result.as_numpy("y"), 2 * x)
    finally:
        client.close()


async def http_aio_caller(no: int, url: str, out: Outcomes, done: asyncio.Event) -> None:
    client = httpaio.InferenceServerClient(url)
    i = 0
    try:
        while not done.is_set():
            rid, x = f"ha{no}-{i}", _x(no, i)
            i += 1
            try:
                result = await client.infer("scale", [_input(httpaio, x)], request_id=rid)
            except InferenceServerException as exc:
                out.error("http.aio", rid, classify(str(exc.status()), exc.message() or ""), exc.message() or "")
                continue
            except Exception as exc:  # aiohttp: the connection closed or was refused
                out.error("http.aio", rid, classify("OSError", f"{type(exc).__name__} {exc}"), f"{type(exc).__name__} {exc}")
                continue
            out.ok("http.aio", rid, result.as_numpy("y"), 2 * x)
    finally:
        await client.close()


async def http_pipelined_caller(no: int, url: str, out: Outcomes, done: asyncio.Event, *, depth: int = 4) -> None:
    """Raw HTTP/1.1: `depth` requests written at once on one keep-alive connection, then their answers read.
    A request with no answer before the connection closed is counted "no answer (connection closed)"; HTTP
    tells the client that a request after one answered `Connection: close` was not processed."""
    host, port = url.split(":")
    i = 0
    while not done.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as exc:
            rid = f"hp{no}-{i}"
            i += 1
            out.error("http pipelined", rid, "refused at connect", str(exc))
            await asyncio.sleep(0.01)
            continue
        try:
            while not done.is_set():
                batch = []
                for _ in range(depth):
                    rid, x = f"hp{no}-{i}", _x(no, i)
                    i += 1
                    body = json.dumps({"id": rid, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                             "data": x.ravel().tolist()}]}).encode()
                    batch.append((rid, x, body))
                writer.write(b"".join(b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                                      b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
                                      for _, _, b in batch))
                closed_after = None
                for k, (rid, x, _) in enumerate(batch):
                    if closed_after is not None:
                        out.error("http pipelined", rid, "not processed (after Connection: close)", closed_after)
                        continue
                    try:
                        status, headers, payload = await _read_response(reader)
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        for rid2, _, _ in batch[k:]:
                            out.error("http pipelined", rid2, "no answer (connection closed)", repr(exc))
                        raise ConnectionError from exc
                    if status == 200:
                        got = np.array(json.loads(payload)["outputs"][0]["data"], np.float32).reshape(1, 4)
                        out.ok("http pipelined", rid, got, 2 * x)
                    else:
                        out.error("http pipelined", rid, classify(str(status), payload.decode(errors="replace")),
                                  payload.decode(errors="replace"))
                    if headers.get("connection") == "close":
                        closed_after = f"answer to {rid} said Connection: close"
                if closed_after is not None:
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip().lower() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


def stream_caller(no: int, url: str, out: Outcomes, done: threading.Event, *, in_flight: int = 8) -> None:
    """ModelStreamInfer: keep `in_flight` requests outstanding on one stream; when the stream ends, every
    request sent and not answered is counted with the stream's final status; then a new stream."""
    i = 0
    while not done.is_set():
        client = grpcclient.InferenceServerClient(url)
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error, answers=answers: answers.put((result, error)))
        sent: dict[str, np.ndarray] = {}
        ended: str | None = None
        try:
            while not done.is_set() and ended is None:
                while len(sent) < in_flight and ended is None:
                    rid, x = f"st{no}-{i}", _x(no, i)
                    i += 1
                    sent[rid] = x
                    try:
                        client.async_stream_infer("scale", [_input(grpcclient, x)], request_id=rid)
                    except InferenceServerException:  # the stream is over: this one was not sent
                        del sent[rid]
                        break
                try:
                    result, error = answers.get(timeout=0.5)
                except queue.Empty:
                    continue
                if result is not None:
                    rid = result.get_response().id
                    out.ok("grpc stream", rid, result.as_numpy("y"), 2 * sent.pop(rid))
                elif error is not None:
                    ended = f"{str(error.status()).replace('StatusCode.', '')} {error.message()}"
        finally:
            try:
                client.stop_stream(cancel_requests=False)
            except Exception:
                pass
            while not answers.empty():  # answers that arrived with the stream's end
                result, error = answers.get()
                if result is not None and result.get_response().id in sent:
                    rid = result.get_response().id
                    out.ok("grpc stream", rid, result.as_numpy("y"), 2 * sent.pop(rid))
                elif error is not None and ended is None:
                    ended = f"{str(error.status()).replace('StatusCode.', '')} {error.message()}"
            code = (ended or "ended without status").split(" ", 1)[0]
            for rid in sent:
                out.error("grpc stream", rid, classify(code, ended or ""), ended or "stream closed")
            client.close()


async def watch_caller(url: str, out: Outcomes, done: asyncio.Event) -> None:
    """One grpc.health.v1 Watch stream per connection: its messages and how it ends."""
    n = 0
    while not done.is_set():
        n += 1
        statuses = []
        async with grpc.aio.insecure_channel(url) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            try:
                async for reply in call:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                code = (await call.code()).name
            except grpc.aio.AioRpcError as exc:
                code = classify(exc.code().name, exc.details() or "")
        if statuses and statuses[-1] == "NOT_SERVING" and code == "OK":
            out.counts[("health Watch", "ended OK after NOT_SERVING")] += 1
        elif statuses:
            out.counts[("health Watch", f"ended {code} after {statuses[-1]}")] += 1
        elif code == "refused at connect":
            out.counts[("health Watch", code)] += 1
        else:
            out.counts[("health Watch", f"ended {code}, no message")] += 1
        await asyncio.sleep(0.05)


def computed_ids(trace_file: Path) -> set[str]:
    """Request ids the server ran through the model (their trace has a compute span, i.e. a batch)."""
    ids: set[str] = set()
    if not trace_file.exists():
        return ids
    for line in trace_file.read_text().splitlines():
        try:
            span = json.loads(line)
        except ValueError:
            continue
        attrs = span.get("attributes") or {}
        if span.get("name") == "InferRequest" and "batch_rows" in attrs and attrs.get("request_id"):
            ids.add(attrs["request_id"])
    return ids


async def one_round(repo: Path, tmp: Path, *, code_root: Path, http_workers: int, stop_after: int,
                    callers: int, seed: int, extra_args: tuple[str, ...] | list[str] = (),
                    exit_wait_s: float = 120.0, capture: bool = False) -> tuple[Outcomes, set[str], dict]:
    """Start a server, run every caller, SIGTERM it after `stop_after` answers (plus up to as many more),
    wait up to `exit_wait_s` for it to exit; (outcomes, ids computed, {"exit": code, "exit_s": seconds,
    "resets": the HTTP connections the server reset, when `capture`})."""
    port, grpc_port = free_port(), free_port()
    trace_file = tmp / f"trace-{seed}.jsonl"
    log_path = tmp / f"server-{seed}.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo), "--http-port", str(port),
           "--http-address", "127.0.0.1", "--grpc-port", str(grpc_port), "--log-level", "warning",
           "--trace-file", str(trace_file), "--trace-level", "TIMESTAMPS", "--trace-rate", "1",
           "--http-workers", str(http_workers), *extra_args]
    env = {**os.environ, "PYTHONPATH": str(code_root), "MODELSERVE_WARMUP": "false"}
    with open(log_path, "wb") as log:  # noqa: ASYNC230 (once per round, before any caller)
        proc = subprocess.Popen(cmd, cwd=code_root, stdout=log, stderr=subprocess.STDOUT, env=env)  # noqa: ASYNC220
    url, gurl = f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(port) or not _ready_grpc(grpc_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; log:\n{log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.05)
        out = Outcomes()
        done, tdone = asyncio.Event(), threading.Event()
        rng = random.Random(seed)
        shared = grpcaio.InferenceServerClient(gurl)
        jobs = [grpc_aio_caller(c, gurl, out, done, shared) for c in range(callers)]
        jobs += [http_aio_caller(100 + c, url, out, done) for c in range(max(1, callers // 2))]
        jobs += [http_pipelined_caller(200 + c, url, out, done) for c in range(2)]
        jobs += [watch_caller(gurl, out, done)]
        jobs += [asyncio.to_thread(grpc_sync_caller, 300 + c, gurl, out, tdone) for c in range(max(1, callers // 4))]
        jobs += [asyncio.to_thread(stream_caller, 400 + c, gurl, out, tdone) for c in range(2)]
        tasks = [asyncio.ensure_future(j) for j in jobs]
        while out.answered < stop_after + rng.randrange(stop_after):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early; log:\n{log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.01)
        packets = None
        if capture:
            packets = LoCapture(port)
            await asyncio.sleep(0.3)  # what came before SIGTERM on the connections it will reset
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, exit_wait_s)
        except subprocess.TimeoutExpired:
            pass  # reported: exit code None
        exit_s = time.monotonic() - t0
        await asyncio.sleep(0.3)  # callers see the closed ports a few more times
        resets = packets.resets(t0) if packets is not None else []
        done.set()
        tdone.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await shared.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return out, computed_ids(trace_file), {"exit": proc.returncode, "exit_s": exit_s, "resets": resets}


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _ready_grpc(port: int) -> bool:
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            return client.is_server_ready(client_timeout=2)
    except Exception:
        return False


def report(rounds: list[tuple[Outcomes, set[str], dict]]) -> tuple[Counter, list[str]]:
    total: Counter = Counter()
    problems = []
    for n, (out, computed, info) in enumerate(rounds):
        total.update(out.counts)
        if info["exit"] != 0:
            problems.append(f"round {n}: exit code {info['exit']} ({info['exit_s']:.1f} s after SIGTERM)")
        for rid, what in out.errored_ids.items():
            if rid in computed:
                problems.append(f"round {n}: {rid} was computed but its caller got {what}")
        for (transport, kind), count in out.counts.items():
            if kind == "OK WRONG" or (kind not in ("OK right", "refused at connect", "ended OK after NOT_SERVING",
                                                   "not processed (after Connection: close)")
                                      and "shutting down" not in kind):
                problems.append(f"round {n}: {transport}: {count} x {kind}: "
                                f"{out.examples.get(f'{transport} {kind}', '')}")
    return total, problems


async def amain(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shutdown_check_", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        repo = build_models(tmp / "repo")
        rounds = []
        for r in range(args.rounds):
            rounds.append(await one_round(repo, tmp, code_root=args.code_root, http_workers=args.http_workers,
                                          stop_after=args.stop_after, callers=args.callers, seed=r,
                                          capture=args.capture))
            _, computed, info = rounds[-1]
            print(f"round {r}: exit {info['exit']} {info['exit_s']:.2f} s after SIGTERM; "
                  f"{len(computed)} computed", flush=True)
            for line in info["resets"]:
                print(f"  {line}")
    total, problems = report(rounds)
    print(f"load average {[round(x, 2) for x in load_before]} -> {[round(x, 2) for x in os.getloadavg()]}")
    for (transport, kind), count in sorted(total.items()):
        print(f"  {transport:16} {kind:50} {count}")
    for p in problems:
        print("PROBLEM", p)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.shutdown_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="server starts, each stopped by SIGTERM")
    p.add_argument("--callers", type=int, default=8, help="concurrent grpc.aio calls (plus half as many http.aio, "
                                                          "a quarter grpc sync, 2 pipelined HTTP, 2 streams)")
    p.add_argument("--stop-after", type=int, default=200, help="answers before SIGTERM (plus up to as many more)")
    p.add_argument("--http-workers", type=int, default=1)
    p.add_argument("--code-root", type=Path, default=REPO_ROOT, help="the checkout whose server runs")
    p.add_argument("--tmp", default=None, help="folder for the scratch files")
    p.add_argument("--capture", action="store_true", help="list the HTTP connections the server reset around "
                                                          "SIGTERM, from a packet capture on lo (Linux, root)")
    return asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())

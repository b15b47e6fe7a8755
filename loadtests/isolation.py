"""Isolation under concurrency: `python -m loadtests.isolation --requests N [--churn]`.

Several tritonclient clients (http.aio and grpc.aio) send valid requests with distinct values and ids to the
batching models `scale` (y = 2x) and `gather` (y = table[idx]) while hostile clients send, to the same models
and so into the same batcher windows: JSON of the wrong types, broken binary framing, broken gRPC contents,
index values the graph fails on (they share a batch with valid rows and fail inside ONNX Runtime), HTTP bodies
cut off mid-send, HTTP requests whose client hangs up before the answer, cancelled gRPC calls and gRPC calls
whose `client_timeout` expires. With --churn, `scale` is unloaded and loaded again meanwhile (explicit mode);
with --sigterm the server is stopped a third of the way through.

Every valid request must get exactly its own answer (values and id), or, only while its model is unloaded, a
clear 503 / UNAVAILABLE "not ready" (after SIGTERM also a refused connection); nothing lost, nothing mixed up,
no 5xx otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from loadtests.serverproc import serve
from tests.onnx_builders import gather_model, scale_model, write_config

WINDOW = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n"
TABLE = np.arange(20, dtype=np.float32).reshape(10, 2)  # gather_model's table (rows=10)
# How a valid request may be refused while its model is being unloaded / loaded (never otherwise): "not ready".
CHURN_REFUSALS = ("503", "UNAVAILABLE")


def build_isolation_models(root: Path) -> Path:
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", WINDOW)
    gather_model(root / "gather" / "1" / "model.onnx")
    write_config(root / "gather", WINDOW)
    return root


@dataclass
class Tally:
    """What happened: valid requests by outcome, problems (each one line), hostile requests by kind/outcome."""

    valid: Counter = field(default_factory=Counter)
    hostile: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    churning: bool = False
    stopping: bool = False  # SIGTERM sent: a 503 / UNAVAILABLE or a refused connection is a clear answer
    stop_at: int = 0  # set `reached` once this many valid requests are answered (0: never)
    reached: asyncio.Event = field(default_factory=asyncio.Event)


def _valid_request(client_no: int, i: int, rng: random.Random) -> tuple[str, str, np.ndarray, np.ndarray]:
    """(model, id, input, the answer); values unique to the request so a mix-up cannot go unseen."""
    if rng.random() < 0.5:
        x = (client_no * 10_000 + i * 4 + np.arange(4, dtype=np.float32)).reshape(1, 4)
        return "scale", f"c{client_no}-{i}", x, 2 * x
    idx = np.array([[(client_no + i) % 10]], dtype=np.int64)
    return "gather", f"c{client_no}-{i}", idx, TABLE[idx]


def _input(module, model: str, x: np.ndarray):  # module: tritonclient.http or .grpc (same InferInput API)
    inp = module.InferInput("x" if model == "scale" else "idx", list(x.shape), "FP32" if model == "scale" else "INT64")
    inp.set_data_from_numpy(x)
    return inp


async def valid_client(*, client_no: int, use_grpc: bool, url: str, grpc_url: str, n: int, tally: Tally) -> None:
    rng = random.Random(client_no)
    client = grpcaio.InferenceServerClient(grpc_url) if use_grpc else httpaio.InferenceServerClient(url)
    module = grpcaio if use_grpc else httpaio
    try:
        for i in range(n):
            model, request_id, x, want = _valid_request(client_no, i, rng)
            try:
                result = await client.infer(model, [_input(module, model, x)], request_id=request_id)
            except (InferenceServerException, OSError) as exc:
                _refused(tally, exc, model=model, where=f"{request_id} ({'grpc' if use_grpc else 'http'})")
                continue
            got = result.as_numpy("y")
            answer_id = result.get_response().id if use_grpc else result.get_response().get("id")
            if answer_id != request_id or got is None or not np.array_equal(got, want):
                tally.problems.append(f"{request_id}: got id {answer_id!r} values {got!r}, expected {want!r}")
            else:
                tally.valid["answered right"] += 1
                if tally.stop_at and tally.valid["answered right"] >= tally.stop_at:
                    tally.reached.set()
    finally:
        await client.close()


def _refused(tally: Tally, exc: Exception, *, model: str, where: str) -> None:
    """A valid request refused: clear only while its model churns ("not ready") or the server stops."""
    status = str(exc.status()).replace("StatusCode.", "") if isinstance(exc, InferenceServerException) else "OSError"
    message = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
    if tally.stopping and (status in CHURN_REFUSALS or status == "OSError"):
        tally.valid[f"refused while stopping: {status}"] += 1
    elif tally.stopping and status == "CANCELLED":
        # NOTE: grpc-core answers CANCELLED (not UNAVAILABLE) to a call still waiting for a handler when the server
        # stops: https://github.com/grpc/grpc/issues/41785 (fix proposed upstream in grpc/grpc#41786).
        tally.valid["refused while stopping: CANCELLED (grpc/grpc#41785)"] += 1
    elif tally.churning and model == "scale" and status in CHURN_REFUSALS and any(
            words in (message or "") for words in ("not ready", "unloading", "unloaded")):
        tally.valid[f"refused while unloaded: {status} {message[:70]}"] += 1
    else:
        tally.problems.append(f"{where}: {status} {message}")


_HOSTILE = ["json_type", "binary_size", "grpc_short", "bad_index", "cut_body", "hang_up", "grpc_cancel",
            "grpc_timeout"]


async def _raw_http(url: str, body: bytes, *, cut: bool) -> str:
    """A valid-looking request on a raw socket: with `cut`, half the body then close; else the whole request,
    then close before reading the answer (the client went away while its row waits in a batch)."""
    host, port = url.split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    head = (f"POST /v2/models/scale/infer HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    writer.write(head + (body[:len(body) // 2] if cut else body))
    await writer.drain()
    writer.close()
    return "closed"


async def hostile_client(*, seed: int, url: str, grpc_url: str, n: int, tally: Tally) -> None:
    rng = random.Random(seed)
    good = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
    async with httpx.AsyncClient(base_url=f"http://{url}", timeout=30) as http, \
            grpc.aio.insecure_channel(grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        gclient = grpcaio.InferenceServerClient(grpc_url)
        for _ in range(n):
            kind = rng.choice(_HOSTILE)
            try:
                outcome = await _one_hostile(kind, http=http, infer=infer, gclient=gclient, url=url, good=good)
            except Exception as exc:  # a hostile client's own failure is its business; the server's answer is ours
                outcome = type(exc).__name__
            tally.hostile[f"{kind}: {outcome}"] += 1
            if (outcome.startswith("5") and outcome != "503") or outcome in ("INTERNAL", "UNKNOWN"):
                tally.problems.append(f"hostile {kind}: {outcome}")
        await gclient.close()


async def _one_hostile(kind: str, *, http, infer, gclient, url: str, good: bytes) -> str:
    if kind == "json_type":
        body = good.replace(b"[1,2,3,4]", b'[1,"2",null,true]')
        return str((await http.post("/v2/models/scale/infer", content=body)).status_code)
    if kind == "binary_size":
        header = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":15}}]}'
        resp = await http.post("/v2/models/scale/infer", content=header + b"\0" * 16,
                               headers={"Inference-Header-Content-Length": str(len(header))})
        return str(resp.status_code)
    if kind == "bad_index":  # joins the valid rows' batch, then fails inside ONNX Runtime
        body = b'{"inputs":[{"name":"idx","shape":[1,1],"datatype":"INT64","data":[12]}]}'
        return str((await http.post("/v2/models/gather/infer", content=body)).status_code)
    if kind in ("cut_body", "hang_up"):
        return await _raw_http(url, good, cut=kind == "cut_body")
    if kind == "grpc_timeout":
        x = np.ones((1, 4), np.float32)
        try:
            await gclient.infer("scale", [_input(grpcaio, "scale", x)], client_timeout=0.001)
        except InferenceServerException as exc:
            return str(exc.status()).replace("StatusCode.", "")
        return "OK"
    request = pb.ModelInferRequest(model_name="scale")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * (15 if kind == "grpc_short" else 16))
    call = infer(request, timeout=30)
    if kind == "grpc_cancel":
        await asyncio.sleep(0)  # let the call start; then the client gives up on it
        call.cancel()
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    except asyncio.CancelledError:
        return "CANCELLED"
    return "OK"


async def churn(url: str, tally: Tally, *, rounds: int) -> None:
    """Unload and load `scale` again, `rounds` times, while the clients run."""
    async with httpx.AsyncClient(base_url=f"http://{url}", timeout=120) as http:
        for _ in range(rounds):
            tally.churning = True
            for action in ("unload", "load"):
                resp = await http.post(f"/v2/repository/models/scale/{action}")
                if resp.status_code != 200:
                    tally.problems.append(f"{action}: {resp.status_code} {resp.text[:200]}")
        # NOTE: `churning` stays set: a refusal decided before the last load may reach its client after it.


async def stop_after(pid: int, tally: Tally, *, answered: int) -> None:
    """SIGTERM the server once `answered` valid requests have their answers."""
    tally.stop_at = answered
    await tally.reached.wait()
    tally.stopping = True
    os.kill(pid, signal.SIGTERM)


async def scenario(url: str, grpc_url: str, *, requests: int, clients: int = 4, churn_rounds: int = 0,
                   sigterm_pid: int | None = None) -> Tally:
    tally = Tally(churning=churn_rounds > 0)
    jobs = [valid_client(client_no=c, use_grpc=c % 2 == 1, url=url, grpc_url=grpc_url, n=requests, tally=tally)
            for c in range(clients)]
    jobs += [hostile_client(seed=100 + h, url=url, grpc_url=grpc_url, n=requests, tally=tally) for h in range(2)]
    if churn_rounds:
        jobs.append(churn(url, tally, rounds=churn_rounds))
    if sigterm_pid is not None:
        jobs.append(stop_after(sigterm_pid, tally, answered=requests * clients // 3))
    await asyncio.gather(*jobs)
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.isolation", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200, help="per client (4 valid, 2 hostile)")
    p.add_argument("--churn", type=int, default=0, help="unload/load rounds of `scale` meanwhile")
    p.add_argument("--sigterm", action="store_true", help="SIGTERM the server a third of the way through")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="isolation_") as tmp:
        repo = build_isolation_models(Path(tmp) / "repo")
        flags = ["--model-control-mode", "explicit", "--load-model", "*"]
        with serve(repo, log_path=Path(tmp) / "server.log", grpc=True, extra_args=flags) as server:
            tally = asyncio.run(scenario(server.url, server.grpc_url or "", requests=args.requests,
                                         churn_rounds=args.churn, sigterm_pid=server.pid if args.sigterm else None))
            stats = {"model_stats": []} if args.sigterm else httpx.get(f"http://{server.url}/v2/models/stats").json()
    print(f"load average {[round(x, 2) for x in load_before]} -> {[round(x, 2) for x in os.getloadavg()]}")
    print("valid:", dict(tally.valid))
    for key, count in sorted(tally.hostile.items()):
        print(f"  hostile {key:40} {count}")
    for m in stats["model_stats"]:
        print(m["name"], "batches:", {b["batch_size"]: b["compute_infer"]["count"] for b in m["batch_stats"]})
    for problem in tally.problems:
        print("PROBLEM", problem)
    return 1 if tally.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

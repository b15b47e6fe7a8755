"""A longer fuzz plus a soak against a real server: `python -m loadtests.fuzz --duration 60`.

Starts `modelserve serve` on the repository, then for `--duration` seconds sends, from `--concurrency`
workers, a mix of valid V2 requests built from each model's metadata (the soak), the same requests with
random mutations (shapes, datatypes, data, parameters, binary tails, header lengths) and garbage task
payloads. Prints and writes the counts: requests, answers by status class, 5xx (with examples), lost requests
(no answer: transport errors or timeouts) and the server's peak RSS. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson

from loadtests.serverproc import serve

DATATYPES = ["FP32", "FP16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "FP64", "BF16", "??"]
NUMPY_FREE_VALUE = {"BOOL": True, "BYTES": "a"}


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def valid_request(meta: dict, rng: random.Random) -> dict:
    """A well-formed request for the model (dynamic dims filled with small sizes)."""
    inputs = []
    for t in meta["inputs"]:
        shape = [rng.randint(1, 4) if d == -1 else d for d in t["shape"]]
        count = 1
        for d in shape:
            count *= d
        value = NUMPY_FREE_VALUE.get(t["datatype"], 1)
        inputs.append({"name": t["name"], "shape": shape, "datatype": t["datatype"], "data": [value] * count})
    return {"inputs": inputs}


def junk(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**31 - 1, 2**62, -(2**63), 2**64 - 1])
    if choice == 3:
        return rng.choice([0.5, -1e308, 1e308])
    if choice == 4:
        return rng.choice(["", "x", "FP32", "🙂", "a" * 100])
    if choice in (5, 6):
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["data", "shape", "name", "parameters", "binary_data_size", "x"]): junk(rng, depth + 1)
            for _ in range(rng.randrange(3))}


def mutate(doc: dict, rng: random.Random) -> dict:
    """One random change to a valid request: a field replaced by junk or a hostile value."""
    inp = doc["inputs"][rng.randrange(len(doc["inputs"]))]
    field = rng.choice(["shape", "datatype", "data", "parameters", "name", "inputs", "outputs", "deep"])
    if field == "shape":
        inp["shape"] = rng.choice([[0, 2**62, 4], [2**31, 2**31], [-1], [65536] * 3, junk(rng)])
    elif field == "datatype":
        inp["datatype"] = rng.choice(DATATYPES)
    elif field == "data":
        inp["data"] = junk(rng)
    elif field == "parameters":
        inp["parameters"] = junk(rng)
    elif field == "name":
        inp["name"] = junk(rng)
    elif field == "inputs":
        doc["inputs"] = junk(rng)
    elif field == "outputs":
        doc["outputs"] = [{"name": junk(rng), "parameters": junk(rng)}]
    else:
        inp["data"] = f"__DEEP__{rng.choice([50, 101, 500, 1000, 2000])}"  # spelled out by `dumps`
    return doc


def dumps(doc: dict) -> bytes:
    """JSON bytes, with a "__DEEP__n" marker written as data nested n lists deep (no encoder recursion)."""
    body = orjson.dumps(doc)
    start = body.find(b'"__DEEP__')
    if start < 0:
        return body
    end = body.index(b'"', start + 1)
    depth = int(body[start + 9:end])
    return body[:start] + b"[" * depth + b'"x"' + b"]" * depth + body[end + 1:]


def task_payload(rng: random.Random) -> dict:
    raw = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    return rng.choice([{"texts": ["hello " * rng.randrange(1, 20000)]}, {"images": [base64.b64encode(raw).decode()]},
                       {"audio": [base64.b64encode(b"RIFF" + raw).decode()]}, {"user_ids": [junk(rng)]},
                       {"texts": junk(rng)}, junk(rng)])


async def one(client: httpx.AsyncClient, models: dict[str, dict], rng: random.Random) -> tuple[str, str]:
    """Send one request; (kind, outcome) where outcome is the status class or 'lost'."""
    name = rng.choice(list(models))
    kind = rng.choice(["soak", "mutated", "mutated", "binary", "task"])
    headers: dict[str, str] = {}
    if kind == "task":
        path, body = f"/v1/models/{name}/predict", orjson.dumps(task_payload(rng))
    else:
        path, doc = f"/v2/models/{name}/infer", valid_request(models[name], rng)
        if kind != "soak":
            doc = mutate(doc, rng)
        body = dumps(doc)
        if kind == "binary":
            headers["Inference-Header-Content-Length"] = str(rng.choice([len(body), 0, len(body) + 7, -1]))
            body += bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    try:
        resp = await client.post(path, content=body, headers=headers)
    except (httpx.HTTPError, OSError):
        return kind, "lost"
    return kind, f"{resp.status_code // 100}xx" + (f" {resp.status_code}: {resp.text[:200]}" if resp.status_code >= 500 else "")


async def run(url: str, *, duration_s: float, concurrency: int, seed: int) -> dict:
    async with httpx.AsyncClient(base_url=f"http://{url}", timeout=60) as client:
        index = (await client.post("/v2/repository/index")).json()
        models = {m["name"]: (await client.get(f"/v2/models/{m['name']}")).json()
                  for m in index if m.get("state") == "READY"}
        counts: Counter[str] = Counter()
        errors: list[str] = []
        end = time.monotonic() + duration_s

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < end:
                kind, outcome = await one(client, models, rng)
                counts["requests"] += 1
                counts[outcome.split(" ")[0]] += 1
                counts[f"{kind}:{outcome.split(' ')[0]}"] += 1
                if outcome.startswith("5xx") and len(errors) < 20:
                    errors.append(outcome)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"counts": dict(counts), "fivexx_examples": errors, "models": sorted(models)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--duration", type=float, default=60.0, help="seconds of fuzzing and soak")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("fuzz_results.json"))
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    with serve(args.model_repository, log_path=args.output.with_suffix(".server.log")) as server:
        rss_start = vm_kib(server.pid, "VmRSS")
        t0 = time.monotonic()
        result = asyncio.run(run(server.url, duration_s=args.duration, concurrency=args.concurrency, seed=args.seed))
        elapsed = time.monotonic() - t0
        result.update(peak_rss_mib=round(vm_kib(server.pid, "VmHWM") / 1024, 1),
                      start_rss_mib=round(rss_start / 1024, 1), seconds=round(elapsed, 1),
                      load_average_before=[round(x, 2) for x in load_before],
                      load_average_after=[round(x, 2) for x in os.getloadavg()], cpus=len(os.sched_getaffinity(0)))
    c = result["counts"]
    print(f"requests {c.get('requests', 0)} in {result['seconds']} s: 2xx {c.get('2xx', 0)}, 4xx {c.get('4xx', 0)}, "
          f"5xx {c.get('5xx', 0)}, lost {c.get('lost', 0)}; server RSS {result['start_rss_mib']} MiB at start, "
          f"peak {result['peak_rss_mib']} MiB; load average {result['load_average_before']} -> "
          f"{result['load_average_after']} on {result['cpus']} CPUs")
    for e in result["fivexx_examples"]:
        print("  5xx:", e)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written to {args.output}")
    return 1 if c.get("5xx", 0) or c.get("lost", 0) else 0


if __name__ == "__main__":
    raise SystemExit(main())

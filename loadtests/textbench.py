"""The bench's text half: mixed-length texts on the tiny zoo transformer, in-process and through the server.

In-process ceiling: batches of 8 in arrival order (padded to their longest) and the same texts sorted by length
(what `modelserve predict` does), with the server's session options. Server: one text per request over the /v1
task route at a fixed concurrency, on two copies of the model: `text_plain` (shapes-must-match batching: only
equal lengths stack) and `text_ragged` (the zoo's own config: length-aware padding, plus adaptive waits).

    python -m loadtests.textbench --zoo /tmp/defzoo --rounds 3 [--compare OTHER_CHECKOUT]

runs the two copies side by side, interleaved round by round with a fresh in-process ceiling each round
(`--compare`: also the length-aware copy served by another checkout, e.g. `git archive` of an older commit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort

from loadtests.benchmodel import ort_session
from loadtests.generator import Target, fetch_stats
from loadtests.report import stats_delta
from loadtests.serverproc import ServerProcess, cpu_seconds, serve

TEXT_MODELS = ("text_plain", "text_ragged")
CEILING_BATCH = 8
_WORDS = ("return the list of items sorted by key with ties broken in insertion order open file at path and "
          "yield lines parse config value raise error when missing compute mean over axis ignoring padding").split()


def docstrings(count: int, *, seed: int = 0) -> list[str]:
    """Docstring-like texts whose lengths spread over ~5-118 tokens (no data is downloaded)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 116)))) for _ in range(count)]


CEILING_PASSES = ("batch1", "arrival_order", "sorted_by_length")


def text_ceiling(model_dir: Path, texts: list[str], *, batch: int = CEILING_BATCH,
                 passes: tuple[str, ...] = CEILING_PASSES) -> dict[str, float]:
    """Rows/s in-process: one text at a time, batches in arrival order padded to their longest, and the same
    texts sorted by length (`passes`: which of them)."""
    from tokenizers import Tokenizer  # NOTE: the text family's dependency, needed only for this half

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()  # as the server's text processor: the file may pad every text to max_length
    ids = [e.ids[:128] for e in tok.encode_batch(texts)]
    session = ort_session(model_dir / "1" / "model.onnx")  # the server's session options, not ORT's defaults

    def rows_per_s(order: list[list[int]]) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(order), batch):
            part = order[i:i + batch]
            length = max(map(len, part))
            x = np.zeros((len(part), length), np.int64)
            m = np.zeros_like(x)
            for r, seq in enumerate(part):
                x[r, :len(seq)], m[r, :len(seq)] = seq, 1
            session.run(None, {"input_ids": x, "attention_mask": m})
        return len(order) / (time.perf_counter() - t0)

    rows_per_s(ids[:batch])  # warm-up
    measure = {"batch1": lambda: _rows_per_s_single(session, ids), "arrival_order": lambda: rows_per_s(ids),
               "sorted_by_length": lambda: rows_per_s(sorted(ids, key=len))}
    return {name: measure[name]() for name in passes}


def _rows_per_s_single(session: ort.InferenceSession, ids: list[list[int]]) -> float:
    t0 = time.perf_counter()
    for seq in ids:
        x = np.array([seq], np.int64)
        session.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})
    return len(ids) / (time.perf_counter() - t0)


def write_text_models(repo: Path, zoo: Path) -> None:
    """Two copies of the zoo transformer: as built (length-aware, adaptive) and without length-aware batching
    (Triton's fixed delay)."""
    src = zoo / "transformer"
    shutil.copytree(src, repo / "text_ragged")
    shutil.copytree(src, repo / "text_plain")
    config = (src / "config.pbtxt").read_text()
    plain = "\n".join(line for line in config.splitlines() if "ragged_" not in line) + "\n"
    # Triton's batching as it is, named: the server's default (adaptive since round 4) does not decide the baseline.
    plain += 'parameters { key: "adaptive_batching" value: { string_value: "false" } }\n'
    (repo / "text_plain" / "config.pbtxt").write_text(plain.replace('name: "transformer"', 'name: "text_plain"'))
    adaptive = 'parameters { key: "adaptive_batching" value: { string_value: "true" } }\n'
    (repo / "text_ragged" / "config.pbtxt").write_text(
        config.replace('name: "transformer"', 'name: "text_ragged"') + adaptive)


async def _sample_queue(session: aiohttp.ClientSession, url: str, model: str, depths: list[float]) -> None:
    """Every 100 ms, the model's queue depth from /metrics (Triton's nv_inference_pending_request_count): how many
    requests the batcher had to choose from, as opposed to the clients' concurrency."""
    prefix = f'nv_inference_pending_request_count{{model="{model}"'
    while True:
        async with session.get(f"http://{url}/metrics") as resp:
            text = await resp.text()
        depths.extend(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))
        await asyncio.sleep(0.1)


async def text_level(url: str, model: str, texts: list[str], *, concurrency: int,
                     cpu: Callable[[], float] | None = None, sample_queue: bool = False) -> dict[str, Any]:
    """Every text once, one per request, `concurrency` in flight; latencies, rows/s and the server's stats
    (sample_queue: and the mean queue depth seen by polling /metrics)."""
    queue = list(texts)
    latencies: list[float] = []
    depths: list[float] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            text = queue.pop()
            t0 = time.perf_counter()
            async with session.post(f"http://{url}/v1/models/{model}/predict", json={"texts": [text]}) as resp:
                resp.raise_for_status()
                await resp.read()
            latencies.append(time.perf_counter() - t0)

    target = Target(url, model)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        before = await fetch_stats(session, target)
        cpu0, t0 = (cpu() if cpu else 0.0), time.perf_counter()
        sampler = asyncio.create_task(_sample_queue(session, url, model, depths)) if sample_queue else None
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        cpu_s = (cpu() - cpu0) if cpu else None
        after = await fetch_stats(session, target)
    lat = np.asarray(latencies) * 1e3
    return {"model": model, "concurrency": concurrency, "ok": len(latencies), "rows_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "server_cpu_us_per_req": None if cpu_s is None else cpu_s / len(latencies) * 1e6,
            "queue_depth_mean": float(np.mean(depths)) if depths else None,
            "server": stats_delta(before, after)}


def _run_async(coro):
    try:
        # NOTE: optional (uvicorn[standard] brings it on Linux only): less client CPU per request
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _row(round_no: int, cell: dict[str, Any], ceiling: float) -> str:
    batch = (cell.get("server") or {}).get("mean_batch_size") or 0.0
    depth = "" if cell.get("queue_depth_mean") is None else f" {cell['queue_depth_mean']:.1f} |"
    return (f"| {round_no} | {cell['label']} | {cell['rows_per_s']:.0f} | {cell['rows_per_s'] / ceiling:.2f} | "
            f"{cell['p50_ms']:.0f} | {cell['p99_ms']:.0f} | {batch:.2f} | {cell['server_cpu_us_per_req']:.0f} |{depth}")


def _rounds(servers: dict[str, ServerProcess], texts: list[str], *, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (server, model) cell once per round, the order reversed every other round; each round first measures
    the sorted in-process ceiling again (servers idle), so every cell has a ceiling taken under the same load."""
    cells: list[dict[str, Any]] = []
    order = [(label, server, model) for label, server in servers.items() for model in TEXT_MODELS
             if label == "this" or model == "text_ragged"]
    for _, server, model in order:  # warm-up, not recorded: first runs pay ONNX Runtime's allocations
        _run_async(text_level(server.url, model, texts[:64], concurrency=args.concurrency))
    for r in range(args.rounds):
        ceiling = text_ceiling(args.zoo / "transformer", texts, passes=("sorted_by_length",))["sorted_by_length"]
        print(f"| {r + 1} | in-process, sorted by length, batch {CEILING_BATCH} | {ceiling:.0f} | 1.00 | | | | |")
        for label, server, model in order if r % 2 == 0 else order[::-1]:
            cell = _run_async(text_level(server.url, model, texts, concurrency=args.concurrency,
                                         cpu=functools.partial(cpu_seconds, server.pid),
                                         sample_queue=args.queue_depth))
            cells.append({"round": r + 1, "label": model if label == "this" else f"{model} ({label})",
                          "ceiling_rows_per_s": ceiling, **cell})
            print(_row(r + 1, cells[-1], ceiling), flush=True)
    return cells


def main(argv: list[str] | None = None) -> int:
    """Plain vs length-aware on one server, interleaved round by round so both see the same load; --compare adds
    the length-aware copy served by another checkout's code, in the same rounds."""
    p = argparse.ArgumentParser(prog="python -m loadtests.textbench", description=main.__doc__)
    p.add_argument("--zoo", type=Path, required=True, help="a built model repository with `transformer` (read only)")
    p.add_argument("--texts", type=int, default=480, help="texts in the mixed-length set (one pass per cell)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every cell once, order alternating")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="server's MODELSERVE_CPU_THREADS")
    p.add_argument("--compare", type=Path, help="another checkout (e.g. `git archive` of a commit) to serve too")
    p.add_argument("--output", type=Path, default=Path("bench_results/textbench.json"))
    p.add_argument("--queue-depth", action="store_true",
                   help="also poll /metrics every 100 ms for the model's queue depth (a last column: its mean)")
    args = p.parse_args(argv)
    if not (args.zoo / "transformer").is_dir() or args.texts < 1 or args.rounds < 1:
        p.error(f"--zoo {args.zoo} needs a `transformer` model; --texts and --rounds must be >= 1")
    texts = docstrings(args.texts)
    load = [os.getloadavg()]
    depth = " mean queue |" if args.queue_depth else ""
    print(f"| round | model | rows/s | of sorted ceiling | p50 ms | p99 ms | mean batch | server CPU-us/req |{depth}")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.queue_depth else ""))
    with tempfile.TemporaryDirectory(prefix="textbench-") as tmp, contextlib.ExitStack() as stack:
        repo = Path(tmp) / "repo"
        write_text_models(repo, args.zoo)
        env = {"MODELSERVE_CPU_THREADS": str(args.threads)}
        servers = {"this": stack.enter_context(serve(repo, log_path=Path(tmp) / "server.log", env=env))}
        if args.compare:
            servers[args.compare.name] = stack.enter_context(
                serve(repo, log_path=Path(tmp) / "compare.log", env=env, code_root=args.compare.resolve()))
        cells = _rounds(servers, texts, args=args)
    load.append(os.getloadavg())
    print(f"load average before {load[0]}, after {load[1]}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"cells": cells, "loadavg": load,
                                       "settings": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

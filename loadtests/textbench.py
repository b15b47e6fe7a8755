"""The bench's text half: mixed-length texts on the tiny zoo transformer, in-process and through the server.

In-process ceiling: batches of 8 in arrival order (padded to their longest) and the same texts sorted by length
(what `modelserve predict` does), with the server's session options. Server: one text per request over the /v1
task route at a fixed concurrency, on two copies of the model: `text_plain` (shapes-must-match batching: only
equal lengths stack) and `text_ragged` (the zoo's own config: length-aware padding, plus adaptive waits).
"""

from __future__ import annotations

import asyncio
import shutil
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

TEXT_MODELS = ("text_plain", "text_ragged")
CEILING_BATCH = 8
_WORDS = ("return the list of items sorted by key with ties broken in insertion order open file at path and "
          "yield lines parse config value raise error when missing compute mean over axis ignoring padding").split()


def docstrings(count: int, *, seed: int = 0) -> list[str]:
    """Docstring-like texts whose lengths spread over ~5-118 tokens (no data is downloaded)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 116)))) for _ in range(count)]


def text_ceiling(model_dir: Path, texts: list[str], *, batch: int = CEILING_BATCH) -> dict[str, float]:
    """Rows/s in-process: one text at a time, batches in arrival order padded to their longest, and the same
    texts sorted by length."""
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
    return {"batch1": _rows_per_s_single(session, ids), "arrival_order": rows_per_s(ids),
            "sorted_by_length": rows_per_s(sorted(ids, key=len))}


def _rows_per_s_single(session: ort.InferenceSession, ids: list[list[int]]) -> float:
    t0 = time.perf_counter()
    for seq in ids:
        x = np.array([seq], np.int64)
        session.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})
    return len(ids) / (time.perf_counter() - t0)


def write_text_models(repo: Path, zoo: Path) -> None:
    """Two copies of the zoo transformer: as built (length-aware, adaptive) and without length-aware batching."""
    src = zoo / "transformer"
    shutil.copytree(src, repo / "text_ragged")
    shutil.copytree(src, repo / "text_plain")
    config = (src / "config.pbtxt").read_text()
    plain = "\n".join(line for line in config.splitlines() if "ragged_" not in line) + "\n"
    (repo / "text_plain" / "config.pbtxt").write_text(plain.replace('name: "transformer"', 'name: "text_plain"'))
    adaptive = 'parameters { key: "adaptive_batching" value: { string_value: "true" } }\n'
    (repo / "text_ragged" / "config.pbtxt").write_text(
        config.replace('name: "transformer"', 'name: "text_ragged"') + adaptive)


async def text_level(url: str, model: str, texts: list[str], *, concurrency: int,
                     cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    """Every text once, one per request, `concurrency` in flight; latencies, rows/s and the server's stats."""
    queue = list(texts)
    latencies: list[float] = []

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
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu_s = (cpu() - cpu0) if cpu else None
        after = await fetch_stats(session, target)
    lat = np.asarray(latencies) * 1e3
    return {"model": model, "concurrency": concurrency, "ok": len(latencies), "rows_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "server_cpu_us_per_req": None if cpu_s is None else cpu_s / len(latencies) * 1e6,
            "server": stats_delta(before, after)}

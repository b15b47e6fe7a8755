"""`python -m loadtests.bench --mode adaptive`: batching policies side by side, in one run.

(a) CNN (the bench's small CNN): one server, three copies of the model — no batching, Triton's fixed
    max_queue_delay, and adaptive (same delay as its upper bound) — at concurrency 1 and 32 (binary protocol).
(b) Text (the tiny zoo transformer, docstring-like texts of 5-118 tokens): the in-process ONNX Runtime ceiling
    with batches in arrival order (padded to their longest) and sorted by length, against the server at
    concurrency 32 with one text per request: shapes-must-match batching (each caller padded alone) vs
    length-aware batching (the batcher pads similar lengths together) with adaptive waits.
Writes adaptive.md and adaptive.json to the output folder. Figures depend on the machine and its load, which
is recorded with them (loadavg before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from loadtests.benchmodel import build_cnn_onnx, ort_session, usable_cpus
from loadtests.generator import LoadConfig, Target, build_bodies, fetch_model_info, fetch_stats, measure_level
from loadtests.report import fmt, stats_delta, summarize, write_json
from loadtests.serverproc import serve

DELAY_US = 3000  # the configuration: Triton's 3 ms max_queue_delay
CNN_MODELS = {"none": "cnn_none", "fixed": "cnn_fixed", "adaptive": "cnn_adaptive"}
_CNN_CONFIG = {
    "none": "max_batch_size: 64\n",
    "fixed": f"max_batch_size: 64\ndynamic_batching {{ max_queue_delay_microseconds: {DELAY_US} }}\n",
    "adaptive": f"max_batch_size: 64\ndynamic_batching {{ max_queue_delay_microseconds: {DELAY_US} }}\n"
                'parameters { key: "adaptive_batching" value: { string_value: "true" } }\n',
}
_WORDS = ("return the list of items sorted by key with ties broken in insertion order open file at path and "
          "yield lines parse config value raise error when missing compute mean over axis ignoring padding").split()


def _cnn_repo(repo: Path, onnx_path: Path) -> None:
    for mode, name in CNN_MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        shutil.copyfile(onnx_path, repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(_CNN_CONFIG[mode] + "instance_group [ { count: 1 kind: KIND_CPU } ]\n")


async def _cnn_levels(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mode, model in CNN_MODELS.items():
        cfg = LoadConfig(target=Target(url, model), protocols=["binary"], concurrencies=[1, 32],
                         requests=args.requests, time_cap_s=args.time_cap, progress=False)
        async with aiohttp.ClientSession() as session:
            info = await fetch_model_info(session, cfg.target)
        bodies = build_bodies(info, cfg, protocol="binary")
        for concurrency in cfg.concurrencies:
            level = await measure_level(cfg, info=info, protocol="binary", concurrency=concurrency, bodies=bodies)
            rows.append({"batching": mode, **summarize(level)})
    return rows


def docstrings(count: int, *, seed: int = 0) -> list[str]:
    """Docstring-like texts whose lengths spread over ~5-118 tokens (no data is downloaded)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 116)))) for _ in range(count)]


def _text_ceiling(model_dir: Path, texts: list[str], *, batch: int) -> dict[str, float]:
    """Rows/s in-process: batches in arrival order padded to their longest, and the same texts sorted by length."""
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
    return {"arrival_order_batch1": rows_per_s_single(session, ids), "arrival_order": rows_per_s(ids),
            "sorted_by_length": rows_per_s(sorted(ids, key=len))}


def rows_per_s_single(session: ort.InferenceSession, ids: list[list[int]]) -> float:
    t0 = time.perf_counter()
    for seq in ids:
        x = np.array([seq], np.int64)
        session.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})
    return len(ids) / (time.perf_counter() - t0)


def _text_repo(repo: Path, zoo: Path) -> None:
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


async def _text_level(url: str, model: str, texts: list[str], *, concurrency: int, time_cap: float) -> dict:
    queue = list(texts)
    done = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while queue:
            text = queue.pop()
            async with session.post(f"http://{url}/v1/models/{model}/predict", json={"texts": [text]}) as resp:
                resp.raise_for_status()
                await resp.read()
            done += 1

    target = Target(url, model)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        before = await fetch_stats(session, target)
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(session) for _ in range(concurrency))), timeout=time_cap * 10)
        elapsed = time.perf_counter() - t0
        after = await fetch_stats(session, target)
    return {"model": model, "concurrency": concurrency, "rows_per_s": done / elapsed,
            "server": stats_delta(before, after)}


def run_adaptive_bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from models import build  # NOTE: the zoo builder (torch) is needed only for the text half

    doc: dict[str, Any] = {"environment": {"cpus": usable_cpus(), "loadavg": os.getloadavg()}, "delay_us": DELAY_US}
    with tempfile.TemporaryDirectory(prefix="modelserve-adaptive-") as tmp:
        root = Path(tmp)
        build_cnn_onnx(root / "cnn.onnx", width=args.width)
        _cnn_repo(root / "repo", root / "cnn.onnx")
        console.print("building the tiny zoo transformer ...")
        zoo = root / "zoo"
        if build.main(["--profile", "tiny", "--model-repository", str(zoo), "--families", "transformer"]) != 0:
            raise RuntimeError("tiny transformer build failed")
        _text_repo(root / "repo", zoo)
        texts = docstrings(args.texts)
        console.print("text: in-process ceiling ...")
        doc["text_ceiling"] = _text_ceiling(zoo / "transformer", texts, batch=8)
        console.print("starting the server; CNN levels, then text levels ...")
        with serve(root / "repo", log_path=args.output / "server.log") as server:
            doc["cnn"] = asyncio.run(_cnn_levels(server.url, args))
            doc["text"] = [asyncio.run(_text_level(server.url, m, texts, concurrency=32, time_cap=args.time_cap))
                           for m in ("text_plain", "text_ragged")]
    doc["environment"]["loadavg_after"] = os.getloadavg()
    return doc


def render(doc: dict[str, Any], console: Console) -> str:
    """Print the tables; returns them as Markdown."""
    cnn = Table(title=f"CNN: batching policies (max_queue_delay {doc['delay_us']} us)")
    md = ["| batching | conc | req/s | p50 ms | p99 ms | mean batch |", "|---|---|---|---|---|---|"]
    for col in ("batching", "conc", "req/s", "p50 ms", "p99 ms", "mean batch"):
        cnn.add_column(col)
    for r in doc["cnn"]:
        cells = [r["batching"], str(r["concurrency"]), fmt(r["requests_per_s"], ".0f"), fmt(r["p50_ms"]),
                 fmt(r["p99_ms"]), fmt((r["server"] or {}).get("mean_batch_size"))]
        cnn.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(cnn)
    ceiling = doc["text_ceiling"]
    md += ["", "| text | rows/s | mean batch |", "|---|---|---|"]
    md += [f"| in-process, {k.replace('_', ' ')} | {v:.0f} | {'1' if 'batch1' in k else '8'} |"
           for k, v in ceiling.items()]
    md += [f"| server c=32, {r['model']} | {r['rows_per_s']:.0f} | "
           f"{fmt((r['server'] or {}).get('mean_batch_size'))} |" for r in doc["text"]]
    env = doc["environment"]
    md += ["", f"{env['cpus']} CPUs; loadavg before {tuple(round(x, 1) for x in env['loadavg'])}, "
               f"after {tuple(round(x, 1) for x in env['loadavg_after'])}"]
    text = "\n".join(md) + "\n"
    console.print(text)
    return text


def main_adaptive(args: argparse.Namespace, console: Console) -> int:
    doc = run_adaptive_bench(args, console)
    (args.output / "adaptive.md").write_text(render(doc, console))
    write_json(args.output / "adaptive.json", doc)
    console.print(f"wrote {args.output}/adaptive.md and adaptive.json")
    return 1 if any(r["errors"] for r in doc["cnn"]) else 0

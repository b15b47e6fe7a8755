"""gpu_bench.md: the GPU bench's tables (ceiling per precision and batch, server per precision, protocol and
concurrency, GPU utilization next to each), written from the JSON document so the two cannot disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtests.report import fmt


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _util(row: dict[str, Any]) -> str:
    if row.get("gpu_util_mean") is None:
        return "n/a (no NVML)"
    return f"{row['gpu_util_mean']:.0f}% (max {row['gpu_util_max']})"


def _ceiling(doc: dict[str, Any]) -> list[str]:
    rows = [[p["precision"], p["path"], str(p["batch"]), fmt(p["latency_ms"], ".3f"), fmt(p["rows_per_s"], ".0f"), _util(p)]
            for p in doc["ceiling"]]
    return _table(("precision", "path", "batch", "p50 ms/run", "rows/s", "GPU util"), rows)


def _server(doc: dict[str, Any]) -> list[str]:
    rows = [[r["run"], r["precision"], ", ".join(r.get("served") or ["?"]), r["protocol"], str(r["concurrency"]),
             fmt(r["rows_per_s"], ".0f"), fmt(r["pct_of_ceiling"], ".0f") + "%", fmt(r["p50_ms"]), fmt(r["p99_ms"]),
             _util(r), str(r.get("io_bound_instances", "?")), fmt(r.get("server_cpu_pct"), ".0f") + "%", str(r["errors"] + r["warmup_errors"])]
            for r in doc["server"]]
    return _table(("server run", "precision", "file served", "protocol", "concurrency", "rows/s", "% of ceiling", "p50 ms",
                   "p99 ms", "GPU util", "instances with I/O binding", "server CPU", "errors"), rows)


def render(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    lines = [
        f"# GPU path: {env['provider']} ({env.get('gpu') or 'no GPU seen by NVML'})",
        "",
        f"onnxruntime {env['onnxruntime']}, providers {env['providers']}, {env['cpus']} CPU cores, Python "
        f"{env['python']}; load average before {env['loadavg_before'][0]:.2f}, after {env['loadavg_after'][0]:.2f}"
        + ("; --quick (a smoke run: not figures to quote)" if env.get("quick") else ""),
        f"Model: {doc['model']['arch']} width {doc['model']['width']}, {doc['model']['input']}, max_batch_size "
        f"{doc['model']['max_batch_size']}, {doc['model']['instances']} instance(s); "
        f"{doc['settings']['time_cap_s']} s per load level.",
        "",
        "## In-process ceiling (ONNX Runtime alone; FP32 and FP16, session.run and I/O binding, interleaved)",
        "",
        *_ceiling(doc),
        "",
        "## Server (closed loop, one request = 1 row; % of the same precision's best ceiling)",
        "",
        "Runs: `fp32` (FP16 variants off, I/O binding auto), `fp16` (variants on: a GPU instance serves "
        "cnn-fp16), `fp32-unbound` (I/O binding off). On CPU all three serve FP32 unbound.",
        "",
        *_server(doc),
        "",
        "GPU util: NVML's utilization sampled every 50 ms during the level. Near the ceiling's at a similar "
        "batch means the front end keeps the GPU busy; far below it with the server CPU near the cores means "
        "the front end (HTTP/gRPC decode, batching) is the limit.",
    ]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, doc: dict[str, Any]) -> str:
    text = render(doc)
    path.write_text(text)
    return text
